// The exit rule: which uncertainty a branch's logits are measured by, and when a row leaves.
// No torch or CUDA headers: the CUDA launchers (launchers.h) include it too.
//
// Criteria (each an uncertainty u in [0, 1]; a row is confident when u < speed), over
// p = softmax(logits / T):
//   entropy   u = -sum_c p_c log p_c / log C     (FastBERT's; the default)
//   max_prob  u = 1 - p_top1                     (softmax response)
//   margin    u = 1 - (p_top1 - p_top2)
// Patience k: a row leaves when the last k students (this one included) were all confident and
// agreed on the argmax (k = 1: the plain threshold rule; large speed: PABEE's agreement rule).
//
// The op `fastbert::exit_head` takes the criterion by name. Python lists the names in
// fastbert_kernels/ops/types.py (EXIT_CRITERIA); everything in C++ and CUDA expands the one
// X-macro below, and a test compares the names the extension reports (build_info) with Python's.
#pragma once

#include <stdint.h>

#define FASTBERT_EXIT_CRITERIA(X) \
  X(entropy)                      \
  X(max_prob)                     \
  X(margin)

// The criterion's position in FASTBERT_EXIT_CRITERIA.
enum FastbertExitCriterion {
#define FASTBERT_CRITERION_ENUM(name) FASTBERT_EXIT_##name,
  FASTBERT_EXIT_CRITERIA(FASTBERT_CRITERION_ENUM)
#undef FASTBERT_CRITERION_ENUM
      FASTBERT_NUM_EXIT_CRITERIA
};

// Everything a kernel needs to decide: plain data, passed by value to the CUDA launcher.
struct FastbertExitRule {
  int criterion;          // a FastbertExitCriterion
  float inv_temperature;  // 1 / T, T > 0: the decision's logits are logits / T
  float speed;            // confident when u < speed
  int64_t patience;       // >= 1 confident, agreeing students in a row to leave
};

#define FASTBERT_CRITERION_NAME_STRING(name) #name ","
namespace fastbert {
// The criteria's names, comma-separated, in enum order (for build_info and error messages).
inline constexpr const char kExitCriterionNames[] = FASTBERT_EXIT_CRITERIA(FASTBERT_CRITERION_NAME_STRING);
}  // namespace fastbert

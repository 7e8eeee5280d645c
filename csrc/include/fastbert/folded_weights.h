// The folded exit-head weights, in the op's order: the one list of them in C++ and CUDA.
//
// The op `fastbert::exit_head` takes them as one `Tensor[] weights`, in the order of the fields of
// FoldedWeights in fastbert_kernels/ops/types.py. Everything in C++ that names them (the struct of
// tensors, its checks, the CUDA kernels' pointer struct, the names reported by build_info) expands
// this X-macro, and tests/test_ops.py (test_extension_unpacks_weights_and_names_criteria_as_python_does)
// compares the reported names with the Python fields, so the two languages cannot drift apart.
// No torch or CUDA headers: launchers.h includes it too.
#pragma once

// X(name): every weight is float32 except w_in, which has the hidden states' dtype (the
// projection runs in the vendor GEMM before the fused part, which reads the others).
#define FASTBERT_FOLDED_WEIGHTS(X) \
  X(w_in)                          \
  X(b_in)                          \
  X(w_qk)                          \
  X(b_qk)                          \
  X(w_ov)                          \
  X(b_ov)                          \
  X(w_pool)                        \
  X(b_pool)                        \
  X(w_cls)                         \
  X(b_cls)

#define FASTBERT_COUNT_ONE(name) +1
#define FASTBERT_NAME_STRING(name) #name ","
namespace fastbert {
// How many folded weights the op takes, and their names comma-separated (for build_info).
inline constexpr int kNumFoldedWeights = 0 FASTBERT_FOLDED_WEIGHTS(FASTBERT_COUNT_ONE);
inline constexpr const char kFoldedWeightNames[] = FASTBERT_FOLDED_WEIGHTS(FASTBERT_NAME_STRING);
}  // namespace fastbert

// The arithmetic of one sample's exit head, written once for the C++ CPU kernels and the CUDA
// kernels (nvcc sees __host__ __device__), so that the CPU build tests the arithmetic the GPU runs.
//
// The exit head works on the folded weights (fastbert_kernels/ops/types.py, FoldedWeights.fold):
//   z_s    = tanh(a_s + b_in)                         a_s = W_in x_s, the vendor GEMM's output
//   q'_j   = W_qk,j z_0 + b_qk,j                      one R-vector per head j
//   a_{s,j}= softmax over unmasked s of z_s . q'_j
//   zbar_j = sum_s a_{s,j} z_s
//   o      = W_ov concat_j(zbar_j) + b_ov
//   logits = W_cls tanh(W_pool o + b_pool) + b_cls
//   u      = the criterion's uncertainty of softmax(logits / T)      (fastbert/exit_rule.h)
//   exit   = the last `patience` students were confident (u < speed) and agreed on the argmax
#pragma once

#include <math.h>
#include <stdint.h>

#include "fastbert/exit_rule.h"

#if defined(__CUDACC__)
#define FB_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined, so that a caller compiled for a wider instruction set (the CPU kernel's AVX2
// clone) vectorises these loops with it instead of calling the baseline copy.
#define FB_HOST_DEVICE inline __attribute__((always_inline))
#else
#define FB_HOST_DEVICE inline
#endif

namespace fastbert {

// Vectorise a loop on the host (OpenMP SIMD lets the compiler reassociate the float sum, which
// it may not do on its own); nothing on the device, where a thread runs the loop.
#if defined(__CUDA_ARCH__) || !defined(_OPENMP)
#define FB_SIMD_REDUCTION(var)
#else
#define FB_PRAGMA(x) _Pragma(#x)
#define FB_SIMD_REDUCTION(var) FB_PRAGMA(omp simd reduction(+ : var))
#endif

// Dot product of two contiguous float vectors.
FB_HOST_DEVICE float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
  FB_SIMD_REDUCTION(acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// One output of y = W x + b, with W row-major [rows, cols]: y_i = W[i, :] . x + b_i.
FB_HOST_DEVICE float affine_row(const float* w, const float* b, const float* x, int64_t i, int64_t cols) {
  return dot(w + i * cols, x, cols) + b[i];
}

// Running state of a softmax-weighted sum whose scores arrive one at a time ("online softmax"):
// after every update, sum_s exp(score_s - max) = denominator, and the caller's accumulator holds
// sum_s exp(score_s - max) * value_s. rescale() says by how much to scale that accumulator.
struct OnlineSoftmax {
  float max;
  float denominator;
};

FB_HOST_DEVICE OnlineSoftmax online_softmax_start() { return OnlineSoftmax{-INFINITY, 0.f}; }

// Adds a score; returns (through the two pointers) the factor for the old accumulator and the
// weight for the new value.
FB_HOST_DEVICE void online_softmax_update(OnlineSoftmax& state, float score, float* old_scale, float* weight) {
  const float new_max = fmaxf(state.max, score);
  *old_scale = expf(state.max - new_max);  // exp(-inf) = 0 on the first score
  *weight = expf(score - new_max);
  state.denominator = state.denominator * (*old_scale) + *weight;
  state.max = new_max;
}

// Merges two partial states (used by the CUDA kernel across threads); same contract as update.
FB_HOST_DEVICE OnlineSoftmax online_softmax_merge(OnlineSoftmax a, OnlineSoftmax b, float* scale_a, float* scale_b) {
  const float new_max = fmaxf(a.max, b.max);
  *scale_a = a.max == -INFINITY ? 0.f : expf(a.max - new_max);
  *scale_b = b.max == -INFINITY ? 0.f : expf(b.max - new_max);
  return OnlineSoftmax{new_max, a.denominator * (*scale_a) + b.denominator * (*scale_b)};
}

// What every criterion needs from one row's logits l (C >= 2), with x_c = l_c / T:
//   top1, top2   the largest and second-largest raw logit (top2 = top1 on a tie), argmax the
//                first index of top1 (torch.argmax's choice);
//   finite   whether every logit is finite. A row with a NaN or an infinite logit is never
//            confident: its uncertainty is NaN (so `u < speed` is false on every backend), its
//            recorded argmax is 0, and it goes on to the next layer and, in the end, the teacher.
//   sum      S = sum_c exp(x_c - x_top1)               (so p_top1 = 1 / S)
//   weighted A = sum_c exp(x_c - x_top1) (x_c - x_top1)  (so H(p) = log S - A / S)
struct ExitMoments {
  float top1;
  float top2;
  int64_t argmax;
  float sum;
  float weighted;
  bool finite;
};

// Folds one more logit into a running (top1, argmax, top2); indices must arrive in increasing
// order within each partial (the CUDA warp merge keeps the smaller index on ties).
FB_HOST_DEVICE void top2_update(float value, int64_t index, float* top1, int64_t* argmax, float* top2) {
  if (value > *top1) {
    *top2 = *top1;
    *top1 = value;
    *argmax = index;
  } else if (value > *top2) {
    *top2 = value;
  }
}

// Merges two running (top1, argmax, top2); ties keep the smaller index.
FB_HOST_DEVICE void top2_merge(float b1, int64_t bi, float b2, float* top1, int64_t* argmax, float* top2) {
  if (b1 > *top1 || (b1 == *top1 && bi < *argmax)) {
    *top2 = fmaxf(*top1, b2);
    *top1 = b1;
    *argmax = bi;
  } else {
    *top2 = fmaxf(*top2, b1);
  }
}

// Adds logit l's terms to (sum, weighted), given the row's top1 and 1/T.
FB_HOST_DEVICE void softmax_moments_add(float logit, float top1, float inv_temperature, float* sum, float* weighted) {
  const float centred = (logit - top1) * inv_temperature;
  const float e = expf(centred);
  *sum += e;
  *weighted += e * centred;
}

// The moments of one row's logits, in two passes (the CPU kernel; CUDA splits them over a warp).
FB_HOST_DEVICE ExitMoments exit_moments(const float* logits, int64_t num_classes, float inv_temperature) {
  ExitMoments m{-INFINITY, -INFINITY, 0, 0.f, 0.f, true};
  for (int64_t c = 0; c < num_classes; ++c) {
    top2_update(logits[c], c, &m.top1, &m.argmax, &m.top2);
    m.finite = m.finite && isfinite(logits[c]);
  }
  for (int64_t c = 0; c < num_classes; ++c) softmax_moments_add(logits[c], m.top1, inv_temperature, &m.sum, &m.weighted);
  return m;
}

// The argmax a row's patience state records: the first maximum, or 0 for a non-finite row.
FB_HOST_DEVICE int64_t exit_argmax(const ExitMoments& m) { return m.finite ? m.argmax : 0; }

// The criterion's uncertainty in [0, 1] from the moments (see fastbert/exit_rule.h); NaN for a
// row with a non-finite logit. The clamp below must not see such a row: fminf/fmaxf drop NaN, so
// a NaN row would come out as u = 0, fully certain.
FB_HOST_DEVICE float exit_uncertainty(const ExitMoments& m, int criterion, int64_t num_classes, float inv_temperature) {
  if (!m.finite) return NAN;
  float u;
  if (criterion == FASTBERT_EXIT_max_prob) {
    u = 1.f - 1.f / m.sum;
  } else if (criterion == FASTBERT_EXIT_margin) {
    u = 1.f - (1.f - expf((m.top2 - m.top1) * inv_temperature)) / m.sum;
  } else {
    u = (logf(m.sum) - m.weighted / m.sum) / logf(static_cast<float>(num_classes));
  }
  return fminf(fmaxf(u, 0.f), 1.f);  // rounding may leave the formulas a hair outside
}

// The patience rule for one row (a NaN uncertainty is never below speed: streak 0, no exit). `previous` is the row's state after the last student, or null
// before the first: {argmax, streak}, streak = how many students in a row up to it were confident
// and agreed. Writes this student's state to `next` and returns whether the row leaves.
FB_HOST_DEVICE bool update_streak(int64_t argmax, float uncertainty, const FastbertExitRule& rule,
                                  const int64_t* previous, int64_t* next) {
  int64_t streak = 0;
  if (uncertainty < rule.speed) streak = (previous != nullptr && previous[0] == argmax) ? previous[1] + 1 : 1;
  next[0] = argmax;
  next[1] = streak;
  return streak >= rule.patience;
}

}  // namespace fastbert

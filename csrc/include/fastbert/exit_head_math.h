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
//   u      = -sum_c p_c log p_c / log C,  exit = u < speed
#pragma once

#include <math.h>
#include <stdint.h>

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

// u = -sum_c p_c log p_c / log C for p = softmax(logits); stable for any logits.
FB_HOST_DEVICE float normalized_entropy(const float* logits, int64_t num_classes) {
  float max_logit = -INFINITY;
  for (int64_t c = 0; c < num_classes; ++c) max_logit = fmaxf(max_logit, logits[c]);
  float sum = 0.f;
  for (int64_t c = 0; c < num_classes; ++c) sum += expf(logits[c] - max_logit);
  const float log_sum = logf(sum);
  float entropy = 0.f;
  for (int64_t c = 0; c < num_classes; ++c) {
    const float log_p = logits[c] - max_logit - log_sum;
    entropy -= expf(log_p) * log_p;
  }
  return entropy / logf(static_cast<float>(num_classes));
}

// The exit rule of FastBERT: leave when the branch is confident enough.
FB_HOST_DEVICE bool should_exit(float uncertainty, float speed) { return uncertainty < speed; }

}  // namespace fastbert

// Fused FastBERT exit head on CUDA, after the vendor GEMM's H -> R projection: tanh, the folded
// CLS-query attention (online softmax, tokens split across warps and merged), the output,
// pooler and classifier matvecs (a warp per output row, coalesced), softmax, the exit criterion's
// uncertainty and the exit decision (patience included). One block per row: every block reads the folded weights (about
// 4 R^2 + C R floats, 330 KB at R = 128) from L2, where they stay for the whole launch. The
// online-softmax arithmetic comes from fastbert/exit_head_math.h, shared with the CPU kernel.
#include "fastbert/exit_head_math.h"
#include "launchers.h"

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  // Lanes may round differently in the butterfly; take lane 0's value so the warp agrees bit for bit.
  return __shfl_sync(0xffffffffu, value, 0);
}

// y = W x + b for W row-major [rows, cols], x in shared memory: one warp per output row, its lanes
// walking the row together, so every weight load is coalesced (32 consecutive floats a step).
__device__ __forceinline__ void warp_affine(const float* __restrict__ w, const float* __restrict__ b,
                                            const float* x, int64_t rows, int64_t cols, bool apply_tanh,
                                            float* y, float* y_global = nullptr) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t i = warp; i < rows; i += kWarps) {
    float partial = 0.f;
    for (int64_t k = lane; k < cols; k += 32) partial += w[i * cols + k] * x[k];
    const float value = warp_sum(partial) + b[i];
    if (lane == 0) {
      y[i] = apply_tanh ? tanhf(value) : value;
      if (y_global != nullptr) y_global[i] = y[i];
    }
  }
}

// The exit criteria's moments (fastbert::ExitMoments) of `c` logits in shared memory, by one warp:
// each lane folds its strided share, the lanes' (top1, argmax, top2) merge in a butterfly (ties
// keep the smaller index, so the argmax is the first maximum, as on the CPU), then the sums.
__device__ __forceinline__ fastbert::ExitMoments warp_exit_moments(const float* logits, int64_t c,
                                                                  float inv_temperature) {
  const int lane = threadIdx.x % 32;
  // argmax starts at 0, as on the CPU; a lane with no class keeps top1 = -inf and never wins a
  // merge against a lane with a finite logit.
  fastbert::ExitMoments m{-INFINITY, -INFINITY, 0, 0.f, 0.f, true};
  for (int64_t i = lane; i < c; i += 32) {
    fastbert::top2_update(logits[i], i, &m.top1, &m.argmax, &m.top2);
    m.finite = m.finite && isfinite(logits[i]);
  }
  m.finite = __all_sync(0xffffffffu, m.finite);
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other1 = __shfl_xor_sync(0xffffffffu, m.top1, offset);
    const float other2 = __shfl_xor_sync(0xffffffffu, m.top2, offset);
    const int64_t other_index = __shfl_xor_sync(0xffffffffu, m.argmax, offset);
    fastbert::top2_merge(other1, other_index, other2, &m.top1, &m.argmax, &m.top2);
  }
  float sum = 0.f, weighted = 0.f;
  for (int64_t i = lane; i < c; i += 32) fastbert::softmax_moments_add(logits[i], m.top1, inv_temperature, &sum, &weighted);
  m.sum = warp_sum(sum);
  m.weighted = warp_sum(weighted);
  return m;
}

__global__ void exit_head_rows_kernel(const float* __restrict__ projected, const int64_t* __restrict__ mask,
                                      int64_t s, int64_t r, int64_t num_heads, int64_t c, FastbertFoldedPointers w,
                                      FastbertExitRule rule, const int64_t* __restrict__ streak_in,
                                      float* __restrict__ logits, float* __restrict__ uncertainty,
                                      bool* __restrict__ exits, int64_t* __restrict__ streak_out) {
  const float* __restrict__ b_in = w.b_in;
  extern __shared__ float shared[];
  const int64_t qk = num_heads * r;
  float* query = shared;                  // [heads * r]
  float* z = query + qk;                  // [warps][r]: the token each warp works on
  float* acc = z + kWarps * r;            // [warps][heads * r]: per-warp softmax-weighted sums
  float* state = acc + kWarps * qk;       // [warps][heads][2]: per-warp online-softmax states
  float* zbar = state + kWarps * num_heads * 2;  // [heads * r]
  float* out = zbar + qk;                 // [r]
  float* pooled = out + r;                // [r]
  float* row_logits = pooled + r;         // [c]

  const int64_t row = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* a = projected + row * s * r;
  const int64_t* row_mask = mask + row * s;

  // q'_j = W_qk,j z_0 + b_qk,j from the CLS token.
  for (int64_t k = threadIdx.x; k < r; k += kThreads) z[k] = tanhf(a[k] + b_in[k]);
  for (int64_t i = threadIdx.x; i < kWarps * qk; i += kThreads) acc[i] = 0.f;
  for (int64_t i = threadIdx.x; i < kWarps * num_heads; i += kThreads) {
    state[2 * i] = -INFINITY;
    state[2 * i + 1] = 0.f;
  }
  __syncthreads();
  warp_affine(w.w_qk, w.b_qk, z, qk, r, false, query);
  __syncthreads();

  // Each warp runs an online softmax over tokens warp, warp + kWarps, ... Its states live in
  // shared memory (not a per-thread array indexed at run time, which would go to local memory):
  // every lane computes the same update from the same score, lane 0 stores it.
  float* my_z = z + warp * r;
  float* my_acc = acc + warp * qk;
  float* my_state = state + warp * num_heads * 2;
  for (int64_t tok = warp; tok < s; tok += kWarps) {
    if (row_mask[tok] == 0) continue;  // uniform across the warp
    for (int64_t k = lane; k < r; k += 32) my_z[k] = tanhf(a[tok * r + k] + b_in[k]);
    __syncwarp();
    for (int64_t j = 0; j < num_heads; ++j) {
      float partial = 0.f;
      for (int64_t k = lane; k < r; k += 32) partial += query[j * r + k] * my_z[k];
      fastbert::OnlineSoftmax head{my_state[2 * j], my_state[2 * j + 1]};
      float old_scale, weight;
      fastbert::online_softmax_update(head, warp_sum(partial), &old_scale, &weight);
      for (int64_t k = lane; k < r; k += 32) my_acc[j * r + k] = my_acc[j * r + k] * old_scale + weight * my_z[k];
      __syncwarp();
      if (lane == 0) {
        my_state[2 * j] = head.max;
        my_state[2 * j + 1] = head.denominator;
      }
      __syncwarp();
    }
  }
  __syncthreads();

  // Merge the warps' partial softmaxes: zbar_j = sum_w scale_w acc_w,j / denominator.
  for (int64_t i = threadIdx.x; i < qk; i += kThreads) {
    const int64_t j = i / r;
    fastbert::OnlineSoftmax merged = fastbert::online_softmax_start();
    float value = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const fastbert::OnlineSoftmax part{state[(w * num_heads + j) * 2], state[(w * num_heads + j) * 2 + 1]};
      float scale_merged, scale_part;
      merged = fastbert::online_softmax_merge(merged, part, &scale_merged, &scale_part);
      value = value * scale_merged + acc[w * qk + i] * scale_part;
    }
    zbar[i] = value / merged.denominator;
  }
  __syncthreads();
  warp_affine(w.w_ov, w.b_ov, zbar, r, qk, false, out);
  __syncthreads();
  warp_affine(w.w_pool, w.b_pool, out, r, r, true, pooled);
  __syncthreads();
  warp_affine(w.w_cls, w.b_cls, pooled, c, r, false, row_logits, logits + row * c);
  __syncthreads();
  if (warp == 0) {
    const fastbert::ExitMoments moments = warp_exit_moments(row_logits, c, rule.inv_temperature);
    if (lane == 0) {
      const float u = fastbert::exit_uncertainty(moments, rule.criterion, c, rule.inv_temperature);
      uncertainty[row] = u;
      const int64_t* previous = streak_in == nullptr ? nullptr : streak_in + 2 * row;
      exits[row] = fastbert::update_streak(fastbert::exit_argmax(moments), u, rule, previous, streak_out + 2 * row);
    }
  }
}

}  // namespace

extern "C" size_t fastbert_exit_head_shared_bytes(int64_t r, int64_t num_heads, int64_t c) {
  const int64_t qk = num_heads * r;
  return sizeof(float) * (qk + kWarps * r + kWarps * qk + kWarps * num_heads * 2 + qk + 2 * r + c);
}

extern "C" cudaError_t fastbert_exit_head_rows(const float* projected, const int64_t* mask, int64_t n, int64_t s,
                                               int64_t r, int64_t num_heads, int64_t c,
                                               FastbertFoldedPointers weights, FastbertExitRule rule,
                                               const int64_t* streak_in, float* logits, float* uncertainty,
                                               bool* exits, int64_t* streak_out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (num_heads < 1 || s < 1 || r < 1 || c < 2 || rule.patience < 1 || rule.criterion < 0 ||
      rule.criterion >= FASTBERT_NUM_EXIT_CRITERIA) {
    return cudaErrorInvalidValue;
  }
  const size_t shared = fastbert_exit_head_shared_bytes(r, num_heads, c);
  if (shared > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(exit_head_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(shared));
    if (err != cudaSuccess) return err;
  }
  exit_head_rows_kernel<<<static_cast<unsigned>(n), kThreads, shared, stream>>>(
      projected, mask, s, r, num_heads, c, weights, rule, streak_in, logits, uncertainty, exits, streak_out);
  return cudaGetLastError();
}

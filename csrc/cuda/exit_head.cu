// Fused FastBERT exit head on CUDA, after the vendor GEMM's H -> R projection: tanh, the folded
// CLS-query attention (online softmax, tokens split across warps and merged), the output,
// pooler and classifier matvecs, softmax, normalised entropy and the exit decision. One block per
// row; the per-sample arithmetic comes from fastbert/exit_head_math.h, shared with the CPU kernel.
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

__global__ void exit_head_rows_kernel(const float* __restrict__ projected, const int64_t* __restrict__ mask,
                                      int64_t s, int64_t r, int64_t num_heads, int64_t c,
                                      const float* __restrict__ b_in, const float* __restrict__ w_qk,
                                      const float* __restrict__ b_qk, const float* __restrict__ w_ov,
                                      const float* __restrict__ b_ov, const float* __restrict__ w_pool,
                                      const float* __restrict__ b_pool, const float* __restrict__ w_cls,
                                      const float* __restrict__ b_cls, float speed, float* __restrict__ logits,
                                      float* __restrict__ uncertainty, bool* __restrict__ exits) {
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
  __syncthreads();
  for (int64_t i = threadIdx.x; i < qk; i += kThreads) query[i] = fastbert::affine_row(w_qk, b_qk, z, i, r);
  for (int64_t i = threadIdx.x; i < kWarps * qk; i += kThreads) acc[i] = 0.f;
  __syncthreads();

  // Each warp runs an online softmax over tokens warp, warp + kWarps, ...
  float* my_z = z + warp * r;
  float* my_acc = acc + warp * qk;
  fastbert::OnlineSoftmax my_state[8];  // num_heads <= 8, checked by the launcher
  for (int64_t j = 0; j < num_heads; ++j) my_state[j] = fastbert::online_softmax_start();
  for (int64_t tok = warp; tok < s; tok += kWarps) {
    if (row_mask[tok] == 0) continue;  // uniform across the warp
    for (int64_t k = lane; k < r; k += 32) my_z[k] = tanhf(a[tok * r + k] + b_in[k]);
    __syncwarp();
    for (int64_t j = 0; j < num_heads; ++j) {
      float partial = 0.f;
      for (int64_t k = lane; k < r; k += 32) partial += query[j * r + k] * my_z[k];
      float old_scale, weight;
      fastbert::online_softmax_update(my_state[j], warp_sum(partial), &old_scale, &weight);
      for (int64_t k = lane; k < r; k += 32) my_acc[j * r + k] = my_acc[j * r + k] * old_scale + weight * my_z[k];
    }
    __syncwarp();
  }
  if (lane == 0) {
    for (int64_t j = 0; j < num_heads; ++j) {
      state[(warp * num_heads + j) * 2] = my_state[j].max;
      state[(warp * num_heads + j) * 2 + 1] = my_state[j].denominator;
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
  for (int64_t i = threadIdx.x; i < r; i += kThreads) out[i] = fastbert::affine_row(w_ov, b_ov, zbar, i, qk);
  __syncthreads();
  for (int64_t i = threadIdx.x; i < r; i += kThreads) pooled[i] = tanhf(fastbert::affine_row(w_pool, b_pool, out, i, r));
  __syncthreads();
  for (int64_t i = threadIdx.x; i < c; i += kThreads) {
    row_logits[i] = fastbert::affine_row(w_cls, b_cls, pooled, i, r);
    logits[row * c + i] = row_logits[i];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const float u = fastbert::normalized_entropy(row_logits, c);
    uncertainty[row] = u;
    exits[row] = fastbert::should_exit(u, speed);
  }
}

}  // namespace

extern "C" size_t fastbert_exit_head_shared_bytes(int64_t r, int64_t num_heads, int64_t c) {
  const int64_t qk = num_heads * r;
  return sizeof(float) * (qk + kWarps * r + kWarps * qk + kWarps * num_heads * 2 + qk + 2 * r + c);
}

extern "C" cudaError_t fastbert_exit_head_rows(const float* projected, const int64_t* mask, int64_t n, int64_t s,
                                               int64_t r, int64_t num_heads, int64_t c, const float* b_in,
                                               const float* w_qk, const float* b_qk, const float* w_ov,
                                               const float* b_ov, const float* w_pool, const float* b_pool,
                                               const float* w_cls, const float* b_cls, float speed, float* logits,
                                               float* uncertainty, bool* exits, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (num_heads < 1 || num_heads > 8 || s < 1 || r < 1 || c < 2) return cudaErrorInvalidValue;
  const size_t shared = fastbert_exit_head_shared_bytes(r, num_heads, c);
  if (shared > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(exit_head_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(shared));
    if (err != cudaSuccess) return err;
  }
  exit_head_rows_kernel<<<static_cast<unsigned>(n), kThreads, shared, stream>>>(
      projected, mask, s, r, num_heads, c, b_in, w_qk, b_qk, w_ov, b_ov, w_pool, b_pool, w_cls, b_cls, speed, logits,
      uncertainty, exits);
  return cudaGetLastError();
}

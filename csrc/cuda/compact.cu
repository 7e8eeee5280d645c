// Compaction on CUDA: a single-block plan (ordered prefix sum of the keep flags; each kept row's
// longest used column and real-token count by one warp) and a gather that copies each kept row's first `length` tokens with the widest aligned
// vector type. The caller reads stats ({kept, length, fewest real tokens}) once: the one host
// sync per layer.
#include "launchers.h"

namespace {

constexpr int kPlanThreads = 1024;
constexpr int kPlanWarps = kPlanThreads / 32;

template <typename T>
__device__ __forceinline__ T warp_max(T value) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// One block: first the ordered prefix sum of the keep flags (the index), then each kept row's
// mask scanned by one warp, its lanes reading consecutive columns (coalesced) and reducing the
// last used column and the real-token count with shuffles. This kernel sits right before the
// layer's one host sync, so its latency is the layer's.
__global__ void compact_plan_kernel(const bool* __restrict__ keep, const int64_t* __restrict__ mask, int64_t n,
                                    int64_t s, int trim, int64_t* __restrict__ index, int64_t* __restrict__ stats) {
  __shared__ int64_t scan[kPlanThreads];
  __shared__ int64_t offset;
  __shared__ unsigned long long longest;
  __shared__ unsigned long long fewest;
  if (threadIdx.x == 0) {
    offset = 0;
    longest = trim ? 0ull : static_cast<unsigned long long>(s);
    fewest = static_cast<unsigned long long>(s);
  }
  __syncthreads();
  for (int64_t base = 0; base < n; base += kPlanThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t flag = (i < n && keep[i]) ? 1 : 0;
    scan[threadIdx.x] = flag;
    __syncthreads();
    // Hillis-Steele inclusive scan over the block.
    for (int stride = 1; stride < kPlanThreads; stride <<= 1) {
      const int64_t add = threadIdx.x >= stride ? scan[threadIdx.x - stride] : 0;
      __syncthreads();
      scan[threadIdx.x] += add;
      __syncthreads();
    }
    if (flag) index[offset + scan[threadIdx.x] - 1] = i;
    __syncthreads();
    if (threadIdx.x == kPlanThreads - 1) offset += scan[threadIdx.x];
    __syncthreads();
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t i = warp; i < n; i += kPlanWarps) {
    if (!keep[i]) continue;  // uniform across the warp
    unsigned long long last = 0, tokens = 0;
    for (int64_t t = lane; t < s; t += 32) {
      if (mask[i * s + t] != 0) {
        last = static_cast<unsigned long long>(t + 1);  // t grows along a lane: its last hit is its largest
        ++tokens;
      }
    }
    last = warp_max(last);
    tokens = warp_sum(tokens);
    if (lane == 0) {
      if (trim) atomicMax(&longest, last);
      atomicMin(&fewest, tokens);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    stats[0] = offset;
    stats[1] = static_cast<int64_t>(longest);  // s when not trimming, 0 when trimming nobody
    stats[2] = static_cast<int64_t>(fewest);   // fewer than stats[1]: the survivors carry padding
  }
}

template <typename Vector>
__global__ void compact_gather_kernel(const Vector* __restrict__ hidden, const int64_t* __restrict__ mask,
                                      const int64_t* __restrict__ rows, const int64_t* __restrict__ index,
                                      int64_t n, int64_t s, int64_t length, int64_t row_vectors_in, int64_t row_vectors_out,
                                      Vector* __restrict__ hidden_out, int64_t* __restrict__ mask_out,
                                      int64_t* __restrict__ rows_out) {
  const int64_t k = blockIdx.x;
  const int64_t i = index[k];
  // The CPU gather refuses such an index with an error; here it would read another row's memory.
  // Checking on the host would cost a sync, so the kernel stops instead, as torch's own index
  // kernels do (CUDA_KERNEL_ASSERT): the launch fails with "an illegal instruction was
  // encountered". No printf: its argument buffer would give every thread a stack frame.
  if (i < 0 || i >= n) __trap();
  const Vector* src = hidden + i * row_vectors_in;
  Vector* dst = hidden_out + k * row_vectors_out;
  for (int64_t v = blockIdx.y * blockDim.x + threadIdx.x; v < row_vectors_out; v += gridDim.y * blockDim.x) {
    dst[v] = src[v];
  }
  if (blockIdx.y == 0) {
    for (int64_t t = threadIdx.x; t < length; t += blockDim.x) mask_out[k * length + t] = mask[i * s + t];
    if (threadIdx.x == 0) rows_out[k] = rows[i];
  }
}

template <typename Vector>
cudaError_t launch_gather(const void* hidden, const int64_t* mask, const int64_t* rows, const int64_t* index,
                          int64_t n, int64_t m, int64_t s, int64_t length, int64_t bytes_in, int64_t bytes_out,
                          void* hidden_out, int64_t* mask_out, int64_t* rows_out, cudaStream_t stream) {
  const int64_t vectors_out = bytes_out / static_cast<int64_t>(sizeof(Vector));
  constexpr int threads = 256;
  int64_t blocks_y = (vectors_out + threads - 1) / threads;
  if (blocks_y < 1) blocks_y = 1;
  if (blocks_y > 64) blocks_y = 64;
  const dim3 grid(static_cast<unsigned>(m), static_cast<unsigned>(blocks_y));
  compact_gather_kernel<Vector><<<grid, threads, 0, stream>>>(
      static_cast<const Vector*>(hidden), mask, rows, index, n, s, length, bytes_in / static_cast<int64_t>(sizeof(Vector)),
      vectors_out, static_cast<Vector*>(hidden_out), mask_out, rows_out);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t fastbert_compact_plan(const bool* keep, const int64_t* mask, int64_t n, int64_t s, int trim,
                                             int64_t* index, int64_t* stats, cudaStream_t stream) {
  compact_plan_kernel<<<1, kPlanThreads, 0, stream>>>(keep, mask, n, s, trim, index, stats);
  return cudaGetLastError();
}

extern "C" cudaError_t fastbert_compact_gather(const void* hidden, const int64_t* mask, const int64_t* rows,
                                               const int64_t* index, int64_t n, int64_t m, int64_t s, int64_t h, int64_t length,
                                               int64_t element_size, void* hidden_out, int64_t* mask_out,
                                               int64_t* rows_out, cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  const int64_t bytes_in = s * h * element_size;
  const int64_t bytes_out = length * h * element_size;
  const auto aligned = [&](int64_t width) {
    return bytes_in % width == 0 && bytes_out % width == 0 && reinterpret_cast<uintptr_t>(hidden) % width == 0 &&
           reinterpret_cast<uintptr_t>(hidden_out) % width == 0;
  };
  if (aligned(16)) return launch_gather<int4>(hidden, mask, rows, index, n, m, s, length, bytes_in, bytes_out, hidden_out, mask_out, rows_out, stream);
  if (aligned(4)) return launch_gather<int>(hidden, mask, rows, index, n, m, s, length, bytes_in, bytes_out, hidden_out, mask_out, rows_out, stream);
  if (aligned(2)) return launch_gather<short>(hidden, mask, rows, index, n, m, s, length, bytes_in, bytes_out, hidden_out, mask_out, rows_out, stream);
  return launch_gather<char>(hidden, mask, rows, index, n, m, s, length, bytes_in, bytes_out, hidden_out, mask_out, rows_out, stream);
}

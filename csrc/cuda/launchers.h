// C launcher API of the CUDA kernels. No torch headers: `nvcc -c` checks the .cu files in seconds
// on a machine without a GPU, and the torch binding (bindings.cpp) is the only place that knows
// about tensors. Every launcher returns a cudaError_t (cudaSuccess = 0) and runs on `stream`.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "fastbert/exit_rule.h"
#include "fastbert/folded_weights.h"

// The folded weights' device pointers, one field per FASTBERT_FOLDED_WEIGHTS entry, float32.
// w_in is null: the projection by it runs in the vendor GEMM before the launch.
struct FastbertFoldedPointers {
#define FASTBERT_POINTER_FIELD(name) const float* name;
  FASTBERT_FOLDED_WEIGHTS(FASTBERT_POINTER_FIELD)
#undef FASTBERT_POINTER_FIELD
};

#ifdef __cplusplus
extern "C" {
#endif

// Exit head after the H -> R projection. `projected` is [n, s, r] float32 (x W_in^T, no bias);
// `weights` are the folded float32 weights (fastbert/folded_weights.h); `rule` the exit rule
// (fastbert/exit_rule.h); `streak_in` [n, 2] the rows' patience state, or null before the first
// student. Writes logits [n, c], uncertainty [n], exits [n], streak_out [n, 2]. One block per row.
cudaError_t fastbert_exit_head_rows(const float* projected, const int64_t* mask, int64_t n, int64_t s, int64_t r,
                                    int64_t num_heads, int64_t c, struct FastbertFoldedPointers weights,
                                    struct FastbertExitRule rule, const int64_t* streak_in, float* logits,
                                    float* uncertainty, bool* exits, int64_t* streak_out, cudaStream_t stream);

// Bytes of dynamic shared memory fastbert_exit_head_rows needs for these sizes.
size_t fastbert_exit_head_shared_bytes(int64_t r, int64_t num_heads, int64_t c);

// Plans a compaction: index[0:count] = kept rows in order; stats = {count, length, fewest}, where
// length is the index after the last used mask column of any kept row (s when trim is 0) and
// fewest the fewest real tokens of a kept row (s when none is kept); stats has 3 elements.
cudaError_t fastbert_compact_plan(const bool* keep, const int64_t* mask, int64_t n, int64_t s, int trim,
                                  int64_t* index, int64_t* stats, cudaStream_t stream);

// Gathers m rows of n: hidden_out[k] = hidden[index[k], :length] (row_elements = s * h elements of
// element_size bytes per input row), mask_out[k] = mask[index[k], :length], rows_out[k] = rows[index[k]].
// An index outside [0, n) stops the kernel (the launch then fails) instead of reading out of bounds.
cudaError_t fastbert_compact_gather(const void* hidden, const int64_t* mask, const int64_t* rows,
                                    const int64_t* index, int64_t n, int64_t m, int64_t s, int64_t h, int64_t length,
                                    int64_t element_size, void* hidden_out, int64_t* mask_out, int64_t* rows_out,
                                    cudaStream_t stream);

#ifdef __cplusplus
}
#endif

// Torch-level entry points of the compiled kernels (declared once, registered in ops.cpp).
#pragma once

#include <torch/types.h>

#include <tuple>

#include "fastbert/checks.h"

namespace fastbert {

std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_head_cpu(const at::Tensor& hidden, const at::Tensor& mask,
                                                            const FoldedWeights& weights, int64_t num_heads,
                                                            double speed);
// Compaction returns the kept rows and whether they still carry padding (see compact_cpu.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> compact_cpu(const at::Tensor& hidden, const at::Tensor& mask,
                                                                const at::Tensor& rows, const at::Tensor& keep,
                                                                bool trim);

#ifdef FASTBERT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_head_cuda(const at::Tensor& hidden, const at::Tensor& mask,
                                                             const FoldedWeights& weights, int64_t num_heads,
                                                             double speed);
std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> compact_cuda(const at::Tensor& hidden, const at::Tensor& mask,
                                                                 const at::Tensor& rows, const at::Tensor& keep,
                                                                 bool trim);
#endif

}  // namespace fastbert

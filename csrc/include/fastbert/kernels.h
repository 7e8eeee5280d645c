// The compiled kernels of the ops `fastbert::exit_head`, `fastbert::compact_plan` and
// `fastbert::compact_gather`, with the C++ types of the schemas defined once in
// fastbert_kernels/ops/library.py. ops.cpp registers them per device (TORCH_LIBRARY_IMPL); the
// dispatcher checks each signature against the schema when it does, so a drift fails the import.
#pragma once

#include <torch/types.h>

#include <optional>
#include <tuple>

#include "fastbert/checks.h"

namespace fastbert {

// (logits [N, C] float32, uncertainty [N] float32, exits [N] bool, streak [N, 2] int64)
using ExitHeadResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// (index [N] int64: the kept rows in order, then -1; stats [3] int64: {kept, length, fewest})
using CompactPlan = std::tuple<at::Tensor, at::Tensor>;
// (hidden [M, S', H], mask [M, S'], rows [M]): fresh tensors, never the inputs
using Compacted = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

ExitHeadResult exit_head_cpu(const at::Tensor& hidden, const at::Tensor& mask, at::TensorList weights,
                             int64_t num_heads, double speed, c10::string_view criterion, double temperature,
                             int64_t patience, const std::optional<at::Tensor>& streak);
CompactPlan compact_plan_cpu(const at::Tensor& keep, const at::Tensor& mask, bool trim);
Compacted compact_gather_cpu(const at::Tensor& hidden, const at::Tensor& mask, const at::Tensor& rows,
                             const at::Tensor& index, int64_t count, int64_t length);

#ifdef FASTBERT_WITH_CUDA
ExitHeadResult exit_head_cuda(const at::Tensor& hidden, const at::Tensor& mask, at::TensorList weights,
                              int64_t num_heads, double speed, c10::string_view criterion, double temperature,
                              int64_t patience, const std::optional<at::Tensor>& streak);
CompactPlan compact_plan_cuda(const at::Tensor& keep, const at::Tensor& mask, bool trim);
Compacted compact_gather_cuda(const at::Tensor& hidden, const at::Tensor& mask, const at::Tensor& rows,
                              const at::Tensor& index, int64_t count, int64_t length);
#endif

}  // namespace fastbert

// Torch binding of the CUDA kernels; compiled only when torch has CUDA (setup.py defines
// FASTBERT_WITH_CUDA). Checks every input, runs the H -> R projection in cuBLAS, then the launchers.
// Only c10's stream and guard headers: ATen/cuda/CUDAContext.h pulls cuBLAS/cuSPARSE/cuSOLVER
// headers that a plain CUDA toolkit does not have.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include "fastbert/checks.h"
#include "fastbert/kernels.h"
#include "launchers.h"

namespace fastbert {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

ExitHeadResult exit_head_cuda(const at::Tensor& hidden_in, const at::Tensor& mask_in, at::TensorList weights,
                              int64_t num_heads, double speed, c10::string_view criterion, double temperature,
                              int64_t patience, const std::optional<at::Tensor>& streak_in) {
  const at::Tensor hidden = hidden_in.contiguous(), mask = mask_in.contiguous();
  const FoldedWeights w = FoldedWeights::from_list(weights);
  check_hidden_and_mask(hidden, mask);
  TORCH_CHECK(hidden.is_cuda(), "exit_head_cuda needs CUDA tensors, got ", hidden.device());
  const int64_t r = check_folded_weights(hidden, w, num_heads);
  const FastbertExitRule rule = check_exit_rule(hidden, speed, criterion, temperature, patience, streak_in);
  const at::Tensor previous = streak_in.has_value() ? streak_in->contiguous() : at::Tensor();
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t n = hidden.size(0), s = hidden.size(1), h = hidden.size(2), c = w.w_cls.size(0);
  int shared_limit = 0;
  check_cuda(cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, hidden.get_device()),
             "cudaDeviceGetAttribute");
  const size_t shared = fastbert_exit_head_shared_bytes(r, num_heads, c);
  TORCH_CHECK(shared <= static_cast<size_t>(shared_limit), "the CUDA exit head needs ", shared,
              " bytes of shared memory for branch width ", r, ", ", num_heads, " heads and ", c,
              " classes; this GPU allows ", shared_limit, " (use the triton backend, which tiles)");
  auto logits = at::empty({n, c}, hidden.options().dtype(at::kFloat));
  auto uncertainty = at::empty({n}, hidden.options().dtype(at::kFloat));
  auto exits = at::empty({n}, hidden.options().dtype(at::kBool));
  auto streak = at::empty({n, 2}, hidden.options().dtype(at::kLong));
  if (n == 0) return {logits, uncertainty, exits, streak};
  const at::Tensor projected = at::linear(hidden.view({n * s, h}), w.w_in).to(at::kFloat).contiguous();
  // Every weight but w_in, whose product is `projected`: w_in has hidden's dtype, which may be half
  // precision, so its pointer stays null (data_ptr<float> would refuse it).
  FastbertFoldedPointers pointers{};
#define FASTBERT_POINTER(name) \
  if (&w.name != &w.w_in) pointers.name = w.name.data_ptr<float>();
  FASTBERT_FOLDED_WEIGHTS(FASTBERT_POINTER)
#undef FASTBERT_POINTER
  check_cuda(fastbert_exit_head_rows(projected.data_ptr<float>(), mask.data_ptr<int64_t>(), n, s, r, num_heads, c,
                                     pointers, rule, previous.defined() ? previous.data_ptr<int64_t>() : nullptr,
                                     logits.data_ptr<float>(), uncertainty.data_ptr<float>(), exits.data_ptr<bool>(),
                                     streak.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()),
             "fastbert_exit_head_rows");
  return {logits, uncertainty, exits, streak};
}

CompactPlan compact_plan_cuda(const at::Tensor& keep_in, const at::Tensor& mask_in, bool trim) {
  const at::Tensor keep = keep_in.contiguous(), mask = mask_in.contiguous();
  check_keep_and_mask(keep, mask);
  TORCH_CHECK(mask.is_cuda(), "compact_plan_cuda needs CUDA tensors, got ", mask.device());
  const c10::cuda::CUDAGuard guard(mask.device());
  const int64_t n = mask.size(0), s = mask.size(1);
  auto index = at::full({n}, -1, mask.options());  // the kernel writes index[:count]
  auto stats = at::empty({3}, mask.options());
  check_cuda(fastbert_compact_plan(keep.data_ptr<bool>(), mask.data_ptr<int64_t>(), n, s, trim ? 1 : 0,
                                   index.data_ptr<int64_t>(), stats.data_ptr<int64_t>(),
                                   c10::cuda::getCurrentCUDAStream()),
             "fastbert_compact_plan");
  return {index, stats};
}

Compacted compact_gather_cuda(const at::Tensor& hidden_in, const at::Tensor& mask_in, const at::Tensor& rows_in,
                              const at::Tensor& index_in, int64_t count, int64_t length) {
  const at::Tensor hidden = hidden_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor rows = rows_in.contiguous(), index = index_in.contiguous();
  check_hidden_and_mask(hidden, mask);
  check_gather(hidden, rows, index, count, length);
  TORCH_CHECK(hidden.is_cuda(), "compact_gather_cuda needs CUDA tensors, got ", hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t n = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  auto hidden_out = at::empty({count, length, h}, hidden.options());
  auto mask_out = at::empty({count, length}, mask.options());
  auto rows_out = at::empty({count}, rows.options());
  check_cuda(fastbert_compact_gather(hidden.data_ptr(), mask.data_ptr<int64_t>(), rows.data_ptr<int64_t>(),
                                     index.data_ptr<int64_t>(), n, count, s, h, length, hidden.element_size(),
                                     hidden_out.data_ptr(), mask_out.data_ptr<int64_t>(), rows_out.data_ptr<int64_t>(),
                                     c10::cuda::getCurrentCUDAStream()),
             "fastbert_compact_gather");
  return {hidden_out, mask_out, rows_out};
}

}  // namespace fastbert

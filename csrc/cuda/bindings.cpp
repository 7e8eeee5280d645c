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

std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_head_cuda(const at::Tensor& hidden, const at::Tensor& mask,
                                                             const FoldedWeights& w, int64_t num_heads,
                                                             double speed) {
  check_hidden_and_mask(hidden, mask);
  TORCH_CHECK(hidden.is_cuda(), "exit_head_cuda needs CUDA tensors, got ", hidden.device());
  const int64_t r = check_folded_weights(hidden, w, num_heads);
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
  if (n == 0) return {logits, uncertainty, exits};
  const at::Tensor projected = at::linear(hidden.view({n * s, h}), w.w_in).to(at::kFloat).contiguous();
  check_cuda(fastbert_exit_head_rows(projected.data_ptr<float>(), mask.data_ptr<int64_t>(), n, s, r, num_heads, c,
                                     w.b_in.data_ptr<float>(), w.w_qk.data_ptr<float>(), w.b_qk.data_ptr<float>(),
                                     w.w_ov.data_ptr<float>(), w.b_ov.data_ptr<float>(), w.w_pool.data_ptr<float>(),
                                     w.b_pool.data_ptr<float>(), w.w_cls.data_ptr<float>(), w.b_cls.data_ptr<float>(),
                                     static_cast<float>(speed), logits.data_ptr<float>(),
                                     uncertainty.data_ptr<float>(), exits.data_ptr<bool>(),
                                     c10::cuda::getCurrentCUDAStream()),
             "fastbert_exit_head_rows");
  return {logits, uncertainty, exits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> compact_cuda(const at::Tensor& hidden, const at::Tensor& mask,
                                                                 const at::Tensor& rows, const at::Tensor& keep,
                                                                 bool trim) {
  check_hidden_and_mask(hidden, mask);
  check_rows_and_keep(hidden, rows, keep);
  TORCH_CHECK(hidden.is_cuda(), "compact_cuda needs CUDA tensors, got ", hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t n = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto index = at::empty({n}, rows.options());
  auto stats = at::empty({3}, rows.options());
  check_cuda(fastbert_compact_plan(keep.data_ptr<bool>(), mask.data_ptr<int64_t>(), n, s, trim ? 1 : 0,
                                   index.data_ptr<int64_t>(), stats.data_ptr<int64_t>(), stream),
             "fastbert_compact_plan");
  // The one host sync of a layer: the survivors' count and length size the outputs, the fewest
  // real tokens say whether the survivors still need an attention mask.
  const at::Tensor host_stats = stats.cpu();
  const int64_t* plan = host_stats.data_ptr<int64_t>();
  const int64_t m = plan[0], length = plan[1];
  const bool padded = plan[2] < length;
  if (m == n && length == s) return {hidden, mask, rows, padded};  // everyone stays, nothing trimmed: no copy
  auto hidden_out = at::empty({m, length, h}, hidden.options());
  auto mask_out = at::empty({m, length}, mask.options());
  auto rows_out = at::empty({m}, rows.options());
  check_cuda(fastbert_compact_gather(hidden.data_ptr(), mask.data_ptr<int64_t>(), rows.data_ptr<int64_t>(),
                                     index.data_ptr<int64_t>(), m, s, h, length, hidden.element_size(),
                                     hidden_out.data_ptr(), mask_out.data_ptr<int64_t>(), rows_out.data_ptr<int64_t>(),
                                     stream),
             "fastbert_compact_gather");
  return {hidden_out, mask_out, rows_out, padded};
}

}  // namespace fastbert

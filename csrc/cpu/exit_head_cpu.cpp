// Fused FastBERT exit head on CPU: branch (folded attention, CLS query) + softmax + normalised
// entropy + exit decision. The H -> R projection goes to BLAS through at::linear; everything after
// it runs in one pass per row, parallel over rows, in float32.
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <vector>

#include "fastbert/checks.h"
#include "fastbert/exit_head_math.h"
#include "fastbert/kernels.h"

namespace fastbert {

ExitHeadResult exit_head_cpu(const at::Tensor& hidden_in, const at::Tensor& mask_in, at::TensorList weights,
                             int64_t num_heads, double speed) {
  const at::Tensor hidden = hidden_in.contiguous(), mask = mask_in.contiguous();
  const FoldedWeights w = FoldedWeights::from_list(weights);
  check_hidden_and_mask(hidden, mask);
  TORCH_CHECK(hidden.device().is_cpu(), "exit_head_cpu needs CPU tensors, got ", hidden.device());
  const int64_t r = check_folded_weights(hidden, w, num_heads);
  const int64_t n = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  const int64_t c = w.w_cls.size(0);
  const int64_t qk_width = num_heads * r;

  auto logits = at::empty({n, c}, hidden.options().dtype(at::kFloat));
  auto uncertainty = at::empty({n}, hidden.options().dtype(at::kFloat));
  auto exits = at::empty({n}, hidden.options().dtype(at::kBool));
  if (n == 0) return {logits, uncertainty, exits};
  TORCH_CHECK(s > 0, "hidden has an empty sequence axis");

  // z = tanh(x W_in^T + b_in) is the only O(S * H * R) work, so it runs only on the tokens that
  // need it: the real ones, and token 0 whatever its mask (the CLS query). Each row's tokens end
  // up contiguous, in order, at row_start[row]; the GEMM (bias fused) goes to BLAS in hidden's
  // dtype and tanh to ATen's vectorised kernel.
  at::Tensor needed = mask.ne(0);
  needed.select(1, 0).fill_(true);
  const at::Tensor row_count = needed.sum(1);
  const at::Tensor row_start = (row_count.cumsum(0) - row_count).contiguous();
  const int64_t total = row_count.sum().item<int64_t>();
  at::Tensor tokens = hidden.view({n * s, h});
  if (total < n * s) tokens = tokens.index_select(0, needed.view(-1).nonzero().view(-1));
  at::Tensor projected = at::addmm(w.b_in.to(hidden.scalar_type()), tokens, w.w_in.t());
  projected = projected.to(at::kFloat).contiguous();
  projected.tanh_();

  const float* a_all = projected.data_ptr<float>();
  const int64_t* mask_all = mask.data_ptr<int64_t>();
  const int64_t* start_all = row_start.data_ptr<int64_t>();
  const int64_t* count_all = row_count.data_ptr<int64_t>();
  const float* w_qk = w.w_qk.data_ptr<float>();
  const float* b_qk = w.b_qk.data_ptr<float>();
  const float* w_ov = w.w_ov.data_ptr<float>();
  const float* b_ov = w.b_ov.data_ptr<float>();
  const float* w_pool = w.w_pool.data_ptr<float>();
  const float* b_pool = w.b_pool.data_ptr<float>();
  const float* w_cls = w.w_cls.data_ptr<float>();
  const float* b_cls = w.b_cls.data_ptr<float>();
  float* logits_out = logits.data_ptr<float>();
  float* uncertainty_out = uncertainty.data_ptr<float>();
  bool* exits_out = exits.data_ptr<bool>();
  const float threshold = static_cast<float>(speed);

  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(qk_width), pooled_in(qk_width), out(r), pooled(r), row_logits(c);
    for (int64_t row = begin; row < end; ++row) {
      const float* a = a_all + start_all[row] * r;  // z of this row's needed tokens, token 0 first
      const int64_t count = count_all[row];

      // q'_j = W_qk,j z_0 + b_qk,j  (the CLS token's query, folded through W_k).
      for (int64_t i = 0; i < qk_width; ++i) query[i] = affine_row(w_qk, b_qk, a, i, r);

      // zbar_j = softmax-weighted sum of z_s over the unmasked tokens, one pass (online softmax).
      std::fill(pooled_in.begin(), pooled_in.end(), 0.f);
      std::vector<OnlineSoftmax> state(num_heads, online_softmax_start());
      // Every needed token is a real key, except token 0 when its own mask is 0 (left padding).
      for (int64_t tok = mask_all[row * s] == 0 ? 1 : 0; tok < count; ++tok) {
        const float* z = a + tok * r;
        for (int64_t j = 0; j < num_heads; ++j) {
          float old_scale, weight;
          online_softmax_update(state[j], dot(query.data() + j * r, z, r), &old_scale, &weight);
          float* acc = pooled_in.data() + j * r;
          for (int64_t k = 0; k < r; ++k) acc[k] = acc[k] * old_scale + weight * z[k];
        }
      }
      for (int64_t j = 0; j < num_heads; ++j) {
        const float inv = 1.f / state[j].denominator;
        for (int64_t k = 0; k < r; ++k) pooled_in[j * r + k] *= inv;
      }

      for (int64_t i = 0; i < r; ++i) out[i] = affine_row(w_ov, b_ov, pooled_in.data(), i, qk_width);
      for (int64_t i = 0; i < r; ++i) pooled[i] = tanhf(affine_row(w_pool, b_pool, out.data(), i, r));
      for (int64_t i = 0; i < c; ++i) row_logits[i] = affine_row(w_cls, b_cls, pooled.data(), i, r);

      const float u = normalized_entropy(row_logits.data(), c);
      std::copy(row_logits.begin(), row_logits.end(), logits_out + row * c);
      uncertainty_out[row] = u;
      exits_out[row] = should_exit(u, threshold);
    }
  });
  return {logits, uncertainty, exits};
}

}  // namespace fastbert

// Fused FastBERT exit head on CPU: branch (folded attention, CLS query) + softmax + the exit
// criterion's uncertainty + the exit decision (patience included). The H -> R projection goes to BLAS through at::linear; everything after
// it runs in one pass per row, parallel over rows, in float32.
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <vector>

#include "fastbert/checks.h"
#include "fastbert/exit_head_math.h"
#include "fastbert/kernels.h"

namespace fastbert {

namespace {

// Compiled twice on x86-64 Linux with GCC: for AVX2 + FMA and for the baseline, picked once at
// load time by the CPU (an ifunc). The per-row matvecs are about 100K multiply-adds at R = 128;
// the baseline build's SSE2 runs them at a third of the speed, which shows at batch 1.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FB_CPU_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define FB_CPU_CLONES
#endif

// What every row reads: the projected tokens (tanh applied), the mask, where each row's needed
// tokens start and how many there are, the sizes, and the folded weights after W_in.
struct RowInputs {
  const float* a_all;
  const int64_t* mask_all;
  const int64_t* start_all;
  const int64_t* count_all;
  int64_t s, r, num_heads, c;
  const float *w_qk, *b_qk, *w_ov, *b_ov, *w_pool, *b_pool, *w_cls, *b_cls;
  FastbertExitRule rule;
  const int64_t* streak_in;  // [N, 2] or null (the first student)
};

// Where a row's results go.
struct RowOutputs {
  float* logits;
  float* uncertainty;
  bool* exits;
  int64_t* streak;
};

// Per-thread buffers, reused across the rows a thread runs.
struct RowScratch {
  std::vector<float> query, pooled_in, out, pooled, row_logits;
  std::vector<OnlineSoftmax> state;
  RowScratch(int64_t qk_width, int64_t r, int64_t c, int64_t num_heads)
      : query(qk_width), pooled_in(qk_width), out(r), pooled(r), row_logits(c), state(num_heads) {}
};

FB_CPU_CLONES void exit_head_row(const RowInputs& in, int64_t row, RowScratch& t, const RowOutputs& out) {
  const int64_t r = in.r, s = in.s, c = in.c, num_heads = in.num_heads, qk_width = num_heads * r;
  const float* a = in.a_all + in.start_all[row] * r;  // z of this row's needed tokens, token 0 first
  const int64_t count = in.count_all[row];

  // q'_j = W_qk,j z_0 + b_qk,j  (the CLS token's query, folded through W_k).
  for (int64_t i = 0; i < qk_width; ++i) t.query[i] = affine_row(in.w_qk, in.b_qk, a, i, r);

  // zbar_j = softmax-weighted sum of z_s over the unmasked tokens, one pass (online softmax).
  std::fill(t.pooled_in.begin(), t.pooled_in.end(), 0.f);
  std::fill(t.state.begin(), t.state.end(), online_softmax_start());
  // Every needed token is a real key, except token 0 when its own mask is 0 (left padding).
  for (int64_t tok = in.mask_all[row * s] == 0 ? 1 : 0; tok < count; ++tok) {
    const float* z = a + tok * r;
    for (int64_t j = 0; j < num_heads; ++j) {
      float old_scale, weight;
      online_softmax_update(t.state[j], dot(t.query.data() + j * r, z, r), &old_scale, &weight);
      float* acc = t.pooled_in.data() + j * r;
      for (int64_t k = 0; k < r; ++k) acc[k] = acc[k] * old_scale + weight * z[k];
    }
  }
  for (int64_t j = 0; j < num_heads; ++j) {
    const float inv = 1.f / t.state[j].denominator;
    for (int64_t k = 0; k < r; ++k) t.pooled_in[j * r + k] *= inv;
  }

  for (int64_t i = 0; i < r; ++i) t.out[i] = affine_row(in.w_ov, in.b_ov, t.pooled_in.data(), i, qk_width);
  for (int64_t i = 0; i < r; ++i) t.pooled[i] = tanhf(affine_row(in.w_pool, in.b_pool, t.out.data(), i, r));
  for (int64_t i = 0; i < c; ++i) t.row_logits[i] = affine_row(in.w_cls, in.b_cls, t.pooled.data(), i, r);

  const ExitMoments moments = exit_moments(t.row_logits.data(), c, in.rule.inv_temperature);
  const float u = exit_uncertainty(moments, in.rule.criterion, c, in.rule.inv_temperature);
  std::copy(t.row_logits.begin(), t.row_logits.end(), out.logits + row * c);
  out.uncertainty[row] = u;
  const int64_t* previous = in.streak_in == nullptr ? nullptr : in.streak_in + 2 * row;
  out.exits[row] = update_streak(exit_argmax(moments), u, in.rule, previous, out.streak + 2 * row);
}

}  // namespace

ExitHeadResult exit_head_cpu(const at::Tensor& hidden_in, const at::Tensor& mask_in, at::TensorList weights,
                             int64_t num_heads, double speed, c10::string_view criterion, double temperature,
                             int64_t patience, const std::optional<at::Tensor>& streak_in) {
  const at::Tensor hidden = hidden_in.contiguous(), mask = mask_in.contiguous();
  const FoldedWeights w = FoldedWeights::from_list(weights);
  check_hidden_and_mask(hidden, mask);
  TORCH_CHECK(hidden.device().is_cpu(), "exit_head_cpu needs CPU tensors, got ", hidden.device());
  const int64_t r = check_folded_weights(hidden, w, num_heads);
  const FastbertExitRule rule = check_exit_rule(hidden, speed, criterion, temperature, patience, streak_in);
  const at::Tensor previous = streak_in.has_value() ? streak_in->contiguous() : at::Tensor();
  const int64_t n = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  const int64_t c = w.w_cls.size(0);
  const int64_t qk_width = num_heads * r;

  auto logits = at::empty({n, c}, hidden.options().dtype(at::kFloat));
  auto uncertainty = at::empty({n}, hidden.options().dtype(at::kFloat));
  auto exits = at::empty({n}, hidden.options().dtype(at::kBool));
  auto streak = at::empty({n, 2}, hidden.options().dtype(at::kLong));
  if (n == 0) return {logits, uncertainty, exits, streak};
  TORCH_CHECK(s > 0, "hidden has an empty sequence axis");

  // z = tanh(x W_in^T + b_in) is the only O(S * H * R) work, so it runs only on the tokens that
  // need it: the real ones, and token 0 whatever its mask (the CLS query). Each row's tokens end
  // up contiguous, in order, at row_start[row]; the GEMM (bias fused) goes to BLAS in hidden's
  // dtype and tanh to ATen's vectorised kernel. The bookkeeping is a plain loop over the mask:
  // at batch 1 a handful of ATen calls for it cost more than the loop.
  const int64_t* mask_all = mask.data_ptr<int64_t>();
  std::vector<int64_t> row_start(n), row_count(n), needed_tokens;
  int64_t total = 0;
  for (int64_t row = 0; row < n; ++row) {
    int64_t count = 0;
    for (int64_t t = 0; t < s; ++t) count += (t == 0 || mask_all[row * s + t] != 0) ? 1 : 0;
    row_start[row] = total;
    row_count[row] = count;
    total += count;
  }
  at::Tensor tokens = hidden.view({n * s, h});
  if (total < n * s) {
    needed_tokens.reserve(total);
    for (int64_t i = 0; i < n * s; ++i) {
      if (i % s == 0 || mask_all[i] != 0) needed_tokens.push_back(i);
    }
    const at::Tensor index = at::from_blob(needed_tokens.data(), {total}, at::TensorOptions().dtype(at::kLong));
    tokens = tokens.index_select(0, index);
  }
  at::Tensor projected = at::addmm(w.b_in.to(hidden.scalar_type()), tokens, w.w_in.t());
  projected = projected.to(at::kFloat).contiguous();
  projected.tanh_();

  const RowInputs in{projected.data_ptr<float>(), mask_all, row_start.data(), row_count.data(), s, r, num_heads, c,
                     w.w_qk.data_ptr<float>(), w.b_qk.data_ptr<float>(), w.w_ov.data_ptr<float>(),
                     w.b_ov.data_ptr<float>(), w.w_pool.data_ptr<float>(), w.b_pool.data_ptr<float>(),
                     w.w_cls.data_ptr<float>(), w.b_cls.data_ptr<float>(), rule,
                     previous.defined() ? previous.data_ptr<int64_t>() : nullptr};
  const RowOutputs out{logits.data_ptr<float>(), uncertainty.data_ptr<float>(), exits.data_ptr<bool>(),
                       streak.data_ptr<int64_t>()};
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    RowScratch scratch(qk_width, r, c, num_heads);
    for (int64_t row = begin; row < end; ++row) exit_head_row(in, row, scratch, out);
  });
  return {logits, uncertainty, exits, streak};
}

}  // namespace fastbert

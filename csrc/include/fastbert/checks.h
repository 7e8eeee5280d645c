// Input checks shared by the CPU and CUDA torch bindings. TORCH_CHECK survives release builds and
// `python -O`, and its message names the offending argument, shape or dtype.
#pragma once

#include <torch/types.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "fastbert/exit_rule.h"
#include "fastbert/folded_weights.h"

namespace fastbert {

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name) {
  TORCH_CHECK(t.dim() == rank, name, " must have ", rank, " dimensions, got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& reference, const char* name) {
  TORCH_CHECK(t.device() == reference.device(), name, " is on ", t.device(), " but hidden is on ",
              reference.device());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_hidden_dtype(const at::Tensor& hidden) {
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "hidden must be float32, float16 or bfloat16, got ", dtype);
}

// The folded exit-head weights as tensors, unpacked from the op's `Tensor[] weights` (the order is
// FASTBERT_FOLDED_WEIGHTS, fastbert/folded_weights.h).
struct FoldedWeights {
#define FASTBERT_TENSOR_FIELD(name) at::Tensor name;
  FASTBERT_FOLDED_WEIGHTS(FASTBERT_TENSOR_FIELD)
#undef FASTBERT_TENSOR_FIELD

  static FoldedWeights from_list(at::TensorList list) {
    TORCH_CHECK(static_cast<int>(list.size()) == kNumFoldedWeights, "weights must hold the ", kNumFoldedWeights,
                " folded tensors (", kFoldedWeightNames, "), got ", list.size());
    FoldedWeights w;
    int i = 0;
#define FASTBERT_UNPACK(name) w.name = list[i++];
    FASTBERT_FOLDED_WEIGHTS(FASTBERT_UNPACK)
#undef FASTBERT_UNPACK
    return w;
  }
};

// Checks the folded weights against hidden [N, S, H] and num_heads; returns R (branch width).
inline int64_t check_folded_weights(const at::Tensor& hidden, const FoldedWeights& w, int64_t num_heads) {
  TORCH_CHECK(num_heads > 0, "num_heads must be positive, got ", num_heads);
  check_rank(w.w_in, 2, "w_in");
  const int64_t r = w.w_in.size(0);
  const int64_t h = hidden.size(2);
  check_shape(w.w_in, {r, h}, "w_in");
  TORCH_CHECK(w.w_in.scalar_type() == hidden.scalar_type(), "w_in must have hidden's dtype ",
              hidden.scalar_type(), ", got ", w.w_in.scalar_type());
  check_rank(w.w_cls, 2, "w_cls");
  const int64_t c = w.w_cls.size(0);
  TORCH_CHECK(c >= 2, "the branch needs at least 2 classes, got ", c);
  const std::vector<std::pair<const at::Tensor*, std::vector<int64_t>>> expected = {
      {&w.b_in, {r}},          {&w.w_qk, {num_heads * r, r}}, {&w.b_qk, {num_heads * r}},
      {&w.w_ov, {r, num_heads * r}}, {&w.b_ov, {r}},       {&w.w_pool, {r, r}},
      {&w.b_pool, {r}},        {&w.w_cls, {c, r}},            {&w.b_cls, {c}}};
  const char* names[] = {"b_in", "w_qk", "b_qk", "w_ov", "b_ov", "w_pool", "b_pool", "w_cls", "b_cls"};
  for (size_t i = 0; i < expected.size(); ++i) {
    const at::Tensor& t = *expected[i].first;
    check_shape(t, expected[i].second, names[i]);
    check_dtype(t, at::kFloat, names[i]);
    check_same_device(t, hidden, names[i]);
    TORCH_CHECK(t.is_contiguous(), names[i], " must be contiguous");
  }
  check_same_device(w.w_in, hidden, "w_in");
  return r;
}

// Checks hidden [N, S, H] and mask [N, S] int64 for the exit head and compaction.
inline void check_hidden_and_mask(const at::Tensor& hidden, const at::Tensor& mask) {
  check_rank(hidden, 3, "hidden");
  check_hidden_dtype(hidden);
  TORCH_CHECK(hidden.is_contiguous(), "hidden must be contiguous");
  check_rank(mask, 2, "mask");
  check_dtype(mask, at::kLong, "mask");
  check_shape(mask, {hidden.size(0), hidden.size(1)}, "mask");
  check_same_device(mask, hidden, "mask");
  TORCH_CHECK(mask.is_contiguous(), "mask must be contiguous");
}

// Checks keep [N] bool and mask [N, S] int64 for the compaction plan.
inline void check_keep_and_mask(const at::Tensor& keep, const at::Tensor& mask) {
  check_rank(mask, 2, "mask");
  check_dtype(mask, at::kLong, "mask");
  TORCH_CHECK(mask.is_contiguous(), "mask must be contiguous");
  check_dtype(keep, at::kBool, "keep");
  check_shape(keep, {mask.size(0)}, "keep");
  TORCH_CHECK(keep.device() == mask.device(), "keep is on ", keep.device(), " but mask is on ", mask.device());
  TORCH_CHECK(keep.is_contiguous(), "keep must be contiguous");
}

// Checks the gather's inputs: rows [N] int64, index [N] int64 (kept rows first), and the plan's
// count <= N and length <= S.
inline void check_gather(const at::Tensor& hidden, const at::Tensor& rows, const at::Tensor& index, int64_t count,
                         int64_t length) {
  const int64_t n = hidden.size(0);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{rows, "rows"}, {index, "index"}}) {
    check_dtype(t, at::kLong, name);
    check_shape(t, {n}, name);
    check_same_device(t, hidden, name);
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  }
  TORCH_CHECK(count >= 0 && count <= n, "count must be in [0, ", n, "], got ", count);
  TORCH_CHECK(length >= 0 && length <= hidden.size(1), "length must be in [0, ", hidden.size(1), "], got ", length);
}

// The exit rule from the op's arguments, checked: a known criterion (by name), T > 0 finite,
// speed in [0, 1], patience >= 1, and the streak state [N, 2] int64 on hidden's device if given.
inline FastbertExitRule check_exit_rule(const at::Tensor& hidden, double speed, c10::string_view criterion,
                                        double temperature, int64_t patience,
                                        const std::optional<at::Tensor>& streak) {
  int index = -1;
  int i = 0;
#define FASTBERT_MATCH_CRITERION(name) \
  if (criterion == #name) index = i;   \
  ++i;
  FASTBERT_EXIT_CRITERIA(FASTBERT_MATCH_CRITERION)
#undef FASTBERT_MATCH_CRITERION
  TORCH_CHECK(index >= 0, "unknown exit criterion '", std::string(criterion), "'; known: ", kExitCriterionNames);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature must be positive and finite, got ",
              temperature);
  TORCH_CHECK(speed >= 0 && speed <= 1, "speed must be in [0, 1], got ", speed);
  TORCH_CHECK(patience >= 1, "patience must be at least 1, got ", patience);
  if (streak.has_value()) {
    check_dtype(*streak, at::kLong, "streak");
    check_shape(*streak, {hidden.size(0), 2}, "streak");
    check_same_device(*streak, hidden, "streak");
  }
  return FastbertExitRule{index, static_cast<float>(1.0 / temperature), static_cast<float>(speed), patience};
}

}  // namespace fastbert

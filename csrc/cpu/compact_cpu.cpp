// Compaction on CPU, in two ops: the plan (which rows survive, how long the longest is, whether
// padding is left) and the gather of the surviving rows of hidden, mask and the original-row map
// into fresh dense tensors trimmed to the plan's length. The caller reads the plan's stats once
// in between (it sizes the outputs) and skips the gather when nothing changes. Rows are copied
// with memcpy, so the result is bit-exact; the copies run in parallel over rows.
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "fastbert/checks.h"
#include "fastbert/kernels.h"

namespace fastbert {

CompactPlan compact_plan_cpu(const at::Tensor& keep_in, const at::Tensor& mask_in, bool trim) {
  const at::Tensor keep = keep_in.contiguous(), mask = mask_in.contiguous();
  check_keep_and_mask(keep, mask);
  TORCH_CHECK(mask.device().is_cpu(), "compact_plan_cpu needs CPU tensors, got ", mask.device());
  const int64_t n = mask.size(0), s = mask.size(1);
  const bool* keep_ptr = keep.data_ptr<bool>();
  const int64_t* mask_ptr = mask.data_ptr<int64_t>();
  auto index = at::empty({n}, mask.options());
  auto stats = at::empty({3}, mask.options());
  int64_t* index_ptr = index.data_ptr<int64_t>();

  // Survivors in input order (then -1), the longest survivor (index after its last used column)
  // and the fewest real tokens of a survivor: fewer than `length` means padding is left.
  int64_t kept = 0;
  int64_t length = trim ? 0 : s;
  int64_t fewest = s;
  for (int64_t i = 0; i < n; ++i) {
    if (!keep_ptr[i]) continue;
    index_ptr[kept++] = i;
    int64_t tokens = 0;
    for (int64_t t = 0; t < s; ++t) tokens += mask_ptr[i * s + t] != 0;
    fewest = std::min(fewest, tokens);
    if (trim) {
      for (int64_t t = s - 1; t >= length; --t) {
        if (mask_ptr[i * s + t] != 0) {
          length = t + 1;
          break;
        }
      }
    }
  }
  std::fill(index_ptr + kept, index_ptr + n, int64_t{-1});
  int64_t* stats_ptr = stats.data_ptr<int64_t>();
  stats_ptr[0] = kept;
  stats_ptr[1] = length;
  stats_ptr[2] = fewest;
  return {index, stats};
}

Compacted compact_gather_cpu(const at::Tensor& hidden_in, const at::Tensor& mask_in, const at::Tensor& rows_in,
                             const at::Tensor& index_in, int64_t count, int64_t length) {
  const at::Tensor hidden = hidden_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor rows = rows_in.contiguous(), index = index_in.contiguous();
  check_hidden_and_mask(hidden, mask);
  check_gather(hidden, rows, index, count, length);
  TORCH_CHECK(hidden.device().is_cpu(), "compact_gather_cpu needs CPU tensors, got ", hidden.device());
  const int64_t n = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  auto hidden_out = at::empty({count, length, h}, hidden.options());
  auto mask_out = at::empty({count, length}, mask.options());
  auto rows_out = at::empty({count}, rows.options());
  const int64_t element = hidden.element_size();
  const auto* src = static_cast<const char*>(hidden.data_ptr());
  auto* dst = static_cast<char*>(hidden_out.data_ptr());
  const int64_t* mask_ptr = mask.data_ptr<int64_t>();
  const int64_t* rows_ptr = rows.data_ptr<int64_t>();
  const int64_t* index_ptr = index.data_ptr<int64_t>();
  int64_t* mask_dst = mask_out.data_ptr<int64_t>();
  int64_t* rows_dst = rows_out.data_ptr<int64_t>();
  for (int64_t k = 0; k < count; ++k) {
    TORCH_CHECK(index_ptr[k] >= 0 && index_ptr[k] < n, "index[", k, "] = ", index_ptr[k], " is not a row of [0, ", n,
                ")");
  }

  // A kept row's first `length` tokens are contiguous in both layouts: one memcpy per row.
  const int64_t row_bytes = length * h * element;
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i = index_ptr[k];
      if (row_bytes > 0) std::memcpy(dst + k * row_bytes, src + i * s * h * element, row_bytes);
      if (length > 0) std::memcpy(mask_dst + k * length, mask_ptr + i * s, length * sizeof(int64_t));
      rows_dst[k] = rows_ptr[i];
    }
  });
  return {hidden_out, mask_out, rows_out};
}

}  // namespace fastbert

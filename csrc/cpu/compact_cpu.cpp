// Compaction on CPU: gather the surviving rows of hidden, mask and the original-row map into dense
// tensors, trimming the sequence axis to the longest survivor. Rows are copied with memcpy, so
// the result is bit-exact; the copies run in parallel over rows.
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "fastbert/checks.h"
#include "fastbert/kernels.h"

namespace fastbert {

std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> compact_cpu(const at::Tensor& hidden, const at::Tensor& mask,
                                                          const at::Tensor& rows, const at::Tensor& keep,
                                                          bool trim) {
  check_hidden_and_mask(hidden, mask);
  check_rows_and_keep(hidden, rows, keep);
  TORCH_CHECK(hidden.device().is_cpu(), "compact_cpu needs CPU tensors, got ", hidden.device());
  const int64_t n = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  const bool* keep_ptr = keep.data_ptr<bool>();
  const int64_t* mask_ptr = mask.data_ptr<int64_t>();

  // Survivors in input order, the longest survivor (index after its last used column) and the
  // fewest real tokens of a survivor: fewer than `length` means the survivors still carry padding.
  std::vector<int64_t> index;
  index.reserve(n);
  int64_t length = trim ? 0 : s;
  int64_t fewest = s;
  for (int64_t i = 0; i < n; ++i) {
    if (!keep_ptr[i]) continue;
    index.push_back(i);
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
  const int64_t m = static_cast<int64_t>(index.size());
  const bool padded = fewest < length;
  // Everyone stays and nothing is trimmed: the inputs are the answer (no copy; the caller also
  // keeps its layer mask). Only the eager path sees this; the registered op clones aliases.
  if (m == n && length == s) return {hidden, mask, rows, padded};

  auto hidden_out = at::empty({m, length, h}, hidden.options());
  auto mask_out = at::empty({m, length}, mask.options());
  auto rows_out = at::empty({m}, rows.options());
  const int64_t element = hidden.element_size();
  const auto* src = static_cast<const char*>(hidden.data_ptr());
  auto* dst = static_cast<char*>(hidden_out.data_ptr());
  const int64_t* rows_in = rows.data_ptr<int64_t>();
  int64_t* mask_dst = mask_out.data_ptr<int64_t>();
  int64_t* rows_dst = rows_out.data_ptr<int64_t>();

  // A kept row's first `length` tokens are contiguous in both layouts: one memcpy per row.
  const int64_t row_bytes = length * h * element;
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i = index[k];
      if (row_bytes > 0) std::memcpy(dst + k * row_bytes, src + i * s * h * element, row_bytes);
      if (length > 0) std::memcpy(mask_dst + k * length, mask_ptr + i * s, length * sizeof(int64_t));
      rows_dst[k] = rows_in[i];
    }
  });
  return {hidden_out, mask_out, rows_out, padded};
}

}  // namespace fastbert

// Row indexing for a tensor broadcast against a [rows, N] view of another tensor
// (e.g. an attention mask broadcast to the scores), without materializing it.
// Usable from host code, CUDA kernels and emulated kernels.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(PYLLM_EMULATED)
#define PYLLM_HOST_DEVICE __host__ __device__
#else
#define PYLLM_HOST_DEVICE
#endif

namespace pyllm {

struct RowIndexer {
  static constexpr int kMaxDims = 8;
  int ndim = 0;                 // leading dims after coalescing
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
  int64_t col_stride = 0;       // stride along the last dim (0 when broadcast)

  // Offset (in elements) of the start of `row`, rows numbered row-major over the
  // leading dims of the broadcast shape.
  PYLLM_HOST_DEVICE int64_t offset(int64_t row) const {
    int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t i = row % sizes[d];
      row /= sizes[d];
      off += i * strides[d];
    }
    return off;
  }
};

}  // namespace pyllm

#include <ATen/ExpandUtils.h>
#include <ATen/core/Tensor.h>
namespace pyllm {
// `t` must already be expanded to the full shape (t.expand(shape)): size-1 and
// broadcast dims then have stride 0. Adjacent leading dims are merged when possible.
inline RowIndexer make_row_indexer(const at::Tensor& t) {
  RowIndexer r;
  const int64_t nd = t.dim();
  r.col_stride = nd > 0 ? t.stride(nd - 1) : 0;
  int64_t sizes[64], strides[64];
  int n = 0;
  for (int64_t d = 0; d + 1 < nd; ++d) {
    const int64_t s = t.size(d), st = t.stride(d);
    if (s == 1) continue;
    if (n > 0 && strides[n - 1] == st * s) {  // merge with previous dim
      sizes[n - 1] *= s;
      strides[n - 1] = st;
    } else {
      sizes[n] = s;
      strides[n] = st;
      ++n;
    }
  }
  TORCH_CHECK(n <= RowIndexer::kMaxDims, "pyllm: mask has too many non-mergeable dims (",
              n, " > ", RowIndexer::kMaxDims, ")");
  r.ndim = n;
  for (int i = 0; i < n; ++i) {
    r.sizes[i] = sizes[i];
    r.strides[i] = strides[i];
  }
  return r;
}

// Validates an optional mask (bool = keep, or additive float; `allow_double` also accepts
// fp64) against `ref` and the broadcast target shape `full`, and returns it expanded to
// `full` as a view (stride 0 on broadcast dims; additive masks converted to fp32 when
// `to_float`), filling `mi`. Returns an undefined tensor when there is no mask.
inline at::Tensor expand_mask(const std::optional<at::Tensor>& mask, const at::Tensor& ref,
                              at::IntArrayRef full, const char* name, const char* ref_name,
                              RowIndexer& mi, bool to_float = false, bool allow_double = false) {
  if (!mask.has_value() || !mask->defined()) return {};
  const auto mt = mask->scalar_type();
  const bool ok_float = mt == at::kFloat || mt == at::kHalf || mt == at::kBFloat16 ||
                        (allow_double && mt == at::kDouble);
  TORCH_CHECK(mt == at::kBool || ok_float, "pyllm: ", name,
              " must be bool (True = keep/attend) or a float additive mask, got ", mt);
  TORCH_CHECK(mask->device() == ref.device(), "pyllm: ", name, " is on ", mask->device(), " but ",
              ref_name, " is on ", ref.device());
  TORCH_CHECK(mask->dim() <= (int64_t)full.size() && at::infer_size(mask->sizes(), full) == full,
              "pyllm: ", name, " of shape ", mask->sizes(), " is not broadcastable to shape ", full);
  at::Tensor m = (mt != at::kBool && to_float) ? mask->to(at::kFloat) : *mask;
  m = m.expand(full);
  mi = make_row_indexer(m);
  return m;
}

}  // namespace pyllm

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
}  // namespace pyllm

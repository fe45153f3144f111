// CPU kernels: softmax(input * scale + mask) over the last dim, with bool or additive
// masks of any broadcastable shape and strides (never materialized), top-left causal
// masking, and zeros (not NaN) for fully-masked rows. One pass over the input per row.
#include <ATen/ATen.h>

#include <algorithm>
#include <torch/library.h>

#include <limits>

#include "../include/pyllm/broadcast.h"
#include "../include/pyllm/checks.h"
#include "../include/pyllm/ops/softmax.h"
#include "common.h"

namespace pyllm::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Fills buf[0..n) with input*scale (+ mask), -inf where masked; returns the row max.
// Contiguous bool / fp32 masks (and none) take fused vectorized paths; other mask
// dtypes and strides take a generic gather.
template <typename T, typename M>
inline float masked_scores(const T* x, const M* m, int64_t mstride, int64_t n, float scale,
                           float* buf) {
  const float* xr = load_row(x, buf, n);
  if constexpr (std::is_same_v<M, void>) {
    return row::scale_max(xr, buf, n, scale);
  } else {
    if (mstride == 1) {
      if constexpr (std::is_same_v<M, bool>) return row::scale_keep_max(xr, m, buf, n, scale);
      if constexpr (std::is_same_v<M, float>) return row::scale_add_max(xr, m, buf, n, scale);
    }
    row::scale(xr, buf, n, scale);
    if constexpr (std::is_same_v<M, bool>) {
      for (int64_t j = 0; j < n; ++j)
        if (!m[j * mstride]) buf[j] = kNegInf;
    } else {
      for (int64_t j = 0; j < n; ++j) buf[j] += static_cast<float>(m[j * mstride]);
    }
    return row::max(buf, n);
  }
}

template <typename T, typename M>
void softmax_rows(const at::Tensor& input, const at::Tensor& mask_full, const RowIndexer& mi,
                  at::Tensor& out, float scale, bool causal) {
  const int64_t n = input.size(-1), rows = input.numel() / n;
  const int64_t lq = input.dim() >= 2 ? input.size(-2) : 1;
  const T* x = input.data_ptr<T>();
  T* y = out.data_ptr<T>();
  const M* m = nullptr;
  if constexpr (!std::is_same_v<M, void>) m = static_cast<const M*>(mask_full.data_ptr());
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n);
    for (int64_t r = begin; r < end; ++r) {
      // Causal (top-left): query i attends keys j <= i.
      const int64_t valid = causal ? std::min<int64_t>(n, r % lq + 1) : n;
      const M* mrow = nullptr;
      if constexpr (!std::is_same_v<M, void>) mrow = m + mi.offset(r);
      const float mx = masked_scores<T, M>(x + r * n, mrow, mi.col_stride, valid, scale, buf.data());
      // fp32 output is written in place; other dtypes go through buf.
      float* yr = std::is_same_v<T, float> ? reinterpret_cast<float*>(y + r * n) : buf.data();
      constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
      // A row holding a NaN score is NaN at its visible positions; hidden positions (score -inf)
      // stay 0 in every row (pyllm's non-finite rule).
      auto nan_row = [&]() {
        masked_scores<T, M>(x + r * n, mrow, mi.col_stride, valid, scale, buf.data());
        for (int64_t j = 0; j < valid; ++j) yr[j] = buf[j] == kNegInf ? 0.f : kNaN;
        std::fill(yr + valid, yr + n, 0.f);
      };
      if (mx == kNegInf) {  // fully masked (or all -inf): zeros; visible scores all NaN: NaN there
        const bool nan = std::any_of(buf.data(), buf.data() + valid, [](float v) { return v != v; });
        if (nan) nan_row();
        else std::fill(yr, yr + n, 0.f);
      } else {
        const float s = row::exp_sub_sum(buf.data(), buf.data(), valid, mx);
        if (s != s) {  // a visible NaN score
          nan_row();
        } else {
          row::scale(buf.data(), yr, valid, 1.f / s);
          std::fill(yr + valid, yr + n, 0.f);
        }
      }
      store_row(yr, y + r * n, n);
    }
  });
}

}  // namespace

at::Tensor masked_softmax(const at::Tensor& input_, const std::optional<at::Tensor>& mask,
                          double scale, bool causal) {
  PYLLM_CHECK_FLOAT(input_, "input");
  TORCH_CHECK(input_.dim() >= 1, "pyllm: input must have at least 1 dimension");
  TORCH_CHECK(!causal || input_.dim() >= 2, "pyllm: causal=True needs input with >= 2 dims");
  const at::Tensor input = input_.contiguous();
  at::Tensor out = at::empty_like(input);
  if (input.numel() == 0) return out;
  RowIndexer mi;
  const at::Tensor mfull = expand_mask(mask, input, input.sizes(), "mask", "input", mi);
  const bool has_mask = mfull.defined();
  const float s = (float)scale;
  PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_masked_softmax_cpu", [&] {
    if (!has_mask) {
      softmax_rows<scalar_t, void>(input, mfull, mi, out, s, causal);
    } else if (mfull.scalar_type() == at::kBool) {
      softmax_rows<scalar_t, bool>(input, mfull, mi, out, s, causal);
    } else if (mfull.scalar_type() == at::kFloat) {
      softmax_rows<scalar_t, float>(input, mfull, mi, out, s, causal);
    } else if (mfull.scalar_type() == at::kHalf) {
      softmax_rows<scalar_t, c10::Half>(input, mfull, mi, out, s, causal);
    } else {
      softmax_rows<scalar_t, c10::BFloat16>(input, mfull, mi, out, s, causal);
    }
  });
  return out;
}

at::Tensor masked_softmax_backward(const at::Tensor& grad_out_, const at::Tensor& out_,
                                   double scale) {
  PYLLM_CHECK_FLOAT(out_, "out");
  TORCH_CHECK(grad_out_.sizes() == out_.sizes(), "pyllm: grad_out must have shape ",
              out_.sizes(), ", got ", grad_out_.sizes());
  const at::Tensor y_t = out_.contiguous(), dy_t = grad_out_.to(out_.scalar_type()).contiguous();
  at::Tensor dx = at::empty_like(y_t);
  if (y_t.numel() == 0) return dx;
  const int64_t n = y_t.size(-1), rows = y_t.numel() / n;
  const float s = (float)scale;
  PYLLM_DISPATCH_FLOATING(y_t.scalar_type(), "pyllm_masked_softmax_bwd_cpu", [&] {
    const scalar_t* y = y_t.data_ptr<scalar_t>();
    const scalar_t* dy = dy_t.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> yb(n), dyb(n), dxb(n);
      for (int64_t r = begin; r < end; ++r) {
        const float* yr = load_row(y + r * n, yb.data(), n);
        const float* dyr = load_row(dy + r * n, dyb.data(), n);
        float* dxr = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(dxp + r * n) : dxb.data();
        row::softmax_backward(dyr, yr, dxr, n, s);
        store_row(dxr, dxp + r * n, n);
      }
    });
  });
  return dx;
}

}  // namespace pyllm::cpu

// The CPU kernels of torch.ops.pyllm (schemas: pyllm/ops/).
TORCH_LIBRARY_IMPL(pyllm, CPU, m) {
  m.impl("masked_softmax", &pyllm::cpu::masked_softmax);
  m.impl("masked_softmax_backward", &pyllm::cpu::masked_softmax_backward);
}

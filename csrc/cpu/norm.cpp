// CPU kernels: LayerNorm, add+LayerNorm, RMSNorm (forward and backward).
// fp32 accumulation for every dtype; rows in parallel; two-pass mean/variance on an
// fp32 copy of the row (in cache), which is more accurate than one-pass Welford.
#include <ATen/MemoryOverlap.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../include/pyllm/checks.h"
#include "../include/pyllm/ops/norm.h"
#include "common.h"

namespace pyllm::cpu {
namespace {

// Raw 16-bit words of a bf16 (or any 16-bit) element pointer, for the row primitives.
template <typename T>
uint16_t* bf16_bits(T* p) { return reinterpret_cast<uint16_t*>(p); }
template <typename T>
const uint16_t* bf16_bits(const T* p) { return reinterpret_cast<const uint16_t*>(p); }

const float* opt_float_ptr(const std::optional<at::Tensor>& t, at::Tensor& holder) {
  if (!t.has_value() || !t->defined()) return nullptr;
  holder = t->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const at::Tensor& input_,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          double eps) {
  check_norm_input(input_);
  check_norm_param(weight, input_, "weight");
  check_norm_param(bias, input_, "bias");
  const at::Tensor input = input_.contiguous();
  const int64_t n = input.size(-1), rows = n ? input.numel() / n : 0;
  at::Tensor out = at::empty_like(input);
  auto stat_shape = input.sizes().vec();
  stat_shape.pop_back();
  at::Tensor mean = at::empty(stat_shape, input.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(stat_shape, input.options().dtype(at::kFloat));
  if (input.numel() == 0) return {out, mean.zero_(), rstd.zero_()};
  at::Tensor wh, bh;
  const float* w = opt_float_ptr(weight, wh);
  const float* b = opt_float_ptr(bias, bh);
  PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_layer_norm_cpu", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    float* mp = mean.data_ptr<float>();
    float* rp = rstd.data_ptr<float>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> xb(n), yb(n);
      for (int64_t r = begin; r < end; ++r) {
        const float* xr = load_row(x + r * n, xb.data(), n);
        const float mu = row::mean(xr, n);
        const float var = row::sq_dev_sum(xr, n, mu) / (float)n;
        const float rs = 1.f / std::sqrt(var + (float)eps);
        float* yr = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(y + r * n) : yb.data();
        row::layer_norm(xr, yr, n, mu, rs, w, b);
        store_row(yr, y + r * n, n);
        mp[r] = mu;
        rp[r] = rs;
      }
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm(
    const at::Tensor& input_, const at::Tensor& residual_, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_norm_input(input_);
  check_residual(residual_, input_);
  check_norm_param(weight, input_, "weight");
  check_norm_param(bias, input_, "bias");
  const at::Tensor input = input_.contiguous(), residual = residual_.contiguous();
  const int64_t n = input.size(-1), rows = n ? input.numel() / n : 0;
  at::Tensor out = at::empty_like(input), summed = at::empty_like(input);
  auto stat_shape = input.sizes().vec();
  stat_shape.pop_back();
  at::Tensor mean = at::empty(stat_shape, input.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(stat_shape, input.options().dtype(at::kFloat));
  if (input.numel() == 0) return {out, summed, mean.zero_(), rstd.zero_()};
  at::Tensor wh, bh;
  const float* w = opt_float_ptr(weight, wh);
  const float* b = opt_float_ptr(bias, bh);
  const bool is_bf16 = input.scalar_type() == at::kBFloat16;
  PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_add_layer_norm_cpu", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    const scalar_t* res = residual.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    scalar_t* s = summed.data_ptr<scalar_t>();
    float* mp = mean.data_ptr<float>();
    float* rp = rstd.data_ptr<float>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> xb(n), rb(n), sb(n), yb(n);
      for (int64_t r = begin; r < end; ++r) {
        float* sr = sb.data();
        if (is_bf16) {  // one fused pass: convert, add, round, sum (the in-place op's exact path)
          const float mu = (float)(row::add_bf16_sum(bf16_bits(x + r * n), bf16_bits(res + r * n), sr, n) / (double)n);
          const float rs = 1.f / std::sqrt(row::sq_dev_sum(sr, n, mu) / (float)n + (float)eps);
          row::float_to_bf16(sr, bf16_bits(s + r * n), n);  // exact: already rounded
          row::layer_norm_bf16(sr, bf16_bits(y + r * n), n, mu, rs, w, b);
          mp[r] = mu;
          rp[r] = rs;
          continue;
        }
        const float* xr = load_row(x + r * n, xb.data(), n);
        const float* rr = load_row(res + r * n, rb.data(), n);
        row::add(xr, rr, sr, n);
        store_row(sr, s + r * n, n);
        // Normalize the sum as stored (rounded to the input dtype), as add + layer_norm does.
        round_through(input.scalar_type(), sr, n);
        const float mu = row::mean(sr, n);
        const float var = row::sq_dev_sum(sr, n, mu) / (float)n;
        const float rs = 1.f / std::sqrt(var + (float)eps);
        float* yr = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(y + r * n) : yb.data();
        row::layer_norm(sr, yr, n, mu, rs, w, b);
        store_row(yr, y + r * n, n);
        mp[r] = mu;
        rp[r] = rs;
      }
    });
  });
  return {out, summed, mean, rstd};
}

// In place, for inference: input <- layer_norm(input + residual). Reads two rows, writes one, and
// allocates nothing (no fresh pages to fault in: the out-of-place chain's main cost on the CPU).
void add_layer_norm_inplace(at::Tensor& input, const at::Tensor& residual_,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps) {
  check_norm_input(input);
  check_residual(residual_, input);
  check_norm_param(weight, input, "weight");
  check_norm_param(bias, input, "bias");
  TORCH_CHECK(input.is_contiguous(), "pyllm: add_layer_norm_ needs a contiguous input (it is written in place)");
  // Operands that share memory with the input would be read after rows of it are overwritten: read
  // them from a copy (the residual may be the input itself: each row is read before it is written).
  auto apart = [&](const at::Tensor& t, bool same_ok) {
    const auto st = at::get_overlap_status(input, t);
    return (st == at::MemOverlapStatus::No || (same_ok && st == at::MemOverlapStatus::Full)) ? t : t.clone();
  };
  const at::Tensor residual = apart(residual_, true).contiguous();
  std::optional<at::Tensor> weight_, bias_;
  if (weight.has_value() && weight->defined()) weight_ = apart(*weight, false);
  if (bias.has_value() && bias->defined()) bias_ = apart(*bias, false);
  const int64_t n = input.size(-1), rows = n ? input.numel() / n : 0;
  if (input.numel() == 0) return;
  at::Tensor wh, bh;
  const float* w = opt_float_ptr(weight_, wh);
  const float* b = opt_float_ptr(bias_, bh);
  const at::ScalarType st = input.scalar_type();
  PYLLM_DISPATCH_FLOATING(st, "pyllm_add_layer_norm_inplace_cpu", [&] {
    scalar_t* x = input.data_ptr<scalar_t>();
    const scalar_t* res = residual.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> xb(n), rb(n), sb(n);
      for (int64_t r = begin; r < end; ++r) {
        if (st == at::kBFloat16) {  // the out-of-place op's bf16 path, written into x
          float* sr = sb.data();
          const float mu = (float)(row::add_bf16_sum(bf16_bits(x + r * n), bf16_bits(res + r * n), sr, n) / (double)n);
          const float rs = 1.f / std::sqrt(row::sq_dev_sum(sr, n, mu) / (float)n + (float)eps);
          row::layer_norm_bf16(sr, bf16_bits(x + r * n), n, mu, rs, w, b);
          continue;
        }
        const float* xr = load_row(x + r * n, xb.data(), n);
        const float* rr = load_row(res + r * n, rb.data(), n);
        float* sr = sb.data();
        row::add(xr, rr, sr, n);
        round_through(st, sr, n);  // the sum as x + r would store it
        const float mu = row::mean(sr, n);
        const float var = row::sq_dev_sum(sr, n, mu) / (float)n;
        const float rs = 1.f / std::sqrt(var + (float)eps);
        float* yr = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(x + r * n) : sr;
        row::layer_norm(sr, yr, n, mu, rs, w, b);
        store_row(yr, x + r * n, n);
      }
    });
  });
}

// Shared by LayerNorm and RMSNorm backward: weight/bias grads as partial sums over row chunks.
// The chunks depend on the shape only, never on the thread count, and are added in chunk order
// (sum_partials), so the grads are bit-identical for any torch.set_num_threads (issue 12).
template <typename F>
static void rows_with_partials(int64_t rows, int64_t n, int nparts, at::Tensor& partial, F&& body) {
  const int64_t min_rows = std::max<int64_t>(8, 16384 / std::max<int64_t>(n, 1));  // >= ~64 KiB a chunk
  const int64_t max_chunks = std::max<int64_t>(1, std::min<int64_t>(64, (1 << 21) / (nparts * n)));
  const int64_t nc = std::clamp<int64_t>((rows + min_rows - 1) / min_rows, 1, max_chunks);
  partial = at::zeros({nc, nparts, n}, at::kFloat);
  float* pp = partial.data_ptr<float>();
  const int64_t chunk = (rows + nc - 1) / nc;
  at::parallel_for(0, nc, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t begin = std::min(rows, t * chunk), end = std::min(rows, begin + chunk);
      body(begin, end, pp + t * nparts * n);
    }
  });
}

// partial [chunks, nparts, n] -> [nparts, n], chunks added in order (not at::sum, whose split of
// the reduction may follow the thread count).
static at::Tensor sum_partials(const at::Tensor& partial) {
  const int64_t nc = partial.size(0), m = partial.size(1) * partial.size(2);
  at::Tensor s = at::empty({partial.size(1), partial.size(2)}, partial.options());
  const float* pp = partial.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, m, 4096, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) sp[j] = pp[j];
    for (int64_t c = 1; c < nc; ++c)
      for (int64_t j = b; j < e; ++j) sp[j] += pp[c * m + j];
  });
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& grad_out_, const at::Tensor& input_, const at::Tensor& mean_,
    const at::Tensor& rstd_, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_extra) {
  check_norm_input(input_);
  TORCH_CHECK(grad_out_.sizes() == input_.sizes(), "pyllm: grad_out must have shape ",
              input_.sizes(), ", got ", grad_out_.sizes());
  check_norm_param(weight, input_, "weight");
  const at::Tensor input = input_.contiguous(), dy_t = grad_out_.to(input.scalar_type()).contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const int64_t n = input.size(-1), rows = n ? input.numel() / n : 0;
  const bool has_w = weight.has_value() && weight->defined();
  at::Tensor dx = at::empty_like(input);
  at::Tensor wh;
  const float* w = opt_float_ptr(weight, wh);
  at::Tensor extra;
  if (grad_extra.has_value() && grad_extra->defined())
    extra = grad_extra->to(input.scalar_type()).contiguous();
  at::Tensor partial;
  if (rows > 0) {
    PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_layer_norm_bwd_cpu", [&] {
      const scalar_t* x = input.data_ptr<scalar_t>();
      const scalar_t* dy = dy_t.data_ptr<scalar_t>();
      const scalar_t* ex = extra.defined() ? extra.data_ptr<scalar_t>() : nullptr;
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      const float* mp = mean.data_ptr<float>();
      const float* rp = rstd.data_ptr<float>();
      rows_with_partials(rows, n, 2, partial, [&](int64_t begin, int64_t end, float* part) {
        std::vector<float> xb(n), dyb(n), dxb(n), eb(n);
        for (int64_t r = begin; r < end; ++r) {
          const float* xr = load_row(x + r * n, xb.data(), n);
          const float* dyr = load_row(dy + r * n, dyb.data(), n);
          row::layer_norm_backward(dyr, xr, w, mp[r], rp[r], dxb.data(), part, part + n, n);
          if (ex) row::add(dxb.data(), load_row(ex + r * n, eb.data(), n), dxb.data(), n);
          store_row(dxb.data(), dxp + r * n, n);
        }
      });
    });
  }
  at::Tensor dw, db;
  if (has_w) {
    if (rows > 0) {
      at::Tensor s = sum_partials(partial);
      // copy=true: s[0] and s[1] are views of one buffer; outputs must not alias (schema).
      dw = s[0].to(weight->scalar_type(), /*non_blocking=*/false, /*copy=*/true);
      db = s[1].to(weight->scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    } else {
      dw = at::zeros({n}, weight->options());
      db = at::zeros({n}, weight->options());
    }
  } else {
    dw = at::empty({0}, input.options());
    db = at::empty({0}, input.options());
  }
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& input_,
                                            const std::optional<at::Tensor>& weight, double eps,
                                            std::optional<at::ScalarType> round_dtype,
                                            double weight_offset, at::ScalarType out_dtype) {
  check_norm_input(input_);
  check_norm_param(weight, input_, "weight");
  TORCH_CHECK(is_supported_float(out_dtype), "pyllm: out_dtype must be a float type");
  const at::Tensor input = input_.contiguous();
  const int64_t n = input.size(-1), rows = n ? input.numel() / n : 0;
  at::Tensor out = at::empty(input.sizes(), input.options().dtype(out_dtype));
  auto stat_shape = input.sizes().vec();
  stat_shape.pop_back();
  at::Tensor rstd = at::empty(stat_shape, input.options().dtype(at::kFloat));
  if (input.numel() == 0) return {out, rstd.zero_()};
  at::Tensor wh;
  const float* w = opt_float_ptr(weight, wh);
  const float off = (float)weight_offset;
  const at::ScalarType rd = round_dtype.value_or(at::kFloat);
  PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_rms_norm_cpu", [&] {
    using in_t = scalar_t;
    const in_t* x = input.data_ptr<in_t>();
    float* rp = rstd.data_ptr<float>();
    PYLLM_DISPATCH_FLOATING(out_dtype, "pyllm_rms_norm_cpu_out", [&] {
      scalar_t* y = out.data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
        std::vector<float> xb(n), yb(n);
        for (int64_t r = begin; r < end; ++r) {
          const float* xr = load_row(x + r * n, xb.data(), n);
          const float rs = 1.f / std::sqrt(row::sq_sum(xr, n) / (float)n + (float)eps);
          row::scale(xr, yb.data(), n, rs);
          round_through(rd, yb.data(), n);
          row::mul_weight(yb.data(), w, off, n);
          store_row(yb.data(), y + r * n, n);
          rp[r] = rs;
        }
      });
    });
  });
  return {out, rstd};
}

// Residual add + RMSNorm (a Llama-family decoder layer's "residual + h" then its RMSNorm): the sum
// is stored, rounded to the input dtype, and normalized as stored, in one pass over the two rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& input_, const at::Tensor& residual_,
                                                            const std::optional<at::Tensor>& weight, double eps,
                                                            std::optional<at::ScalarType> round_dtype,
                                                            double weight_offset, at::ScalarType out_dtype) {
  check_norm_input(input_);
  check_residual(residual_, input_);
  check_norm_param(weight, input_, "weight");
  TORCH_CHECK(is_supported_float(out_dtype), "pyllm: out_dtype must be a float type");
  const at::Tensor input = input_.contiguous(), residual = residual_.contiguous();
  const int64_t n = input.size(-1), rows = n ? input.numel() / n : 0;
  at::Tensor out = at::empty(input.sizes(), input.options().dtype(out_dtype));
  at::Tensor summed = at::empty_like(input);
  auto stat_shape = input.sizes().vec();
  stat_shape.pop_back();
  at::Tensor rstd = at::empty(stat_shape, input.options().dtype(at::kFloat));
  if (input.numel() == 0) return {out, summed, rstd.zero_()};
  at::Tensor wh;
  const float* w = opt_float_ptr(weight, wh);
  const float off = (float)weight_offset;
  const at::ScalarType rd = round_dtype.value_or(at::kFloat);
  const at::ScalarType st = input.scalar_type();
  PYLLM_DISPATCH_FLOATING(st, "pyllm_add_rms_norm_cpu", [&] {
    using in_t = scalar_t;
    const in_t* x = input.data_ptr<in_t>();
    const in_t* res = residual.data_ptr<in_t>();
    in_t* s = summed.data_ptr<in_t>();
    float* rp = rstd.data_ptr<float>();
    PYLLM_DISPATCH_FLOATING(out_dtype, "pyllm_add_rms_norm_cpu_out", [&] {
      scalar_t* y = out.data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
        std::vector<float> xb(n), rb(n), sb(n), yb(n);
        for (int64_t r = begin; r < end; ++r) {
          const float* xr = load_row(x + r * n, xb.data(), n);
          const float* rr = load_row(res + r * n, rb.data(), n);
          float* sr = sb.data();
          row::add(xr, rr, sr, n);
          store_row(sr, s + r * n, n);
          round_through(st, sr, n);  // normalize the sum as stored
          const float rs = 1.f / std::sqrt(row::sq_sum(sr, n) / (float)n + (float)eps);
          row::scale(sr, yb.data(), n, rs);
          round_through(rd, yb.data(), n);
          row::mul_weight(yb.data(), w, off, n);
          store_row(yb.data(), y + r * n, n);
          rp[r] = rs;
        }
      });
    });
  });
  return {out, summed, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out_,
                                                     const at::Tensor& input_,
                                                     const at::Tensor& rstd_,
                                                     const std::optional<at::Tensor>& weight,
                                                     std::optional<at::ScalarType> round_dtype,
                                                     double weight_offset) {
  check_norm_input(input_);
  TORCH_CHECK(grad_out_.sizes() == input_.sizes(), "pyllm: grad_out must have shape ",
              input_.sizes(), ", got ", grad_out_.sizes());
  check_norm_param(weight, input_, "weight");
  const at::Tensor input = input_.contiguous(), rstd = rstd_.contiguous();
  const at::Tensor dy_t = grad_out_.to(at::kFloat).contiguous();
  const int64_t n = input.size(-1), rows = n ? input.numel() / n : 0;
  const bool has_w = weight.has_value() && weight->defined();
  at::Tensor dx = at::empty_like(input);
  at::Tensor wh;
  const float* w = opt_float_ptr(weight, wh);
  const float off = (float)weight_offset;
  const at::ScalarType rd = round_dtype.value_or(at::kFloat);
  at::Tensor partial;
  if (rows > 0) {
    PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_rms_norm_bwd_cpu", [&] {
      const scalar_t* x = input.data_ptr<scalar_t>();
      const float* dy = dy_t.data_ptr<float>();
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      const float* rp = rstd.data_ptr<float>();
      rows_with_partials(rows, n, 1, partial, [&](int64_t begin, int64_t end, float* part) {
        std::vector<float> xb(n), nb(n), dxb(n);
        for (int64_t r = begin; r < end; ++r) {
          const float* xr = load_row(x + r * n, xb.data(), n);
          row::scale(xr, nb.data(), n, rp[r]);
          round_through(rd, nb.data(), n);
          row::rms_norm_backward(dy + r * n, xr, nb.data(), w, off, rp[r], dxb.data(),
                                 has_w ? part : nullptr, n);
          store_row(dxb.data(), dxp + r * n, n);
        }
      });
    });
  }
  at::Tensor dw;
  if (has_w) {
    dw = rows > 0 ? sum_partials(partial)[0].to(weight->scalar_type()) : at::zeros({n}, weight->options());
  } else {
    dw = at::empty({0}, input.options());
  }
  return {dx, dw};
}

}  // namespace pyllm::cpu

// The CPU kernels of torch.ops.pyllm (schemas: pyllm/ops/).
TORCH_LIBRARY_IMPL(pyllm, CPU, m) {
  m.impl("layer_norm", &pyllm::cpu::layer_norm);
  m.impl("add_layer_norm", &pyllm::cpu::add_layer_norm);
  m.impl("add_layer_norm_inplace", &pyllm::cpu::add_layer_norm_inplace);
  m.impl("layer_norm_backward", &pyllm::cpu::layer_norm_backward);
  m.impl("rms_norm", &pyllm::cpu::rms_norm);
  m.impl("add_rms_norm", &pyllm::cpu::add_rms_norm);
  m.impl("rms_norm_backward", &pyllm::cpu::rms_norm_backward);
}

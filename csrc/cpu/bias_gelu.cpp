// Fused bias + GELU on the CPU: y = gelu(x + bias) per element, computed in fp32, and its
// backward dx = dy * gelu'(x + bias). Rows of the last dim run in parallel; bias is [N]. The
// element loops are rowops' vectorized bias_gelu (scalar erff/tanhf ran at 0.2x torch's GELU).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../include/pyllm/checks.h"
#include "common.h"

namespace pyllm::cpu {
namespace {

// Calls body(x_row_fp32, bias_or_null, out_row_fp32, row) for every row of `input`.
template <typename scalar_t, typename F>
void for_rows(const at::Tensor& input, int64_t n, F&& body) {
  const int64_t rows = n ? input.numel() / n : 0;
  const scalar_t* x = input.data_ptr<scalar_t>();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> xb(n), yb(n);
    for (int64_t r = begin; r < end; ++r) body(load_row(x + r * n, xb.data(), n), yb.data(), r);
  });
}

}  // namespace

at::Tensor bias_gelu(const at::Tensor& input_, const std::optional<at::Tensor>& bias, bool tanh_approx) {
  check_bias_gelu_args(input_, bias);
  const at::Tensor input = input_.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t n = input.size(-1);
  at::Tensor bholder;
  const float* b = (bias && bias->defined()) ? (bholder = bias->to(at::kFloat).contiguous()).data_ptr<float>() : nullptr;
  PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_bias_gelu_cpu", [&] {
    scalar_t* y = out.data_ptr<scalar_t>();
    for_rows<scalar_t>(input, n, [&](const float* xr, float* yr, int64_t r) {
      row::bias_gelu(xr, b, yr, n, tanh_approx);
      store_row(yr, y + r * n, n);
    });
  });
  return out;
}

at::Tensor bias_gelu_backward(const at::Tensor& grad_out, const at::Tensor& input_,
                              const std::optional<at::Tensor>& bias, bool tanh_approx) {
  check_bias_gelu_args(input_, bias);
  TORCH_CHECK(grad_out.sizes() == input_.sizes(), "pyllm: grad_out must have shape ", input_.sizes(),
              ", got ", grad_out.sizes());
  const at::Tensor input = input_.contiguous();
  const at::Tensor dy = grad_out.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty_like(input);
  const int64_t n = input.size(-1);
  at::Tensor bholder;
  const float* b = (bias && bias->defined()) ? (bholder = bias->to(at::kFloat).contiguous()).data_ptr<float>() : nullptr;
  const float* dyp = dy.data_ptr<float>();
  PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_bias_gelu_bwd_cpu", [&] {
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    for_rows<scalar_t>(input, n, [&](const float* xr, float* g, int64_t r) {
      row::bias_gelu_backward(dyp + r * n, xr, b, g, n, tanh_approx);
      store_row(g, dxp + r * n, n);
    });
  });
  return dx;
}

}  // namespace pyllm::cpu

// The CPU kernels of torch.ops.pyllm (schemas: pyllm/ops/bias_gelu.py).
TORCH_LIBRARY_IMPL(pyllm, CPU, m) {
  m.impl("bias_gelu", &pyllm::cpu::bias_gelu);
  m.impl("bias_gelu_backward", &pyllm::cpu::bias_gelu_backward);
}

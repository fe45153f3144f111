// Fused bias + GELU (CUDA): y = gelu(x + bias) per element in fp32, and the backward
// dx = dy * gelu'(x + bias). One thread per element, grid-stride, 64-bit offsets.
#include "common.cuh"
#include "../include/pyllm/gelu.h"

namespace pyllm {
namespace PYLLM_CUDA_NS {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void bias_gelu_kernel(const T* __restrict__ x, const float* __restrict__ b, T* __restrict__ y,
                                 int64_t total, int64_t n, bool tanh_approx) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const float z = load_float(x[i]) + (b ? b[i % n] : 0.0f);
    y[i] = store_float<T>(gelu(z, tanh_approx));
  }
}

template <typename T>
__global__ void bias_gelu_bwd_kernel(const float* __restrict__ dy, const T* __restrict__ x,
                                     const float* __restrict__ b, T* __restrict__ dx, int64_t total,
                                     int64_t n, bool tanh_approx) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const float z = load_float(x[i]) + (b ? b[i % n] : 0.0f);
    dx[i] = store_float<T>(dy[i] * gelu_grad(z, tanh_approx));
  }
}

unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return (unsigned)(blocks < 4096 ? blocks : 4096);
}

}  // namespace

at::Tensor bias_gelu(const at::Tensor& input_, const std::optional<at::Tensor>& bias, bool tanh_approx) {
  check_bias_gelu_args(input_, bias);
  check_kernel_device(input_, "input");
  PYLLM_DEVICE_GUARD(input_);
  const at::Tensor input = input_.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t total = input.numel(), n = input.size(-1);
  if (total == 0) return out;
  at::Tensor holder;
  const float* b = opt_float(bias, holder);
  PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_bias_gelu_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    auto k = bias_gelu_kernel<T>;
    PYLLM_LAUNCH(k, grid_for(total), kThreads, 0, PYLLM_STREAM(), cuda_ptr<scalar_t>(input), b,
                 cuda_ptr<scalar_t>(out), total, n, tanh_approx);
  });
  return out;
}

at::Tensor bias_gelu_backward(const at::Tensor& grad_out, const at::Tensor& input_,
                              const std::optional<at::Tensor>& bias, bool tanh_approx) {
  check_bias_gelu_args(input_, bias);
  check_kernel_device(input_, "input");
  TORCH_CHECK(grad_out.sizes() == input_.sizes(), "pyllm: grad_out must have shape ", input_.sizes(),
              ", got ", grad_out.sizes());
  PYLLM_DEVICE_GUARD(input_);
  const at::Tensor input = input_.contiguous(), dy = grad_out.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty_like(input);
  const int64_t total = input.numel(), n = input.size(-1);
  if (total == 0) return dx;
  at::Tensor holder;
  const float* b = opt_float(bias, holder);
  PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_bias_gelu_bwd_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    auto k = bias_gelu_bwd_kernel<T>;
    PYLLM_LAUNCH(k, grid_for(total), kThreads, 0, PYLLM_STREAM(), dy.data_ptr<float>(),
                 cuda_ptr<scalar_t>(input), b, cuda_ptr<scalar_t>(dx), total, n, tanh_approx);
  });
  return dx;
}

}  // namespace PYLLM_CUDA_NS
}  // namespace pyllm

// torch.ops.pyllm (CUDA key) under nvcc, torch.ops.pyllm_emu (CPU key) under the emulation.
PYLLM_CUDA_LIBRARY_IMPL(m) {
  m.impl("bias_gelu", &pyllm::PYLLM_CUDA_NS::bias_gelu);
  m.impl("bias_gelu_backward", &pyllm::PYLLM_CUDA_NS::bias_gelu_backward);
}

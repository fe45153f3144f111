// C++ entry points of the LayerNorm / add+LayerNorm / RMSNorm / add+RMSNorm (csrc/cpu/norm.cpp, csrc/cuda/norm.cu) kernels, per backend namespace:
//   pyllm::cpu (C++), pyllm::cuda (nvcc), pyllm::emu (the CUDA source under the CPU emulation).
// Each kernel file registers its entry points itself (TORCH_LIBRARY_IMPL at its end); the
// schemas are defined by the op's slice in pyllm/ops/. Declared here for the C++ tests.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

#define PYLLM_NORM_OPS                                                                  \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(                           \
      const at::Tensor& input, const std::optional<at::Tensor>& weight,                 \
      const std::optional<at::Tensor>& bias, double eps);                               \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm(           \
      const at::Tensor& input, const at::Tensor& residual,                              \
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,   \
      double eps);                                                                      \
  void add_layer_norm_inplace(                                                          \
      at::Tensor& input, const at::Tensor& residual,                                    \
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,   \
      double eps);                                                                      \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(                  \
      const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,      \
      const at::Tensor& rstd, const std::optional<at::Tensor>& weight,                  \
      const std::optional<at::Tensor>& grad_extra);                                     \
  std::tuple<at::Tensor, at::Tensor> rms_norm(                                          \
      const at::Tensor& input, const std::optional<at::Tensor>& weight, double eps,     \
      std::optional<at::ScalarType> round_dtype, double weight_offset,                  \
      at::ScalarType out_dtype);                                                        \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm(                         \
      const at::Tensor& input, const at::Tensor& residual,                              \
      const std::optional<at::Tensor>& weight, double eps,                              \
      std::optional<at::ScalarType> round_dtype, double weight_offset,                  \
      at::ScalarType out_dtype);                                                        \
  std::tuple<at::Tensor, at::Tensor> rms_norm_backward(                                 \
      const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& rstd,      \
      const std::optional<at::Tensor>& weight, std::optional<at::ScalarType> round_dtype, \
      double weight_offset);

namespace pyllm {
namespace cpu { PYLLM_NORM_OPS }
namespace cuda { PYLLM_NORM_OPS }
namespace emu { PYLLM_NORM_OPS }
}  // namespace pyllm

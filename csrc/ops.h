// Declarations of every kernel entry point, per backend namespace:
//   pyllm::cpu  - C++ kernels (csrc/cpu)
//   pyllm::cuda - CUDA kernels built by nvcc (csrc/cuda)
//   pyllm::emu  - the same CUDA sources compiled for the CPU emulation (PYLLM_EMULATED)
// The schemas these implement are declared once, in csrc/registration.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

#define PYLLM_DECLARE_OPS                                                               \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(                           \
      const at::Tensor& input, const std::optional<at::Tensor>& weight,                 \
      const std::optional<at::Tensor>& bias, double eps);                               \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm(           \
      const at::Tensor& input, const at::Tensor& residual,                              \
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
  std::tuple<at::Tensor, at::Tensor> rms_norm_backward(                                 \
      const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& rstd,      \
      const std::optional<at::Tensor>& weight, std::optional<at::ScalarType> round_dtype, \
      double weight_offset);                                                            \
  at::Tensor masked_softmax(const at::Tensor& input, const std::optional<at::Tensor>& mask, \
                            double scale, bool causal);                                 \
  at::Tensor masked_softmax_backward(const at::Tensor& grad_out, const at::Tensor& out, \
                                     double scale);                                     \
  std::tuple<at::Tensor, at::Tensor> attention(                                         \
      const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,          \
      const std::optional<at::Tensor>& mask, double scale, bool causal, bool bottom_right, \
      int64_t window_left, int64_t window_right, double dropout_p, int64_t seed);       \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(        \
      const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,       \
      const at::Tensor& value, const std::optional<at::Tensor>& mask,                   \
      const at::Tensor& out, const at::Tensor& lse, double scale, bool causal,          \
      bool bottom_right, int64_t window_left, int64_t window_right, double dropout_p,   \
      int64_t seed, bool mask_grad);

namespace pyllm {
namespace cpu { PYLLM_DECLARE_OPS }
namespace cuda { PYLLM_DECLARE_OPS }
namespace emu { PYLLM_DECLARE_OPS }
}  // namespace pyllm

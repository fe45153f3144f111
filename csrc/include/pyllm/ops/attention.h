// C++ entry points of the fused attention (csrc/cpu/attention.cpp, csrc/cuda/attention.cu) kernels, per backend namespace:
//   pyllm::cpu (C++), pyllm::cuda (nvcc), pyllm::emu (the CUDA source under the CPU emulation).
// Each kernel file registers its entry points itself (TORCH_LIBRARY_IMPL at its end); the
// schemas are defined by the op's slice in pyllm/ops/. Declared here for the C++ tests.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

#define PYLLM_ATTENTION_OPS                                                                \
  std::tuple<at::Tensor, at::Tensor> attention(                                            \
      const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,             \
      const std::optional<at::Tensor>& mask, double scale, bool causal, bool bottom_right, \
      int64_t window_left, int64_t window_right, double dropout_p, int64_t seed,           \
      const std::optional<at::Tensor>& alibi_slopes);                                      \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(           \
      const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,          \
      const at::Tensor& value, const std::optional<at::Tensor>& mask,                      \
      const at::Tensor& out, const at::Tensor& lse, double scale, bool causal,             \
      bool bottom_right, int64_t window_left, int64_t window_right, double dropout_p,      \
      int64_t seed, bool mask_grad, const std::optional<at::Tensor>& alibi_slopes);        \
  std::tuple<at::Tensor, at::Tensor> varlen_attention(                                     \
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                       \
      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, double scale,        \
      bool causal, int64_t window_left, int64_t window_right, double dropout_p,            \
      int64_t seed, const std::optional<at::Tensor>& alibi_slopes);                        \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(                \
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,                \
      const at::Tensor& v, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, \
      const at::Tensor& out, const at::Tensor& lse, double scale, bool causal,             \
      int64_t window_left, int64_t window_right, double dropout_p, int64_t seed,           \
      const std::optional<at::Tensor>& alibi_slopes);

namespace pyllm {
namespace cpu { PYLLM_ATTENTION_OPS }
namespace cuda { PYLLM_ATTENTION_OPS }
namespace emu { PYLLM_ATTENTION_OPS }
}  // namespace pyllm

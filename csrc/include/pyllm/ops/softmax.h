// C++ entry points of the masked softmax (csrc/cpu/softmax.cpp, csrc/cuda/softmax.cu) kernels, per backend namespace:
//   pyllm::cpu (C++), pyllm::cuda (nvcc), pyllm::emu (the CUDA source under the CPU emulation).
// Each kernel file registers its entry points itself (TORCH_LIBRARY_IMPL at its end); the
// schemas are defined by the op's slice in pyllm/ops/. Declared here for the C++ tests.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

#define PYLLM_SOFTMAX_OPS                                                                    \
  at::Tensor masked_softmax(const at::Tensor& input, const std::optional<at::Tensor>& mask, \
                            double scale, bool causal);                                     \
  at::Tensor masked_softmax_backward(const at::Tensor& grad_out, const at::Tensor& out,     \
                                     double scale);

namespace pyllm {
namespace cpu { PYLLM_SOFTMAX_OPS }
namespace cuda { PYLLM_SOFTMAX_OPS }
namespace emu { PYLLM_SOFTMAX_OPS }
}  // namespace pyllm

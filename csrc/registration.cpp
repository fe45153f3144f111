// The one place where op schemas are declared and kernels are bound to them.
//
// Compiled into two extension modules:
//   pyllm._C      -> namespace `pyllm`:     CPU kernels (csrc/cpu) and, when built with
//                                           nvcc, CUDA kernels (csrc/cuda)
//   pyllm._C_emu  -> namespace `pyllm_emu`: the CUDA kernel sources compiled for the CPU
//                                           emulation of CUDA, bound to the CPU key
// Both namespaces get the same schemas, so Python registers fakes/autograd once per
// namespace from one list (pyllm/_ops.py).
#include <torch/library.h>

#include "ops.h"

#if defined(PYLLM_EMULATED)
#define PYLLM_NS pyllm_emu
#else
#define PYLLM_NS pyllm
#endif

// clang-format off
TORCH_LIBRARY(PYLLM_NS, m) {
  m.def("layer_norm(Tensor input, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("add_layer_norm(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, Tensor? grad_extra) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm(Tensor input, Tensor? weight, float eps, ScalarType? round_dtype, float weight_offset, ScalarType out_dtype) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad_out, Tensor input, Tensor rstd, Tensor? weight, ScalarType? round_dtype, float weight_offset) -> (Tensor, Tensor)");
  m.def("masked_softmax(Tensor input, Tensor? mask, float scale, bool causal) -> Tensor");
  m.def("masked_softmax_backward(Tensor grad_out, Tensor out, float scale) -> Tensor");
  m.def("attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale, bool causal, bool bottom_right, int window_left, int window_right, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? mask, Tensor out, Tensor lse, float scale, bool causal, bool bottom_right, int window_left, int window_right, float dropout_p, int seed, bool mask_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}
// clang-format on

#define PYLLM_IMPL_ALL(m, ns)                                          \
  m.impl("layer_norm", &pyllm::ns::layer_norm);                        \
  m.impl("add_layer_norm", &pyllm::ns::add_layer_norm);                \
  m.impl("layer_norm_backward", &pyllm::ns::layer_norm_backward);      \
  m.impl("rms_norm", &pyllm::ns::rms_norm);                            \
  m.impl("rms_norm_backward", &pyllm::ns::rms_norm_backward);          \
  m.impl("masked_softmax", &pyllm::ns::masked_softmax);                \
  m.impl("masked_softmax_backward", &pyllm::ns::masked_softmax_backward);    \
  m.impl("attention", &pyllm::ns::attention);                          \
  m.impl("attention_backward", &pyllm::ns::attention_backward);

#if defined(PYLLM_EMULATED)
TORCH_LIBRARY_IMPL(PYLLM_NS, CPU, m) { PYLLM_IMPL_ALL(m, emu) }
#else
TORCH_LIBRARY_IMPL(PYLLM_NS, CPU, m) { PYLLM_IMPL_ALL(m, cpu) }
#if defined(PYLLM_WITH_CUDA)
TORCH_LIBRARY_IMPL(PYLLM_NS, CUDA, m) { PYLLM_IMPL_ALL(m, cuda) }
#endif
#endif

// Argument checks shared by every op entry point (CPU, CUDA and emulated CUDA).
// The Python layer (pyllm/functional.py) validates first and raises errors that name
// the public argument; these checks guard direct torch.ops.pyllm.* calls.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

// Dispatch over the kernel dtypes (fp32, fp16, bf16) only; `scalar_t` is the at:: type.
#define PYLLM_DISPATCH_FLOATING(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)          \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace pyllm {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

#define PYLLM_CHECK_FLOAT(x, name)                                                   \
  TORCH_CHECK(::pyllm::is_supported_float((x).scalar_type()), "pyllm: ", name,       \
              " must be float32, float16 or bfloat16, got ", (x).scalar_type())

#define PYLLM_CHECK_SAME_DEVICE(a, b, an, bn)                                        \
  TORCH_CHECK((a).device() == (b).device(), "pyllm: ", an, " is on ", (a).device(),  \
              " but ", bn, " is on ", (b).device())

// weight/bias of a norm: 1-D, `n` elements, same device as the input.
inline void check_norm_param(const std::optional<at::Tensor>& p, const at::Tensor& input,
                             const char* name) {
  if (!p.has_value() || !p->defined()) return;
  PYLLM_CHECK_FLOAT(*p, name);
  PYLLM_CHECK_SAME_DEVICE(*p, input, name, "input");
  TORCH_CHECK(p->dim() == 1 && p->size(0) == input.size(-1), "pyllm: ", name,
              " must have shape [", input.size(-1), "] (the normalized size), got ",
              p->sizes());
}

// add_layer_norm's residual: same shape, dtype and device as the input.
inline void check_residual(const at::Tensor& residual, const at::Tensor& input) {
  PYLLM_CHECK_FLOAT(residual, "residual");
  PYLLM_CHECK_SAME_DEVICE(residual, input, "residual", "input");
  TORCH_CHECK(residual.sizes() == input.sizes() && residual.scalar_type() == input.scalar_type(),
              "pyllm: residual must have the input's shape ", input.sizes(), " and dtype ",
              input.scalar_type(), ", got ", residual.sizes(), " ", residual.scalar_type());
}

// bias_gelu: input with >= 1 dim, bias [N] (N = input's last dim) on the same device.
inline void check_bias_gelu_args(const at::Tensor& input, const std::optional<at::Tensor>& bias) {
  PYLLM_CHECK_FLOAT(input, "input");
  TORCH_CHECK(input.dim() >= 1, "pyllm: input must have at least 1 dimension");
  if (!bias.has_value() || !bias->defined()) return;
  PYLLM_CHECK_FLOAT(*bias, "bias");
  PYLLM_CHECK_SAME_DEVICE(*bias, input, "bias", "input");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == input.size(-1), "pyllm: bias must have shape [",
              input.size(-1), "] (input's last dim), got ", bias->sizes());
}

inline void check_norm_input(const at::Tensor& input) {
  PYLLM_CHECK_FLOAT(input, "input");
  TORCH_CHECK(input.dim() >= 1, "pyllm: input must have at least 1 dimension");
}

// query/key/value of attention: [B, H, L, D], one dtype and device, GQA head counts.
inline void check_attention_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  PYLLM_CHECK_FLOAT(q, "query");
  PYLLM_CHECK_FLOAT(k, "key");
  PYLLM_CHECK_FLOAT(v, "value");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "pyllm: attention expects 4-D query/key/value [B, H, L, D], got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "pyllm: query, key and value must have the same dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  PYLLM_CHECK_SAME_DEVICE(k, q, "key", "query");
  PYLLM_CHECK_SAME_DEVICE(v, q, "value", "query");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "pyllm: batch sizes differ: query ",
              q.sizes(), ", key ", k.sizes(), ", value ", v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), "pyllm: key head dim ", k.size(3), " must equal query head dim ",
              q.size(3));
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2), "pyllm: key ", k.sizes(),
              " and value ", v.sizes(), " must agree on heads and length");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "pyllm: query heads (", q.size(1),
              ") must be a multiple of key/value heads (", k.size(1), ")");
}

}  // namespace pyllm

// Entry points of the tensor-core attention forward (attention_tc.cu), called by the
// attention op's CUDA host code (attention.cu) for fp16/bf16 inputs with head dims <= 256.
#pragma once
#include <ATen/ATen.h>

#include "../include/pyllm/attention.h"
#include "../include/pyllm/broadcast.h"
#include "../include/pyllm/cuda_compat.cuh"

namespace pyllm {
namespace PYLLM_CUDA_NS {

// Everything the forward needs besides q, k, v: the mask as the SIMT kernel takes it
// (expanded, bool or fp32; its RowIndexer is in f), and the features the SIMT path filled.
struct TcAttnArgs {
  at::Tensor mask;  // undefined, bool or fp32, expanded to [B, Hq, Lq, Lk]
  AttnFeatures f;
  float scale = 1.f;
};

// Largest head dim (of q/k and of v) the tensor-core kernel serves.
constexpr int64_t kTcMaxHeadDim = 256;

// True when attention_tc_forward serves these inputs: fp16/bf16, head dims <= 256, and
// PYLLM_ATTENTION_KERNEL != "simt" (a switch for comparisons and bisecting).
bool attention_tc_eligible(const at::Tensor& q, const at::Tensor& v);

// The padded head dim (template instantiation) that serves head dims d and dv.
int attention_tc_head_dim(int64_t d, int64_t dv);

// One row per head-dim instantiation: {head dim, query rows per CTA, keys per tile, threads per
// CTA, dynamic shared memory bytes, Q kept in registers, smem row pitch in 16-byte chunks, XOR
// swizzle}: the facts the performance model (python -m pyllm gpu-model) starts from.
std::vector<std::vector<int64_t>> attention_tc_configs();

// Key splits (flash-decoding) of the last attention_tc_forward launch (tests read it).
int attention_tc_last_splits();
// CTAs per key split of that launch (B x heads x query tiles; heads are kv heads when packed).
int64_t attention_tc_last_ctas();

// A view of q / k / v (or dO) the tensor-core kernels can read with 16-byte cp.async: last dim
// contiguous and a multiple of 8 (zero-padded copy otherwise), 16-byte aligned strides.
at::Tensor tc_operand(const at::Tensor& t);

// Writes out [B, Hq, Lq, Dv] (q's dtype, contiguous) and lse [B, Hq, Lq] (fp32).
void attention_tc_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const TcAttnArgs& a,
                          at::Tensor& out, at::Tensor& lse);

// ---- backward (attention_tc_bwd.cu)
// Largest head dim (of q/k and of v) the tensor-core backward serves (the forward's).
constexpr int64_t kTcBwdMaxHeadDim = 256;

// True when attention_tc_backward serves these inputs (attention_tc_eligible and head dims <= 256).
bool attention_tc_bwd_eligible(const at::Tensor& q, const at::Tensor& v);

// The padded head dim (template instantiation: 64, 128 or 256) of the backward; 0 if none.
int attention_tc_bwd_head_dim(int64_t d, int64_t dv);

// One row per backward instantiation: {head dim, keys per CTA, queries per step, threads per CTA,
// dynamic shared memory bytes, CTAs per key block (column parts of dK / dV / dQ), keys per step and
// shared memory bytes of the deterministic dQ pass}.
std::vector<std::vector<int64_t>> attention_tc_bwd_configs();

// Adds dQ (unscaled: the caller multiplies by the softmax scale) into dq (fp32 [B, Hq, Lq, D],
// zeroed; undefined: not computed, deterministic mode), writes dk / dv (fp32 [B, Hkv, Lk, D / Dv])
// and, when dmask is defined and non-empty, dS into dmask (fp32 [B, Hq, Lq, Lk], zeroed).
// grad_out is the output's gradient in q's dtype; lse and delta = rowsum(dO * O) fp32 [B, Hq, Lq].
// skip_if (device memory, may be null): when *skip_if is true the kernel returns at once (the
// caller's SIMT kernels serve inputs with non-finite values; no host synchronization).
void attention_tc_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_out,
                           const at::Tensor& lse, const at::Tensor& delta, const TcAttnArgs& a, at::Tensor& dq,
                           at::Tensor& dk, at::Tensor& dv, at::Tensor& dmask, const bool* skip_if = nullptr);

// Deterministic mode's dQ pass (attention_tc_bwd.cu): writes dq (fp32 [B, Hq, Lq, D], scaled; no
// atomics, each element once) and, when dmask is defined and non-empty, dS into it; same inputs and
// skip_if as attention_tc_backward.
void attention_tc_dq(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_out,
                     const at::Tensor& lse, const at::Tensor& delta, const TcAttnArgs& a, at::Tensor& dq,
                     at::Tensor& dmask, const bool* skip_if = nullptr);

}  // namespace PYLLM_CUDA_NS
}  // namespace pyllm

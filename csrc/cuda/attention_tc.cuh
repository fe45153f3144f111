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

// Writes out [B, Hq, Lq, Dv] (q's dtype, contiguous) and lse [B, Hq, Lq] (fp32).
void attention_tc_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const TcAttnArgs& a,
                          at::Tensor& out, at::Tensor& lse);

}  // namespace PYLLM_CUDA_NS
}  // namespace pyllm

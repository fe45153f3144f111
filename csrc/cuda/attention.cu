// CUDA kernels: fused scaled-dot-product attention (SIMT flash forward + recomputing
// backward), with the masks of the CPU kernels: bool/additive masks of any broadcast
// shape and strides (RowIndexer), causal (top-left / bottom-right), sliding windows,
// GQA, fully-masked rows -> zeros (lse -inf), counter-based dropout.
//
// Forward: one block per (b, h, 4 query rows), one warp per query row. Key/value tiles of
// T keys (32, or 16 for head dims summing to > 256) are staged in dynamic shared memory as
// fp32; lane j scores key j of the tile, the warp folds the tile into its running max/sum,
// and each lane accumulates output dims lane, lane+32, ... (head dims <= 256) in fp32.
// Backward (P recomputed from lse, delta = rowsum(dO * O) computed by ATen):
//   dq kernel:   one warp per query row, loops over key tiles (like the forward);
//   dkv kernel:  one warp per key, loops over the group's query heads and query tiles.
// Every key/query tile loop has a block-uniform trip count, so all threads reach every
// barrier; inactive rows/lanes work on -inf scores.
#include "common.cuh"
#include "attention_tc.cuh"
#include "../include/pyllm/attention.h"
#include "../include/pyllm/broadcast.h"
#include "../include/pyllm/ops/attention.h"
#include "../include/pyllm/varlen.h"

namespace pyllm {
namespace PYLLM_CUDA_NS {
namespace {

constexpr int kWarps = 4;       // query rows (forward, dq) or keys (dkv) per block
constexpr int kMaxChunks = 8;   // head dims up to 8 * 32 = 256
constexpr int kMaxHeadDim = kMaxChunks * kWarpSize;

struct NoMask {};

struct AttnParams : AttnFeatures {  // geometry, mask indexing, ALiBi, dropout: AttnFeatures
  int64_t qs[3], ks[3], vs[3];  // element strides of dims B, H, L (last dim contiguous)
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv, group;
  int tile;                     // keys (forward/dq) or queries (dkv) per smem tile
  float scale;
  const bool* only_if = nullptr;  // backward kernels: non-null -> run only when *only_if (device flag)
};

template <typename M>
__device__ __forceinline__ float masked_score(float s, const M* mask, const AttnParams& p, int64_t rid, int64_t i,
                                              int64_t j) {
  if (j < p.g.lo(i) || j >= p.g.hi(i)) return -INFINITY;
  if (p.alibi) {  // -slope * |i + shift - j|, as FlashAttention
    const int64_t bh = rid / p.Lq, pos = i + p.g.shift;
    s -= p.alibi[(bh / p.Hq) * p.alibi_bstride + bh % p.Hq] * (float)(pos > j ? pos - j : j - pos);
  }
  if constexpr (std::is_same_v<M, bool>) {
    return mask[p.mi.offset(rid) + j * p.mi.col_stride] ? s : -INFINITY;
  } else if constexpr (std::is_same_v<M, float>) {
    return s + mask[p.mi.offset(rid) + j * p.mi.col_stride];
  } else {
    return s;
  }
}

__device__ __forceinline__ float drop_factor(const AttnParams& p, int64_t rid, int64_t j) {
  if (!p.dropout) return 1.f;
  return dropout_hash(p.seed, (uint64_t)rid * (uint64_t)p.Lk + (uint64_t)j) >= p.drop_threshold ? p.drop_scale : 0.f;
}

// Keys [lo, hi) that any of the query rows [i0, i1) can see.
__device__ __forceinline__ void key_range(const AttnParams& p, int64_t i0, int64_t i1, int64_t& lo, int64_t& hi) {
  lo = p.g.lo(i0);
  hi = p.g.hi(i1 - 1);
  if (hi < lo) hi = lo;
}

// Stages rows [r0, r0 + tile) of a [L, dim] matrix (row stride `ld`) as fp32 into smem with
// row pitch `pitch` (zeros past `rows`). All threads of the block call it.
template <typename T>
__device__ __forceinline__ void stage_rows(float* dst, const T* src, int64_t ld, int64_t r0, int64_t rows, int tile,
                                           int64_t dim, int64_t pitch) {
  for (int64_t idx = threadIdx.x; idx < (int64_t)tile * dim; idx += blockDim.x) {
    const int64_t r = idx / dim, d = idx % dim;
    dst[r * pitch + d] = (r0 + r < rows) ? load_float(src[(r0 + r) * ld + d]) : 0.f;
  }
}

// ------------------------------------------------------------------------------ forward
template <typename T, typename M>
__global__ void attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                const M* __restrict__ mask, T* __restrict__ out, float* __restrict__ lse,
                                AttnParams p) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t nqt = (p.Lq + kWarps - 1) / kWarps;
  const int64_t bh = blockIdx.x / nqt, b = bh / p.Hq, h = bh % p.Hq, kvh = h / p.group;
  const int64_t i0 = (blockIdx.x % nqt) * kWarps, i1 = (i0 + kWarps < p.Lq) ? i0 + kWarps : p.Lq;
  const int64_t i = i0 + warp;
  const bool active = i < p.Lq;
  const int64_t rid = (b * p.Hq + h) * p.Lq + (active ? i : 0);
  const int tile = p.tile;
  const int64_t kp = p.D + 1;  // padded K pitch
  float* qs = pyllm_dynamic_smem<float>();             // [kWarps, D]
  float* ks = qs + kWarps * p.D;                       // [tile, D + 1]
  float* vsm = ks + tile * kp;                         // [tile, Dv]
  const T* qb = q + b * p.qs[0] + h * p.qs[1];
  const T* kb = k + b * p.ks[0] + kvh * p.ks[1];
  const T* vb = v + b * p.vs[0] + kvh * p.vs[1];
  for (int64_t d = lane; d < p.D; d += kWarpSize)
    qs[warp * p.D + d] = active ? load_float(qb[i * p.qs[2] + d]) * p.scale : 0.f;
  float o[kMaxChunks];
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) o[c] = 0.f;
  float m = -INFINITY, l = 0.f;
  int64_t klo, khi;
  key_range(p, i0, i1, klo, khi);
  for (int64_t k0 = klo; k0 < khi; k0 += tile) {
    __syncthreads();  // previous tile fully consumed (and q staged)
    stage_rows(ks, kb, p.ks[2], k0, khi, tile, p.D, kp);
    stage_rows(vsm, vb, p.vs[2], k0, khi, tile, p.Dv, p.Dv);
    __syncthreads();
    const int64_t j = k0 + lane;
    float s = -INFINITY;
    if (active && lane < tile && j < khi) {
      float acc = 0.f;
      for (int64_t d = 0; d < p.D; ++d) acc += qs[warp * p.D + d] * ks[lane * kp + d];
      s = masked_score(acc, mask, p, rid, i, j);
    }
    const float mnew = fmaxf(m, warp_max(s));
    // fmaxf skips NaN: a tile of only NaN scores (a NaN query) would look fully masked. Make l NaN
    // so the row comes out NaN, as torch's softmax gives it (masked rows stay zeros).
    if (mnew == -INFINITY && __any_sync(kFullMask, s != s)) l = NAN;
    float e = 0.f;
    if (mnew != -INFINITY && s != -INFINITY) e = expf(s - mnew);
    const float alpha = (m == -INFINITY) ? 0.f : expf(m - mnew);
    const float tsum = warp_sum(e);
    if (mnew != -INFINITY) {
      l = l * alpha + tsum;
      m = mnew;
#pragma unroll
      for (int c = 0; c < kMaxChunks; ++c) o[c] *= alpha;
    }
    const float pd = (e != 0.f) ? e * drop_factor(p, rid, j) : 0.f;
    for (int jj = 0; jj < tile; ++jj) {
      const float pj = __shfl_sync(kFullMask, pd, jj);
      if (pj != 0.f) {
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
          const int64_t d = lane + c * kWarpSize;
          if (d < p.Dv) o[c] += pj * vsm[jj * p.Dv + d];
        }
      }
    }
  }
  if (active) {
    const bool seen = l > 0.f || l != l;  // something visible (or a NaN score)
    const float inv = seen ? 1.f / l : 0.f;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int64_t d = lane + c * kWarpSize;
      if (d < p.Dv) out[rid * p.Dv + d] = store_float<T>(o[c] * inv);
    }
    if (lane == 0) lse[rid] = seen ? m + logf(l) : -INFINITY;
  }
}

// ------------------------------------------------------------------------------ dq
template <typename T, typename M>
__global__ void attn_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                   const M* __restrict__ mask, const float* __restrict__ dout,
                                   const float* __restrict__ lse, const float* __restrict__ delta,
                                   float* __restrict__ dq, float* __restrict__ dmask, AttnParams p) {
  if (p.only_if != nullptr && !*p.only_if) return;  // uniform: the tensor-core backward served this call
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t nqt = (p.Lq + kWarps - 1) / kWarps;
  const int64_t bh = blockIdx.x / nqt, b = bh / p.Hq, h = bh % p.Hq, kvh = h / p.group;
  const int64_t i0 = (blockIdx.x % nqt) * kWarps, i1 = (i0 + kWarps < p.Lq) ? i0 + kWarps : p.Lq;
  const int64_t i = i0 + warp;
  const bool active = i < p.Lq;
  const int64_t rid = (b * p.Hq + h) * p.Lq + (active ? i : 0);
  const int tile = p.tile;
  const int64_t kp = p.D + 1, vp = p.Dv + 1;
  float* qs = pyllm_dynamic_smem<float>();   // [kWarps, D]
  float* dos = qs + kWarps * p.D;            // [kWarps, Dv]
  float* ks = dos + kWarps * p.Dv;           // [tile, D + 1]
  float* vsm = ks + tile * kp;               // [tile, Dv + 1]
  const T* qb = q + b * p.qs[0] + h * p.qs[1];
  const T* kb = k + b * p.ks[0] + kvh * p.ks[1];
  const T* vb = v + b * p.vs[0] + kvh * p.vs[1];
  for (int64_t d = lane; d < p.D; d += kWarpSize)
    qs[warp * p.D + d] = active ? load_float(qb[i * p.qs[2] + d]) * p.scale : 0.f;
  for (int64_t d = lane; d < p.Dv; d += kWarpSize) dos[warp * p.Dv + d] = active ? dout[rid * p.Dv + d] : 0.f;
  const float L = active ? lse[rid] : -INFINITY;
  const float Di = active ? delta[rid] : 0.f;
  float acc[kMaxChunks];
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) acc[c] = 0.f;
  int64_t klo, khi;
  key_range(p, i0, i1, klo, khi);
  for (int64_t k0 = klo; k0 < khi; k0 += tile) {
    __syncthreads();
    stage_rows(ks, kb, p.ks[2], k0, khi, tile, p.D, kp);
    stage_rows(vsm, vb, p.vs[2], k0, khi, tile, p.Dv, vp);
    __syncthreads();
    const int64_t j = k0 + lane;
    float ds = 0.f;
    if (active && L != -INFINITY && lane < tile && j < khi) {
      float s = 0.f, dp = 0.f;
      for (int64_t d = 0; d < p.D; ++d) s += qs[warp * p.D + d] * ks[lane * kp + d];
      for (int64_t d = 0; d < p.Dv; ++d) dp += dos[warp * p.Dv + d] * vsm[lane * vp + d];
      s = masked_score(s, mask, p, rid, i, j);
      if (s != -INFINITY) {
        const float pr = expf(s - L);
        ds = pr * (dp * drop_factor(p, rid, j) - Di);
      }
      if (dmask != nullptr) dmask[rid * p.Lk + j] = ds;
    }
    for (int jj = 0; jj < tile; ++jj) {
      const float dsj = __shfl_sync(kFullMask, ds, jj);
      if (dsj != 0.f) {
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
          const int64_t d = lane + c * kWarpSize;
          if (d < p.D) acc[c] += dsj * ks[jj * kp + d];
        }
      }
    }
  }
  if (active) {
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int64_t d = lane + c * kWarpSize;
      if (d < p.D) dq[rid * p.D + d] = acc[c] * p.scale;
    }
  }
}

// ------------------------------------------------------------------------------ dk, dv
template <typename T, typename M>
__global__ void attn_bwd_dkv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                    const M* __restrict__ mask, const float* __restrict__ dout,
                                    const float* __restrict__ lse, const float* __restrict__ delta,
                                    float* __restrict__ dk, float* __restrict__ dv, AttnParams p) {
  if (p.only_if != nullptr && !*p.only_if) return;  // uniform: the tensor-core backward served this call
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t nkt = (p.Lk + kWarps - 1) / kWarps;
  const int64_t bkv = blockIdx.x / nkt, b = bkv / p.Hkv, kvh = bkv % p.Hkv;
  const int64_t j0 = (blockIdx.x % nkt) * kWarps, j1 = (j0 + kWarps < p.Lk) ? j0 + kWarps : p.Lk;
  const int64_t j = j0 + warp;
  const bool active = j < p.Lk;
  const int tile = p.tile;
  const int64_t qp = p.D + 1, dop = p.Dv + 1;
  float* krow = pyllm_dynamic_smem<float>();   // [kWarps, D]
  float* vrow = krow + kWarps * p.D;           // [kWarps, Dv]
  float* qs = vrow + kWarps * p.Dv;            // [tile, D + 1]  (scaled)
  float* dos = qs + tile * qp;                 // [tile, Dv + 1]
  float* ls = dos + tile * dop;                // [tile] lse
  float* dl = ls + tile;                       // [tile] delta
  const T* kb = k + b * p.ks[0] + kvh * p.ks[1];
  const T* vb = v + b * p.vs[0] + kvh * p.vs[1];
  for (int64_t d = lane; d < p.D; d += kWarpSize) krow[warp * p.D + d] = active ? load_float(kb[j * p.ks[2] + d]) : 0.f;
  for (int64_t d = lane; d < p.Dv; d += kWarpSize) vrow[warp * p.Dv + d] = active ? load_float(vb[j * p.vs[2] + d]) : 0.f;
  float ak[kMaxChunks], av[kMaxChunks];
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) ak[c] = av[c] = 0.f;
  for (int64_t h = kvh * p.group; h < (kvh + 1) * p.group; ++h) {
    const T* qb = q + b * p.qs[0] + h * p.qs[1];
    const int64_t rbase = (b * p.Hq + h) * p.Lq;
    for (int64_t i0 = 0; i0 < p.Lq; i0 += tile) {
      const int64_t i1 = (i0 + tile < p.Lq) ? i0 + tile : p.Lq;
      // Uniform skip of query tiles that cannot see any key of this block.
      if (p.g.lo(i0) >= j1 || p.g.hi(i1 - 1) <= j0) continue;
      __syncthreads();
      for (int64_t idx = threadIdx.x; idx < (int64_t)tile * p.D; idx += blockDim.x) {
        const int64_t r = idx / p.D, d = idx % p.D;
        qs[r * qp + d] = (i0 + r < p.Lq) ? load_float(qb[(i0 + r) * p.qs[2] + d]) * p.scale : 0.f;
      }
      for (int64_t idx = threadIdx.x; idx < (int64_t)tile * p.Dv; idx += blockDim.x) {
        const int64_t r = idx / p.Dv, d = idx % p.Dv;
        dos[r * dop + d] = (i0 + r < p.Lq) ? dout[(rbase + i0 + r) * p.Dv + d] : 0.f;
      }
      for (int64_t r = threadIdx.x; r < tile; r += blockDim.x) {
        ls[r] = (i0 + r < p.Lq) ? lse[rbase + i0 + r] : -INFINITY;
        dl[r] = (i0 + r < p.Lq) ? delta[rbase + i0 + r] : 0.f;
      }
      __syncthreads();
      const int64_t i = i0 + lane, rid = rbase + (i < p.Lq ? i : 0);
      float pd = 0.f, ds = 0.f;
      if (active && lane < tile && i < p.Lq && ls[lane] != -INFINITY) {
        float s = 0.f, dp = 0.f;
        for (int64_t d = 0; d < p.D; ++d) s += qs[lane * qp + d] * krow[warp * p.D + d];
        for (int64_t d = 0; d < p.Dv; ++d) dp += dos[lane * dop + d] * vrow[warp * p.Dv + d];
        s = masked_score(s, mask, p, rid, i, j);
        if (s != -INFINITY) {
          const float pr = expf(s - ls[lane]);
          const float z = drop_factor(p, rid, j);
          pd = pr * z;
          ds = pr * (dp * z - dl[lane]);
        }
      }
      for (int ii = 0; ii < tile; ++ii) {
        const float pi = __shfl_sync(kFullMask, pd, ii);
        const float dsi = __shfl_sync(kFullMask, ds, ii);
        if (pi != 0.f || dsi != 0.f) {
#pragma unroll
          for (int c = 0; c < kMaxChunks; ++c) {
            const int64_t d = lane + c * kWarpSize;
            if (d < p.Dv) av[c] += pi * dos[ii * dop + d];
            if (d < p.D) ak[c] += dsi * qs[ii * qp + d];  // qs is already scaled
          }
        }
      }
    }
  }
  if (active) {
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int64_t d = lane + c * kWarpSize;
      if (d < p.D) dk[(bkv * p.Lk + j) * p.D + d] = ak[c];
      if (d < p.Dv) dv[(bkv * p.Lk + j) * p.Dv + d] = av[c];
    }
  }
}

// ------------------------------------------------------------------------------ host
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) > 1 && t.stride(-1) != 1) ? t.contiguous() : t;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_kernel_device(q, "query");
  check_attention_qkv(q, k, v);
  TORCH_CHECK(q.size(3) <= kMaxHeadDim && v.size(3) <= kMaxHeadDim,
              "pyllm: the CUDA attention kernel supports head dims up to ", kMaxHeadDim, ", got ", q.size(3),
              " and ", v.size(3));
}

AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal,
                       bool bottom_right, int64_t wl, int64_t wr, double dropout_p, int64_t seed) {
  AttnParams p{};
  for (int d = 0; d < 3; ++d) {
    p.qs[d] = q.stride(d);
    p.ks[d] = k.stride(d);
    p.vs[d] = v.stride(d);
  }
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Lq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Lk = k.size(2);
  p.Dv = v.size(3);
  p.group = p.Hq / p.Hkv;
  p.tile = (p.D + p.Dv <= 256) ? 32 : 16;
  p.scale = (float)scale;
  p.g = make_attn_geom(p.Lq, p.Lk, causal, bottom_right, wl, wr);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "pyllm: dropout_p must be in [0, 1), got ", dropout_p);
  p.dropout = dropout_p > 0.0;
  p.drop_threshold = p.dropout ? (uint32_t)std::min(4294967295.0, std::ldexp(dropout_p, 32)) : 0u;
  p.drop_scale = p.dropout ? (float)(1.0 / (1.0 - dropout_p)) : 1.f;
  p.seed = (uint64_t)seed;
  return p;
}

// Returns the fp32 slopes (keeping them alive) and sets p.alibi; undefined when there are none.
at::Tensor prepare_alibi(AttnParams& p, const std::optional<at::Tensor>& alibi, const at::Tensor& q) {
  at::Tensor t = alibi_f32(alibi, p.B, p.Hq, q);
  p.alibi = t.defined() ? t.data_ptr<float>() : nullptr;
  p.alibi_bstride = t.defined() && t.dim() == 2 ? p.Hq : 0;
  return t;
}

// Returns the expanded mask (bool or fp32) and sets p.mi; undefined when there is none.
at::Tensor prepare_mask(AttnParams& p, const std::optional<at::Tensor>& mask, const at::Tensor& q) {
  if (!mask.has_value() || !mask->defined()) return {};
  return expand_mask(mask, q, {p.B, p.Hq, p.Lq, p.Lk}, "attn_mask", "query", p.mi,
                     /*to_float=*/true, /*allow_double=*/true);
}

template <typename F>
void with_mask(const at::Tensor& m, const F& f) {
  if (!m.defined()) f(static_cast<const NoMask*>(nullptr));
  else if (m.scalar_type() == at::kBool) f(m.data_ptr<bool>());
  else f(m.data_ptr<float>());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& query, const at::Tensor& key,
                                             const at::Tensor& value, const std::optional<at::Tensor>& mask,
                                             double scale, bool causal, bool bottom_right, int64_t window_left,
                                             int64_t window_right, double dropout_p, int64_t seed,
                                             const std::optional<at::Tensor>& alibi_slopes) {
  check_inputs(query, key, value);
  PYLLM_DEVICE_GUARD(query);
  const at::Tensor q = last_dim_contiguous(query), k = last_dim_contiguous(key), v = last_dim_contiguous(value);
  AttnParams p = make_params(q, k, v, scale, causal, bottom_right, window_left, window_right, dropout_p, seed);
  const at::Tensor m = prepare_mask(p, mask, query);
  const at::Tensor al = prepare_alibi(p, alibi_slopes, query);
  at::Tensor out = at::empty({p.B, p.Hq, p.Lq, p.Dv}, query.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, query.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};
  if (attention_tc_eligible(query, value)) {  // fp16/bf16, head dims <= 256: tensor cores
    attention_tc_forward(q, k, v, TcAttnArgs{m, p, p.scale}, out, lse);
    return {out, lse};
  }
  const int64_t blocks = p.B * p.Hq * ((p.Lq + kWarps - 1) / kWarps);
  const size_t smem = sizeof(float) * (kWarps * p.D + p.tile * (p.D + 1) + p.tile * p.Dv);
  PYLLM_DISPATCH_FLOATING(query.scalar_type(), "pyllm_attention_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    with_mask(m, [&](auto mp) {
      using M = std::remove_const_t<std::remove_pointer_t<decltype(mp)>>;
      auto kern = attn_fwd_kernel<T, M>;
      PYLLM_LAUNCH(kern, (unsigned)blocks, kWarps * kWarpSize, smem, PYLLM_STREAM(), cuda_ptr<scalar_t>(q),
                   cuda_ptr<scalar_t>(k), cuda_ptr<scalar_t>(v), mp, cuda_ptr<scalar_t>(out),
                   lse.data_ptr<float>(), p);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, double scale, bool causal,
    bool bottom_right, int64_t window_left, int64_t window_right, double dropout_p, int64_t seed, bool mask_grad,
    const std::optional<at::Tensor>& alibi_slopes) {
  check_inputs(query, key, value);
  PYLLM_DEVICE_GUARD(query);
  const at::Tensor q = last_dim_contiguous(query), k = last_dim_contiguous(key), v = last_dim_contiguous(value);
  AttnParams p = make_params(q, k, v, scale, causal, bottom_right, window_left, window_right, dropout_p, seed);
  const at::Tensor m = prepare_mask(p, mask, query);
  const at::Tensor al = prepare_alibi(p, alibi_slopes, query);
  const std::vector<int64_t> oshape{p.B, p.Hq, p.Lq, p.Dv};
  TORCH_CHECK(grad_out.sizes() == oshape && out.sizes() == oshape, "pyllm: grad_out and out must have shape ",
              oshape);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({p.B, p.Hq, p.Lq}) && lse.scalar_type() == at::kFloat,
              "pyllm: lse must be float32 of shape [B, Hq, Lq]");
  const auto fopt = query.options().dtype(at::kFloat);
  const at::Tensor dout = grad_out.to(at::kFloat).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  // fp64 products and sum: delta feeds dS = P (dP - delta), which cancels its leading digits.
  const at::Tensor delta = (dout.to(at::kDouble) * out.to(at::kDouble)).sum(-1).to(at::kFloat).contiguous();
  at::Tensor dq = at::zeros({p.B, p.Hq, p.Lq, p.D}, fopt);
  at::Tensor dk = at::zeros({p.B, p.Hkv, p.Lk, p.D}, fopt);
  at::Tensor dv = at::zeros({p.B, p.Hkv, p.Lk, p.Dv}, fopt);
  const bool want_dmask = mask_grad && m.defined() && m.scalar_type() != at::kBool;
  at::Tensor dmask = want_dmask ? at::zeros({p.B, p.Hq, p.Lq, p.Lk}, fopt) : at::empty({0}, fopt);
  if (p.B * p.Hq * p.Lq > 0 && p.Lk > 0) {
    // fp16/bf16 with head dims <= 256: dK, dV (and dQ by atomics) on tensor cores. Deterministic
    // mode (torch.use_deterministic_algorithms) takes dQ, and the mask's gradient, from a separate
    // tensor-core pass instead (attention_tc_dq: a CTA per query block, no atomics).
    const bool tc = attention_tc_bwd_eligible(query, value);
    const bool det = tc && at::globalContext().deterministicAlgorithms();
    // A non-finite value in q, k, v or dO: a tensor-core product would spread it through pairs whose
    // probability is 0 (0 * inf = NaN), which must contribute nothing (docs/RELIABILITY.md). A device
    // flag (no host sync) makes the tensor-core kernel return at once and the SIMT kernels, which
    // skip those pairs, run instead.
    at::Tensor nonfinite;
    if (tc) {
      const at::Tensor go = grad_out.to(query.scalar_type());
      nonfinite = at::logical_not(at::isfinite(query).all().logical_and(at::isfinite(key).all())
                                      .logical_and(at::isfinite(value).all()).logical_and(at::isfinite(go).all()));
      at::Tensor dq_acc = det ? at::Tensor() : dq;
      at::Tensor dm_tc = det ? at::Tensor() : dmask;
      attention_tc_backward(q, k, v, go, lse_c, delta, TcAttnArgs{m, p, p.scale}, dq_acc, dk, dv, dm_tc,
                            nonfinite.data_ptr<bool>());
      if (det)  // dQ (scaled) and the mask's gradient in their own pass, no atomics
        attention_tc_dq(q, k, v, go, lse_c, delta, TcAttnArgs{m, p, p.scale}, dq, dmask, nonfinite.data_ptr<bool>());
      else
        dq.mul_(p.scale);  // before the SIMT dq kernel, which writes dq scaled when it runs
    }
    AttnParams pq = p, pkv = p;  // the SIMT kernels: always without tensor cores, else when the flag is set
    if (tc) {
      pq.only_if = nonfinite.data_ptr<bool>();
      pkv.only_if = nonfinite.data_ptr<bool>();
    }
    const int64_t qblocks = p.B * p.Hq * ((p.Lq + kWarps - 1) / kWarps);
    const int64_t kblocks = p.B * p.Hkv * ((p.Lk + kWarps - 1) / kWarps);
    const size_t smem_dq = sizeof(float) * (kWarps * (p.D + p.Dv) + p.tile * (p.D + 1) + p.tile * (p.Dv + 1));
    const size_t smem_dkv = sizeof(float) * (kWarps * (p.D + p.Dv) + p.tile * (p.D + 1) + p.tile * (p.Dv + 1) + 2 * p.tile);
    PYLLM_DISPATCH_FLOATING(query.scalar_type(), "pyllm_attention_bwd_cuda", [&] {
      using T = typename CudaType<scalar_t>::type;
      with_mask(m, [&](auto mp) {
        using M = std::remove_const_t<std::remove_pointer_t<decltype(mp)>>;
        auto kq = attn_bwd_dq_kernel<T, M>;
        PYLLM_LAUNCH(kq, (unsigned)qblocks, kWarps * kWarpSize, smem_dq, PYLLM_STREAM(), cuda_ptr<scalar_t>(q),
                     cuda_ptr<scalar_t>(k), cuda_ptr<scalar_t>(v), mp, dout.data_ptr<float>(),
                     lse_c.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<float>(),
                     want_dmask ? dmask.data_ptr<float>() : nullptr, pq);
        auto kkv = attn_bwd_dkv_kernel<T, M>;
        PYLLM_LAUNCH(kkv, (unsigned)kblocks, kWarps * kWarpSize, smem_dkv, PYLLM_STREAM(), cuda_ptr<scalar_t>(q),
                     cuda_ptr<scalar_t>(k), cuda_ptr<scalar_t>(v), mp, dout.data_ptr<float>(),
                     lse_c.data_ptr<float>(), delta.data_ptr<float>(), dk.data_ptr<float>(),
                     dv.data_ptr<float>(), pkv);
      });
    });
  }
  const auto dt = query.scalar_type();
  if (dt != at::kFloat) {
    dq = dq.to(dt);
    dk = dk.to(dt);
    dv = dv.to(dt);
  }
  return {dq, dk, dv, dmask};
}

// varlen_attention / varlen_attention_backward on this backend's dense kernels (varlen.h).
PYLLM_DEFINE_VARLEN_OPS(attention, attention_backward)

}  // namespace PYLLM_CUDA_NS
}  // namespace pyllm

// torch.ops.pyllm (CUDA key) under nvcc, torch.ops.pyllm_emu (CPU key) under the emulation.
PYLLM_CUDA_LIBRARY_IMPL(m) {
  m.impl("attention", &pyllm::PYLLM_CUDA_NS::attention);
  m.impl("attention_backward", &pyllm::PYLLM_CUDA_NS::attention_backward);
  m.impl("varlen_attention", &pyllm::PYLLM_CUDA_NS::varlen_attention);
  m.impl("varlen_attention_backward", &pyllm::PYLLM_CUDA_NS::varlen_attention_backward);
}

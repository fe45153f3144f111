// Geometry of attention masks that are computed, not stored: causal (top-left or
// bottom-right aligned) and sliding windows. Shared by the CPU, CUDA and emulated kernels.
#pragma once
#include <cstdint>

#include "broadcast.h"  // PYLLM_HOST_DEVICE

namespace pyllm {

// Query i sits at key position p = i + shift (shift = Lk - Lq for bottom-right alignment,
// 0 for top-left). It sees keys j with lo(i) <= j < hi(i):
//   window_left  >= 0: j >= p - window_left      (negative: unbounded)
//   window_right >= 0: j <= p + window_right     (negative: unbounded)
//   causal:            j <= p
struct AttnGeom {
  int64_t lq = 0, lk = 0, shift = 0;
  bool causal = false;
  int64_t wl = -1, wr = -1;

  PYLLM_HOST_DEVICE int64_t lo(int64_t i) const {
    if (wl < 0) return 0;
    const int64_t v = i + shift - wl;
    return v < 0 ? 0 : (v > lk ? lk : v);
  }
  // exclusive upper bound, clipped to [0, lk]
  PYLLM_HOST_DEVICE int64_t hi(int64_t i) const {
    int64_t h = lk;
    const int64_t p = i + shift;
    if (causal && p + 1 < h) h = p + 1;
    if (wr >= 0 && p + wr + 1 < h) h = p + wr + 1;
    return h < 0 ? 0 : h;
  }
  // The queries that see key j (0 <= j < lk) form the interval [qlo(j), qhi(j)) (lo and hi are
  // monotone in i): the key-side view the backward's key-major tiles test against.
  PYLLM_HOST_DEVICE int64_t qlo(int64_t j) const {
    int64_t a = 0;
    if (causal && j - shift > a) a = j - shift;
    if (wr >= 0 && j - shift - wr > a) a = j - shift - wr;
    return a > lq ? lq : a;
  }
  PYLLM_HOST_DEVICE int64_t qhi(int64_t j) const {
    int64_t z = lq;
    if (wl >= 0 && j - shift + wl + 1 < z) z = j - shift + wl + 1;
    return z < 0 ? 0 : z;
  }
  PYLLM_HOST_DEVICE bool bounded() const { return causal || wl >= 0 || wr >= 0; }
};

inline AttnGeom make_attn_geom(int64_t lq, int64_t lk, bool causal, bool bottom_right,
                               int64_t wl, int64_t wr) {
  AttnGeom g;
  g.lq = lq;
  g.lk = lk;
  g.shift = bottom_right ? lk - lq : 0;
  g.causal = causal;
  // A window wider than lq + lk sees every key: clamp it so i + shift + w never overflows.
  const int64_t wmax = lq + lk;
  g.wl = wl < 0 ? -1 : (wl > wmax ? wmax : wl);
  g.wr = wr < 0 ? -1 : (wr > wmax ? wmax : wr);
  return g;
}

// Counter-based dropout: keep element (row, j) iff hash(seed, row * lk + j) >= threshold,
// threshold = p * 2^32. The same function runs in forward and backward (and on CPU/GPU).
PYLLM_HOST_DEVICE inline uint32_t dropout_hash(uint64_t seed, uint64_t idx) {
  uint32_t x = (uint32_t)idx * 0x9E3779B1u ^ (uint32_t)seed;
  x ^= ((uint32_t)(idx >> 32) + (uint32_t)(seed >> 32)) * 0x85EBCA77u;
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The per-element features of one attention call, as the CUDA kernels' parameter blocks
// (the SIMT AttnParams and the tensor-core TcParams) both take them: filled once on the host
// (csrc/cuda/attention.cu) and handed on whole.
struct AttnFeatures {
  AttnGeom g;                      // causal / window geometry
  RowIndexer mi;                   // mask row offsets (when a mask is given)
  const float* alibi = nullptr;    // ALiBi slopes (fp32): [Hq] (alibi_bstride 0) or [B, Hq] (Hq); null if none
  int64_t alibi_bstride = 0;
  bool dropout = false;
  uint32_t drop_threshold = 0;     // keep iff dropout_hash(seed, row * lk + j) >= drop_threshold
  float drop_scale = 1.f;          // 1 / (1 - p)
  uint64_t seed = 0;
};

}  // namespace pyllm

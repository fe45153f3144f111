// Pieces shared by the tensor-core attention kernels (attention_tc.cu forward, attention_tc_bwd.cu
// backward): CTA shape, the swizzled shared-memory tile layout and its ldmatrix lane addressing,
// the cp.async tile loader, b16 packing. Internal to csrc/cuda (an anonymous namespace: each
// kernel file gets its own copy).
#pragma once
#include "common.cuh"
#include "../include/pyllm/tensor_core.cuh"

#include <type_traits>

namespace pyllm {
namespace PYLLM_CUDA_NS {
namespace {

constexpr int kTcWarps = 4;
constexpr int kTcThreads = kTcWarps * kWarpSize;
constexpr int kBlockM = 16 * kTcWarps;  // query rows per CTA
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskFloat = 2 };

// Shared-memory layout of a tile whose rows are kChunks 16-byte chunks: with a multiple of 8
// chunks per row, chunk c of row r sits at c ^ (r % 8) (XOR swizzle), otherwise rows are padded
// to an odd chunk count; either way the 8 rows of an ldmatrix phase hit 8 different bank groups.
template <int kChunksPerRow>
struct TcLayout {
  static constexpr int kChunks = kChunksPerRow;
  static constexpr bool kXor = kChunks % 8 == 0;
  static constexpr int kPitch = kXor ? kChunks : kChunks + 1;  // chunks per smem row (odd when padded)
  // Byte offset of chunk c of row r within a tile.
  __device__ static __forceinline__ int off(int r, int c) { return 16 * (r * kPitch + (kXor ? (c ^ (r & 7)) : c)); }
};

// Tile shapes and the shared-memory layout of one head-dim instantiation of the forward.
template <int kD>
struct TcTile : TcLayout<kD / 8> {
  using Base = TcLayout<kD / 8>;
  using Base::kChunks;
  using Base::kPitch;
  using Base::kXor;
  static constexpr int kN = kD <= 128 ? 64 : 32;         // keys per K/V tile
  static constexpr bool kQInRegs = kD <= 64;  // larger: re-read by ldmatrix (registers)
  static constexpr int kQChunks = kBlockM * kPitch;
  static constexpr int kKVChunks = kN * kPitch;
  static constexpr size_t kSmemBytes = 16 * (size_t)(kQChunks + 4 * kKVChunks);  // Q, 2 x K, 2 x V
  static_assert(kD % 16 == 0 && kN % 16 == 0, "m16n8k16 tiling");
  static_assert((kBlockM * kChunks) % kTcThreads == 0 && (kN * kChunks) % kTcThreads == 0, "loader split");
};

// ldmatrix addresses without a register per (row block, chunk) pair. A lane reads row
// r = 8 * block + lr (lr = lane % 8) and chunk c = 2x + bit of a tile. With the XOR swizzle,
// c ^ lr = 8 * (x >> 2) + 2 * ((x & 3) ^ (lr >> 1)) + (bit ^ (lr & 1)): four lane-dependent
// bases, the rest compile-time immediates ([reg + imm] addressing). off(r, c) is the spec;
// TcLane::at must agree with it (checked on every emulated call by the bank/alignment checks
// and by the results).
template <typename Tile>
struct TcLaneOf {
  int base[4];  // byte offset of (row lr, chunk 2q + bit) for q = 0..3
  __device__ __forceinline__ TcLaneOf(int lr, int bit) {
#pragma unroll
    for (int q = 0; q < 4; ++q)
      base[q] = 16 * (lr * Tile::kPitch + (Tile::kXor ? (((q ^ (lr >> 1)) << 1) | (bit ^ (lr & 1))) : 2 * q + bit));
  }
  // Byte offset of (row 8 * block + lr, chunk 2x + bit); block and x are compile-time in callers.
  __device__ __forceinline__ int at(int block, int x) const {
    return base[x & 3] + 16 * (8 * block * Tile::kPitch + 8 * (x >> 2));
  }
};

template <int kD>
using TcLane = TcLaneOf<TcTile<kD>>;

// Issues the cp.async copies of rows [row0, row0 + kRows) of a [L, d8] matrix (row stride ld)
// into a tile; rows >= rows_end and chunks past d8 are zero-filled.
template <int kD, int kRows, typename T>
__device__ __forceinline__ void load_tile(unsigned char* dst, const T* src, int64_t ld, int64_t row0,
                                          int64_t rows_end, int64_t d8) {
  using Tile = TcTile<kD>;
  constexpr int kPer = kRows * Tile::kChunks / kTcThreads;
  if constexpr (kTcThreads % Tile::kChunks == 0) {
    // Every copy of this thread is chunk c of rows r0, r0 + kStep, ...: one source pointer
    // stepped by kStep rows, not kPer 64-bit addresses kept live across the key loop.
    constexpr int kStep = kTcThreads / Tile::kChunks;
    const int r0 = threadIdx.x / Tile::kChunks, c = threadIdx.x % Tile::kChunks;
    const bool cok = c * 8 < d8;
    const int64_t left = rows_end - row0 - r0;  // rows of this thread's column still in range
    const T* s = src + (row0 + r0) * ld + c * 8;
#pragma unroll
    for (int n = 0; n < kPer; ++n, s += kStep * ld) {
      const bool ok = cok && n * kStep < left;
      tc::cp_async_cg16(dst + Tile::off(r0 + n * kStep, c), ok ? s : src, ok ? 16 : 0);
    }
  } else {  // 20 or 24 chunks per row (head dims 160, 192): each copy its own row and chunk
#pragma unroll
    for (int n = 0; n < kPer; ++n) {
      const int idx = threadIdx.x + n * kTcThreads;
      const int r = idx / Tile::kChunks, c = idx % Tile::kChunks;
      const bool ok = row0 + r < rows_end && c * 8 < d8;
      const T* s = ok ? src + (row0 + r) * ld + c * 8 : src;
      tc::cp_async_cg16(dst + Tile::off(r, c), s, ok ? 16 : 0);
    }
  }
}

// True if any of the b16 values this thread copied into a tile is Inf or NaN.
template <int kD, int kRows, typename T>
__device__ __forceinline__ bool tile_has_nonfinite(const unsigned char* tile) {
  using Tile = TcTile<kD>;
  constexpr uint32_t e = std::is_same_v<T, __half> ? 0x7c00u : 0x7f80u;  // exponent bits
  constexpr int kPer = kRows * Tile::kChunks / kTcThreads;
  bool bad = false;
#pragma unroll 1  // rolled: 4 words in flight, not 4 * kPer registers next to the O accumulator
  for (int n = 0; n < kPer; ++n) {
    int r, c;  // the chunks load_tile gave this thread
    if constexpr (kTcThreads % Tile::kChunks == 0) {
      r = threadIdx.x / Tile::kChunks + n * (kTcThreads / Tile::kChunks);
      c = threadIdx.x % Tile::kChunks;
    } else {
      const int idx = threadIdx.x + n * kTcThreads;
      r = idx / Tile::kChunks;
      c = idx % Tile::kChunks;
    }
    const uint32_t* w = reinterpret_cast<const uint32_t*>(tile + Tile::off(r, c));
#pragma unroll
    for (int x = 0; x < 4; ++x) bad |= ((w[x] & e) == e) || (((w[x] >> 16) & e) == e);
  }
  return bad;
}

// Two products over the head dim in one loop (the backward's S and dP): s = A1 B1^T and
// dp = A2 B2^T for one warp's 16 A rows (ldmatrix at row block arow of tiles a1, a2) and kNT * 8 B
// rows (tiles b1, b2, row blocks 2 np + brow), all tiles in the TcTile<kD> layout.
template <typename T, int kD, int kNT>
__device__ __forceinline__ void mma_pair(float (&s)[kNT][4], float (&dp)[kNT][4], const unsigned char* a1,
                                         const unsigned char* a2, const unsigned char* b1, const unsigned char* b2,
                                         const TcLane<kD>& alane, int arow, const TcLane<kD>& blane, int brow) {
#pragma unroll
  for (int n = 0; n < kNT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    uint32_t a[4], c[4];
    tc::ldmatrix_x4(a, a1 + alane.at(arow, kk));
    tc::ldmatrix_x4(c, a2 + alane.at(arow, kk));
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t bf[4];
      tc::ldmatrix_x4(bf, b1 + blane.at(2 * np + brow, kk));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1f[2] = {bf[2], bf[3]};
      tc::mma_m16n8k16<T>(s[2 * np], a, b0, s[2 * np]);
      tc::mma_m16n8k16<T>(s[2 * np + 1], a, b1f, s[2 * np + 1]);
      tc::ldmatrix_x4(bf, b2 + blane.at(2 * np + brow, kk));
      const uint32_t d0[2] = {bf[0], bf[1]}, d1[2] = {bf[2], bf[3]};
      tc::mma_m16n8k16<T>(dp[2 * np], c, d0, dp[2 * np]);
      tc::mma_m16n8k16<T>(dp[2 * np + 1], c, d1, dp[2 * np + 1]);
    }
  }
}

// A row's visible keys [lo, hi) relative to a tile starting at key k0, clamped to [0, kN]: the
// per-element causal / window test becomes two 32-bit compares.
template <int kN>
__device__ __forceinline__ void tile_bounds(int64_t lo, int64_t hi, int64_t k0, int& tlo, int& thi) {
  const int64_t a = lo - k0, z = hi - k0;
  tlo = (int)(a < 0 ? 0 : (a > kN ? kN : a));
  thi = (int)(z < 0 ? 0 : (z > kN ? kN : z));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>)
    return (uint32_t)__half_as_ushort(__float2half_rn(lo)) | ((uint32_t)__half_as_ushort(__float2half_rn(hi)) << 16);
  else
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}

template <typename T>
__device__ __forceinline__ float b16_at(const unsigned char* p) {
  return load_float(*reinterpret_cast<const T*>(p));
}

}  // namespace
}  // namespace PYLLM_CUDA_NS
}  // namespace pyllm

// Tensor-core attention forward for fp16/bf16 (FlashAttention-2's design, pyllm's code).
//
// CTA = 4 warps = 64 query rows of one (batch, head); warp w owns rows 16w..16w+15 (one
// m16 tile). 64 rows rather than 128: half the registers and shared memory per CTA, so two
// CTAs fit an SM at head dim 128, and short sequences still fill the GPU (B*H*Lq/64 CTAs).
// Key/value tiles of kN keys (64 up to head dim 128, 32 above) arrive by cp.async (16-byte,
// zero-filled past the last row / head dim) into double-buffered shared memory: the next K
// tile loads while this tile's softmax and PV product run, the V tile while S = QK^T runs.
// Shared-memory rows are 16-byte chunks; with a multiple of 8 chunks per row, chunk c of row
// r sits at c ^ (r % 8) (XOR swizzle), otherwise rows are padded to an odd chunk count: both
// put the 8 rows of every ldmatrix phase in 8 different bank groups (no bank conflicts;
// tests/test_attention_tc.py counts them under the emulation).
//
// S = Q K^T and O += P V run as mma.sync.m16n8k16 with fp32 accumulators. Q fragments stay in
// registers for head dims <= 128 (re-read from shared memory by ldmatrix above, to stay
// within 255 registers). The online softmax works on the S accumulator fragments: each
// lane holds 2 rows (lane/4 and lane/4 + 8) x 2 adjacent keys per n-tile; row max by a
// quad shuffle, exp2 with log2(e) folded into the scale, row sums kept per lane and reduced
// once at the end. P is rounded to fp16/bf16 in registers and reused as the A operand of
// the PV product (the S C-fragment layout of n-tiles 2k, 2k+1 is the A layout of k-step k).
//
// Masks (same semantics as the SIMT kernel, attention.cu): causal / windows from AttnGeom
// (tiles no query row of the CTA can see are never loaded; tiles every row sees in full
// skip the per-element test), bool / additive masks of any broadcast via RowIndexer, ALiBi,
// GQA (kv head = h / group, K/V never repeated), counter-based dropout, fully-masked rows
// -> zeros with lse -inf, NaN scores -> NaN rows.
// Non-finite values in V: a key whose probability is 0 must contribute nothing (pyllm's
// rule, docs/RELIABILITY.md), but a tensor-core product gives 0 * inf = NaN. Each thread
// checks the V chunks it copied; when a tile has a non-finite value (block vote) the warps
// take an exact SIMT product for that tile that skips zero probabilities (P staged through
// shared memory, 16 keys at a time).
#include "common.cuh"
#include "attention_tc.cuh"
#include "attention_tc_tile.cuh"
#include "../include/pyllm/tensor_core.cuh"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace pyllm {
namespace PYLLM_CUDA_NS {
namespace {

struct TcParams : AttnFeatures {  // geometry, mask indexing, ALiBi, dropout: AttnFeatures
  const void* q;
  const void* k;
  const void* v;
  void* out;                    // [B, Hq, Lq, Dv] contiguous
  float* lse;                   // [B, Hq, Lq]
  int64_t qs[3], ks[3], vs[3];  // element strides of dims B, H, L (16-byte multiples)
  int64_t Hq, Lq, Lk, group;
  int64_t d8, dv8;              // q/k and v head dims as stored (multiples of 8; zero-padded)
  int64_t Dv;                   // v head dim written to out
  float scale_log2;             // scale * log2(e)
  const void* mask;             // rows at mi.offset(row), columns mi.col_stride apart
  int mask_kind;
  // Split-KV (flash-decoding): CTA s of a query tile covers key tiles [s * split_tiles,
  // (s + 1) * split_tiles) and writes its normalised fp32 output and lse to part_o / part_lse
  // ([nsplit, B * Hq * Lq, Dv] / [nsplit, B * Hq * Lq]); attn_tc_combine_kernel merges them.
  int nsplit;
  int split_tiles;
  float* part_o;                // null when nsplit == 1
  float* part_lse;
  int64_t rows;                 // B * Hq * Lq
  // GQA packing (Lq < 64: decode, short prompts): a CTA's rows are (query head of the kv group,
  // query) pairs, row r of the kv head's group*Lq -> head kvh*group + r/Lq, query r%Lq, so one
  // CTA serves the whole group from one read of K/V and its 64 rows are not mostly padding.
  bool pack;
  int64_t Hkv;
};

// Query head and query index of row pr of a CTA's row space; false past its end.
__device__ __forceinline__ bool tc_row(const TcParams& p, int64_t hx, int64_t pr, int64_t& h, int64_t& i) {
  if (p.pack) {
    h = hx * p.group + pr / p.Lq;
    i = pr % p.Lq;
    return pr < p.group * p.Lq;
  }
  h = hx;
  i = pr;
  return pr < p.Lq;
}

template <typename T, int kD>
__global__ void __launch_bounds__(kTcThreads) attn_tc_fwd_kernel(TcParams p) {
  using Tile = TcTile<kD>;
  constexpr int kN = Tile::kN;
  constexpr int kNT = kN / 8;   // S n-tiles
  constexpr int kOT = kD / 8;   // O n-tiles
  constexpr int kKS = kD / 16;  // k-steps of Q K^T
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int64_t nrows = p.pack ? p.group * p.Lq : p.Lq;  // the row space of one CTA "head" hx
  const int64_t heads = p.pack ? p.Hkv : p.Hq;
  const int64_t nmt = (nrows + kBlockM - 1) / kBlockM;
  const int split = (int)((int64_t)blockIdx.x % p.nsplit);
  const int64_t cta = (int64_t)blockIdx.x / p.nsplit;
  const int64_t bh = cta / nmt;
  const int64_t mt = nmt - 1 - cta % nmt;  // last query tiles (most keys if causal) first
  const int64_t b = bh / heads, hx = bh % heads, kvh = p.pack ? hx : hx / p.group;
  const int64_t pr0 = mt * kBlockM, pr1 = (pr0 + kBlockM < nrows ? pr0 + kBlockM : nrows) - 1;
  // Smallest and largest query index among the CTA's rows (the key range and full-tile test).
  int64_t i0 = pr0, ilast = pr1;
  if (p.pack) {
    const bool one_head = pr0 / p.Lq == pr1 / p.Lq;
    i0 = one_head ? pr0 % p.Lq : 0;
    ilast = one_head ? pr1 % p.Lq : p.Lq - 1;
  }

  unsigned char* sq = pyllm_dynamic_smem<unsigned char>();
  unsigned char* sk = sq + 16 * Tile::kQChunks;
  unsigned char* sv = sk + 2 * 16 * Tile::kKVChunks;
  const T* kb = static_cast<const T*>(p.k) + b * p.ks[0] + kvh * p.ks[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.vs[0] + kvh * p.vs[1];

  // The two rows of this lane: lane/4 and lane/4 + 8 of the warp's 16.
  // Row and key indices fit 32 bits (attention_tc_eligible); 64-bit only where products need it.
  int ri[2], rlo[2], rhi[2];
  int64_t rid[2], moff[2];
  bool rvalid[2];
  float slope[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int64_t h;
    int64_t i;
    rvalid[r] = tc_row(p, hx, pr0 + warp * 16 + lane / 4 + 8 * r, h, i);
    const bool valid = rvalid[r];
    if (!valid) {  // past the end: any in-range row, never written
      h = kvh * p.group;
      i = 0;
    }
    ri[r] = (int)i;
    rlo[r] = valid ? (int)p.g.lo(i) : 0;
    rhi[r] = valid ? (int)p.g.hi(i) : 0;  // invalid rows see nothing
    rid[r] = (b * p.Hq + h) * p.Lq + ri[r];
    moff[r] = p.mask_kind != kMaskNone ? p.mi.offset(rid[r]) : 0;
    slope[r] = p.alibi ? p.alibi[b * p.alibi_bstride + h] * kLog2e : 0.f;
  }
  const bool elementwise = p.mask_kind != kMaskNone || p.alibi != nullptr;

  const int64_t klo = p.g.lo(i0);
  int64_t khi = p.g.hi(ilast);
  if (khi < klo) khi = klo;
  const int ntiles_all = (int)((khi - klo + kN - 1) / kN);
  const int t_begin = split * p.split_tiles;  // this CTA's key tiles: [t_begin, ntiles)
  const int ntiles = t_begin + p.split_tiles < ntiles_all ? t_begin + p.split_tiles : ntiles_all;

  // Prologue: Q, then the first K tile.
  {
    constexpr int kPer = kBlockM * Tile::kChunks / kTcThreads;
    const T* qbase = static_cast<const T*>(p.q) + b * p.qs[0];
#pragma unroll
    for (int n = 0; n < kPer; ++n) {  // Q rows: each its own (head, query) in packed mode
      const int idx = tid + n * kTcThreads;
      const int r = idx / Tile::kChunks, c = idx % Tile::kChunks;
      int64_t h, i;
      const bool ok = tc_row(p, hx, pr0 + r, h, i) && c * 8 < p.d8;
      const T* src = ok ? qbase + h * p.qs[1] + i * p.qs[2] + c * 8 : qbase;
      tc::cp_async_cg16(sq + Tile::off(r, c), src, ok ? 16 : 0);
    }
  }
  tc::cp_async_commit();
  if (t_begin < ntiles) load_tile<kD, kN>(sk + (t_begin & 1) * 16 * Tile::kKVChunks, kb, p.ks[2],
                                         klo + (int64_t)t_begin * kN, khi, p.d8);
  tc::cp_async_commit();

  float o[kOT][4];
#pragma unroll
  for (int n = 0; n < kOT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  uint32_t qf[Tile::kQInRegs ? kKS : 1][4];

  // ldmatrix lane roles: lanes 8m..8m+7 address the rows of matrix m.
  const int lm = lane / 8, lr = lane % 8;
  const TcLane<kD> qlane(lr, lm / 2);   // Q (A operand): matrices (rows +0/+8) x (chunk +0/+1)
  const TcLane<kD> klane(lr, lm % 2);   // K (B operand): matrices (chunk +0/+1) x (keys +0/+8)
  const TcLane<kD> vlane(lr, lm / 2);   // V (B operand, .trans): (keys +0/+8) x (chunk +0/+1)
  const int qrow = 2 * warp + lm % 2, krow = lm / 2, vrow = lm % 2;  // 8-row block of this lane

  for (int t = t_begin; t < ntiles; ++t) {
    const int64_t k0 = klo + (int64_t)t * kN;
    unsigned char* skt = sk + (t & 1) * 16 * Tile::kKVChunks;
    unsigned char* svt = sv + (t & 1) * 16 * Tile::kKVChunks;
    load_tile<kD, kN>(svt, vb, p.vs[2], k0, khi, p.dv8);  // V of this tile, lands during S and softmax
    tc::cp_async_commit();
    tc::cp_async_wait<1>();  // Q and this K tile have landed (this V tile may not have)
    __syncthreads();

    if constexpr (Tile::kQInRegs) {
      if (t == t_begin) {
#pragma unroll
        for (int kk = 0; kk < kKS; ++kk)
          tc::ldmatrix_x4(qf[kk], sq + qlane.at(qrow, kk));
      }
    }

    // S = Q K^T for this warp's 16 rows and the tile's kN keys.
    float s[kNT][4];
#pragma unroll
    for (int n = 0; n < kNT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKS; ++kk) {
      uint32_t a[4];
      if constexpr (Tile::kQInRegs) {
#pragma unroll
        for (int x = 0; x < 4; ++x) a[x] = qf[kk][x];
      } else {
        tc::ldmatrix_x4(a, sq + qlane.at(qrow, kk));
      }
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bf[4];  // K rows np*16 + (lm/2)*8 + lr, d chunk 2kk + lm%2
        tc::ldmatrix_x4(bf, skt + klane.at(2 * np + krow, kk));
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        tc::mma_m16n8k16<T>(s[2 * np], a, b0, s[2 * np]);
        tc::mma_m16n8k16<T>(s[2 * np + 1], a, b1, s[2 * np + 1]);
      }
    }

    // The next K tile loads during the softmax and the PV product. Its buffer was last read
    // in iteration t - 1, before every thread passed this iteration's barrier.
    if (t + 1 < ntiles) load_tile<kD, kN>(sk + ((t + 1) & 1) * 16 * Tile::kKVChunks, kb, p.ks[2], k0 + kN, khi, p.d8);
    tc::cp_async_commit();

    // Scores in log2 units; the per-element test only on tiles some row sees in part.
    const bool full = !elementwise && k0 >= p.g.lo(ilast) && k0 + kN <= p.g.hi(i0);
    // Row bounds relative to this tile, clamped to [0, kN]: 32-bit compares per element.
    int tlo[2], thi[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) tile_bounds<kN>(rlo[r], rhi[r], k0, tlo[r], thi[r]);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        float x = s[n][e] * p.scale_log2;
        if (!full) {
          const int jt = n * 8 + 2 * (lane % 4) + (e % 2);
          if (jt < tlo[r] || jt >= thi[r]) {
            x = -INFINITY;
          } else {
            const int64_t j = k0 + jt;
            if (p.alibi) {
              const int64_t pos = (int64_t)ri[r] + p.g.shift;
              x -= slope[r] * (float)(pos > j ? pos - j : j - pos);
            }
            if (p.mask_kind == kMaskBool) {
              if (!static_cast<const bool*>(p.mask)[moff[r] + j * p.mi.col_stride]) x = -INFINITY;
            } else if (p.mask_kind == kMaskFloat) {
              x += static_cast<const float*>(p.mask)[moff[r] + j * p.mi.col_stride] * kLog2e;
            }
          }
        }
        s[n][e] = x;
        mx[r] = fmaxf(mx[r], x);  // fmaxf skips NaN: NaN scores reach the sum instead
      }
    }
    float alpha[2], ls[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 2));
      const float mnew = fmaxf(m[r], mx[r]);
      const float muse = mnew == -INFINITY ? 0.f : mnew;  // fully hidden so far: exp2(-inf - 0) = 0
      alpha[r] = exp2f(m[r] - muse);
      m[r] = mnew;
      mx[r] = muse;
    }
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        float pr = exp2f(s[n][e] - mx[r]);
        ls[r] += pr;
        if (p.dropout) {
          const int64_t j = k0 + n * 8 + 2 * (lane % 4) + (e % 2);
          pr *= dropout_hash(p.seed, (uint64_t)rid[r] * (uint64_t)p.Lk + (uint64_t)j) >= p.drop_threshold
                    ? p.drop_scale
                    : 0.f;
        }
        s[n][e] = pr;
      }
    }
    // P rounded to T in the A-fragment layout of the PV product: the C fragments of n-tiles
    // 2kk, 2kk+1 are the A fragment of k-step kk. Packed before the barrier below so that
    // only these kN / 4 words, not the kN / 2 fp32 scores, stay live across it.
    uint32_t pa[kN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      pa[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + ls[r];
#pragma unroll
    for (int n = 0; n < kOT; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }

    tc::cp_async_wait<1>();  // this V tile has landed (the next K tile may not have)
    const bool nonfinite = __syncthreads_or(tile_has_nonfinite<kD, kN, T>(svt)) != 0;

    if (!nonfinite) {
      // O += P V on tensor cores.
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk) {
        const uint32_t(&a)[4] = pa[kk];
#pragma unroll
        for (int dp = 0; dp < kOT / 2; ++dp) {
          uint32_t bf[4];  // V rows (keys) kk*16 + (lm%2)*8 + lr, d chunk 2dp + lm/2, transposed
          tc::ldmatrix_x4_trans(bf, svt + vlane.at(2 * kk + vrow, dp));
          const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
          tc::mma_m16n8k16<T>(o[2 * dp], a, b0, o[2 * dp]);
          tc::mma_m16n8k16<T>(o[2 * dp + 1], a, b1, o[2 * dp + 1]);
        }
      }
    } else {
      // Exact product skipping zero probabilities, 16 keys at a time: the warp writes its P
      // block (16 rows x 16 keys, as T) to its 512 bytes of this tile's K buffer (free: every
      // warp finished S before the vote above; the next K tile loads into the other buffer).
      unsigned char* pw = skt + warp * 512;
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk) {
        __syncwarp();
#pragma unroll
        for (int half = 0; half < 2; ++half) {  // n-tiles 2kk, 2kk+1 = keys 0-7, 8-15 of the block
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            uint32_t* d = reinterpret_cast<uint32_t*>(pw + 2 * (16 * (lane / 4 + 8 * r) + 8 * half + 2 * (lane % 4)));
            *d = pa[kk][2 * half + r];
          }
        }
        __syncwarp();
        // Column block outermost, keys innermost (a rolled loop): a few registers beyond o, so
        // this rare path does not push the common one into spills at head dim 256.
#pragma unroll
        for (int dn = 0; dn < kOT; ++dn) {
#pragma unroll 1
          for (int jj = 0; jj < 16; ++jj) {
            const float p0 = b16_at<T>(pw + 2 * (16 * (lane / 4) + jj));
            const float p1 = b16_at<T>(pw + 2 * (16 * (lane / 4 + 8) + jj));
            const unsigned char* vp = svt + Tile::off(kk * 16 + jj, dn) + 2 * (2 * (lane % 4));
            const float v0 = b16_at<T>(vp), v1 = b16_at<T>(vp + 2);
            if (p0 != 0.f) {
              o[dn][0] += p0 * v0;
              o[dn][1] += p0 * v1;
            }
            if (p1 != 0.f) {
              o[dn][2] += p1 * v0;
              o[dn][3] += p1 * v1;
            }
          }
        }
      }
    }
  }
  tc::cp_async_wait<0>();  // nothing may still be landing when the output reuses shared memory

  // Row sums across the quad, then the normalised rows go through shared memory (the Q tile)
  // so that global stores are whole 16-byte chunks.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(kFullMask, l[r], 1);
    l[r] += __shfl_xor_sync(kFullMask, l[r], 2);
    const bool seen = l[r] > 0.f || l[r] != l[r];  // something visible (or a NaN score)
    inv[r] = seen ? 1.f / l[r] : 0.f;
    const float lse = seen ? m[r] * kLn2 + logf(l[r]) : -INFINITY;
    if (lane % 4 == 0 && rvalid[r]) (p.part_o ? p.part_lse + split * p.rows : p.lse)[rid[r]] = lse;
  }
  if (p.part_o != nullptr) {  // split-KV: this split's normalised rows, fp32, for the combine kernel
    float* po = p.part_o + split * p.rows * p.Dv;
#pragma unroll
    for (int n = 0; n < kOT; ++n) {
      const int col = n * 8 + 2 * (lane % 4);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (!rvalid[r]) continue;
        if (col < p.Dv) po[rid[r] * p.Dv + col] = o[n][2 * r] * inv[r];
        if (col + 1 < p.Dv) po[rid[r] * p.Dv + col + 1] = o[n][2 * r + 1] * inv[r];
      }
    }
    return;  // uniform across the CTA: no barrier follows on this path
  }
  // Each warp stages its own 16 rows in its own rows of the Q tile (no other warp reads them)
  // and stores them from there: no block barrier, and the row arithmetic is not the
  // prologue's (a shared expression would keep the prologue's per-row addresses live in
  // registers through the whole key loop).
  // The Q rows were copied by threads of every warp: with no key tile, no barrier has yet
  // ordered their landing before this warp overwrites them (t_begin >= ntiles is CTA-uniform).
  if (t_begin >= ntiles) __syncthreads();
  __syncwarp();
#pragma unroll
  for (int n = 0; n < kOT; ++n) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      uint32_t* dst = reinterpret_cast<uint32_t*>(sq + Tile::off(warp * 16 + lane / 4 + 8 * r, n) + 4 * (lane % 4));
      *dst = pack2<T>(o[n][2 * r] * inv[r], o[n][2 * r + 1] * inv[r]);
    }
  }
  __syncwarp();
  const bool vec = p.Dv % 8 == 0;
#pragma unroll
  for (int n = 0; n < 16 * Tile::kChunks / kWarpSize; ++n) {
    const int idx = lane + n * kWarpSize;
    const int r = warp * 16 + idx / Tile::kChunks, c = idx % Tile::kChunks;
    int64_t h, i;
    if (!tc_row(p, hx, pr0 + r, h, i) || c * 8 >= p.Dv) continue;
    const unsigned char* src = sq + Tile::off(r, c);
    T* dst = static_cast<T*>(p.out) + ((b * p.Hq + h) * p.Lq + i) * p.Dv + c * 8;
    if (vec) {
      const uint32_t* w = reinterpret_cast<const uint32_t*>(src);
      uint32_t* d = reinterpret_cast<uint32_t*>(dst);
      d[0] = w[0];
      d[1] = w[1];
      d[2] = w[2];
      d[3] = w[3];
    } else {
      const T* e = reinterpret_cast<const T*>(src);
      for (int x = 0; x < 8 && c * 8 + x < p.Dv; ++x) dst[x] = e[x];
    }
  }
}

// Merges the splits of each row: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s.
// One warp per row. A split that saw nothing has lse_s = -inf and weight 0 (skipped, so an Inf
// in its zeros cannot make a NaN); a NaN lse_s (a NaN score) makes the row NaN, as unsplit.
template <typename T>
__global__ void attn_tc_combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                                       T* __restrict__ out, float* __restrict__ lse, int nsplit, int64_t rows,
                                       int64_t Dv) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // whole warps only; no barrier in this kernel
  float mx = -INFINITY;
  bool nan = false;
  for (int s = 0; s < nsplit; ++s) {
    const float v = part_lse[s * rows + row];
    nan |= v != v;
    mx = fmaxf(mx, v);
  }
  float total = 0.f;
  for (int s = 0; s < nsplit; ++s) {
    const float v = part_lse[s * rows + row];
    if (mx != -INFINITY && v != -INFINITY) total += expf(v - mx);
  }
  const bool dead = mx == -INFINITY && !nan;
  for (int64_t d = lane; d < Dv; d += kWarpSize) {
    float acc = 0.f;
    if (nan) {
      acc = NAN;
    } else if (!dead) {
      for (int s = 0; s < nsplit; ++s) {
        const float v = part_lse[s * rows + row];
        const float w = v == -INFINITY ? 0.f : expf(v - mx) / total;
        if (w != 0.f) acc += w * part_o[(s * rows + row) * Dv + d];
      }
    }
    out[row * Dv + d] = store_float<T>(acc);
  }
  if (lane == 0) lse[row] = nan ? NAN : (dead ? -INFINITY : mx + logf(total));
}

// ------------------------------------------------------------------------------ host
// CTAs that keep every SM busy: two per SM (the occupancy of the common head dims).
int target_ctas() {
#if defined(PYLLM_EMULATED)
  return 2 * 132;  // as on an H100: the emulated kernels split exactly as they would there
#else
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
                                                 cudaSuccess)
    sms = 108;
  return 2 * sms;
#endif
}

// Key splits per query tile: enough CTAs to fill the GPU when B * Hq * query tiles cannot (decode,
// short prompts over a long cache), each split at least 2 key tiles, at most 32 splits.
// PYLLM_ATTENTION_SPLITS=n forces n (tests, tuning).
int choose_splits(int64_t ctas, int64_t key_tiles) {
  if (const char* env = std::getenv("PYLLM_ATTENTION_SPLITS")) {
    const long n = std::strtol(env, nullptr, 10);
    TORCH_CHECK(n >= 1 && n <= 1024, "pyllm: PYLLM_ATTENTION_SPLITS must be in [1, 1024], got '", env, "'");
    return (int)std::min<int64_t>(n, std::max<int64_t>(key_tiles, 1));
  }
  const int64_t target = target_ctas();
  if (ctas >= target || key_tiles < 4) return 1;
  const int64_t want = (target + ctas - 1) / ctas;
  return (int)std::max<int64_t>(1, std::min<int64_t>({want, key_tiles / 2, 32}));
}

std::atomic<int> g_last_splits{0};      // for tests: the split count of the last launch
std::atomic<int64_t> g_last_ctas{0};    // and its CTAs per split (query tiles x heads x batch)

template <typename T, int kD>
void launch_tc(TcParams p, int64_t B, T* out, float* lse, const at::TensorOptions& fopt) {
  using Tile = TcTile<kD>;
  auto kern = attn_tc_fwd_kernel<T, kD>;
  const int64_t ctas = p.pack ? B * p.Hkv * ((p.group * p.Lq + kBlockM - 1) / kBlockM)
                             : B * p.Hq * ((p.Lq + kBlockM - 1) / kBlockM);
  const int64_t key_tiles = (p.Lk + Tile::kN - 1) / Tile::kN;
  p.nsplit = choose_splits(ctas, key_tiles);
  p.split_tiles = (int)((key_tiles + p.nsplit - 1) / p.nsplit);
  g_last_splits.store(p.nsplit);
  g_last_ctas.store(ctas);
  p.rows = B * p.Hq * p.Lq;
  at::Tensor part;
  if (p.nsplit > 1) {
    part = at::empty({p.nsplit * p.rows * (p.Dv + 1)}, fopt);  // fp32 workspace: partial outputs, then lse
    p.part_o = part.data_ptr<float>();
    p.part_lse = p.part_o + p.nsplit * p.rows * p.Dv;
  }
  const int64_t blocks = ctas * p.nsplit;
  TORCH_CHECK(blocks <= 0x7fffffff, "pyllm: attention grid too large (", blocks, " CTAs)");
  if (Tile::kSmemBytes > 48 * 1024) {  // dynamic shared memory above 48 KiB is opt-in per kernel
    const cudaError_t err =
        cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tile::kSmemBytes);
    TORCH_CHECK(err == cudaSuccess, "pyllm: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, ", Tile::kSmemBytes,
                ") failed: ", cudaGetErrorString(err));
  }
  PYLLM_LAUNCH(kern, (unsigned)blocks, kTcThreads, Tile::kSmemBytes, PYLLM_STREAM(), p);
  if (p.nsplit > 1) {
    constexpr int kRowsPerBlock = 4;
    auto comb = attn_tc_combine_kernel<T>;
    PYLLM_LAUNCH(comb, (unsigned)((p.rows + kRowsPerBlock - 1) / kRowsPerBlock), kRowsPerBlock * kWarpSize, 0,
                 PYLLM_STREAM(), p.part_o, p.part_lse, out, lse, p.nsplit, p.rows, p.Dv);
  }
}

template <typename T>
void dispatch_head_dim(int kd, const TcParams& p, int64_t B, T* out, float* lse, const at::TensorOptions& f) {
  switch (kd) {
    case 32: return launch_tc<T, 32>(p, B, out, lse, f);
    case 64: return launch_tc<T, 64>(p, B, out, lse, f);
    case 96: return launch_tc<T, 96>(p, B, out, lse, f);
    case 128: return launch_tc<T, 128>(p, B, out, lse, f);
    case 160: return launch_tc<T, 160>(p, B, out, lse, f);
    case 192: return launch_tc<T, 192>(p, B, out, lse, f);
    case 256: return launch_tc<T, 256>(p, B, out, lse, f);
    default: TORCH_CHECK(false, "pyllm: no tensor-core attention instantiation for head dim ", kd);
  }
}

template <int kD>
void add_config(std::vector<std::vector<int64_t>>& out) {
  using Tile = TcTile<kD>;
  out.push_back({kD, kBlockM, Tile::kN, kTcThreads, (int64_t)Tile::kSmemBytes, Tile::kQInRegs ? 1 : 0,
                 Tile::kPitch, Tile::kXor ? 1 : 0});
}

}  // namespace

// A view the kernel can read with 16-byte cp.async: last dim contiguous and a multiple of 8
// (zero-padded copy otherwise), 16-byte aligned start and row/head/batch strides.
at::Tensor tc_operand(const at::Tensor& t) {
  const int64_t d = t.size(3);
  if (d % 8 != 0) return at::constant_pad_nd(t, {0, 8 - d % 8}, 0).contiguous();
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3 && ok; ++i) ok = t.size(i) <= 1 || t.stride(i) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);  // a fresh allocation is aligned
}

int attention_tc_last_splits() { return g_last_splits.load(); }
int64_t attention_tc_last_ctas() { return g_last_ctas.load(); }

std::vector<std::vector<int64_t>> attention_tc_configs() {
  std::vector<std::vector<int64_t>> out;
  add_config<32>(out);
  add_config<64>(out);
  add_config<96>(out);
  add_config<128>(out);
  add_config<160>(out);
  add_config<192>(out);
  add_config<256>(out);
  return out;
}

bool attention_tc_eligible(const at::Tensor& q, const at::Tensor& v) {
  const char* env = std::getenv("PYLLM_ATTENTION_KERNEL");
  if (env != nullptr && std::strcmp(env, "simt") == 0) return false;
  const auto dt = q.scalar_type();
  // Query and key indices are 32-bit in the kernel (registers); longer sequences take the SIMT kernel.
  constexpr int64_t kMaxLen = ((int64_t)1 << 31) - 1024;
  return (dt == at::kHalf || dt == at::kBFloat16) && q.size(3) <= kTcMaxHeadDim && v.size(3) <= kTcMaxHeadDim &&
         q.size(3) > 0 && v.size(3) > 0 && q.size(2) < kMaxLen && v.size(2) < kMaxLen;
}

int attention_tc_head_dim(int64_t d, int64_t dv) {
  const int64_t m = d > dv ? d : dv;
  for (int kd : {32, 64, 96, 128, 160, 192, 256})
    if (m <= kd) return kd;
  return 0;
}

void attention_tc_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const TcAttnArgs& a, at::Tensor& out, at::Tensor& lse) {
  const at::Tensor q = tc_operand(query), k = tc_operand(key), v = tc_operand(value);
  TcParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  for (int d = 0; d < 3; ++d) {
    p.qs[d] = q.stride(d);
    p.ks[d] = k.stride(d);
    p.vs[d] = v.stride(d);
  }
  const int64_t B = q.size(0);
  p.Hq = q.size(1);
  p.Lq = q.size(2);
  p.Lk = k.size(2);
  p.group = p.Hq / k.size(1);
  p.d8 = q.size(3);
  p.dv8 = v.size(3);
  p.Dv = value.size(3);
  static_cast<AttnFeatures&>(p) = a.f;
  p.scale_log2 = a.scale * kLog2e;
  p.mask = a.mask.defined() ? a.mask.data_ptr() : nullptr;
  p.mask_kind = !a.mask.defined() ? kMaskNone : (a.mask.scalar_type() == at::kBool ? kMaskBool : kMaskFloat);
  const int kd = attention_tc_head_dim(query.size(3), value.size(3));
  p.nsplit = 1;
  p.Hkv = k.size(1);
  p.pack = p.Lq < kBlockM;  // decode and short prompts: the kv group's query heads share CTAs
  if (q.scalar_type() == at::kHalf)
    dispatch_head_dim<__half>(kd, p, B, reinterpret_cast<__half*>(out.data_ptr()), p.lse, lse.options());
  else
    dispatch_head_dim<__nv_bfloat16>(kd, p, B, reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), p.lse,
                                     lse.options());
}

}  // namespace PYLLM_CUDA_NS
}  // namespace pyllm

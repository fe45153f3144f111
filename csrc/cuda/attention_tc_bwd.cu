// Tensor-core attention backward for fp16/bf16, head dims <= 256 (FlashAttention-2's backward
// design, pyllm's code). fp32 keeps the SIMT kernels (attention.cu).
//
// CTA = 4 warps = 64 keys of one (batch, kv head); warp w owns keys 16w..16w+15. The CTA loads
// its K and V rows once and walks every query tile (kM = 32 queries at head dim <= 64, 16 above,
// for registers) of every query head of its kv group (GQA: dK / dV summed over the group in
// registers, deterministic); up to head dim 128 the next tile's Q and dO load (cp.async, double
// buffered) while the current one computes. Per query tile, each warp computes, on tensor cores (m16n8k16,
// fp32 accumulators), for its 16 keys x kM queries:
//   S^T  = K_w Q^T                 (A: K rows from shared memory, B: Q rows)
//   dP^T = V_w dO^T                (A: V rows, B: dO rows)
//   P^T  = exp(S^T * scale + masks - lse), dS^T = P^T (dP^T z - delta)    (z: dropout factor)
//   dV_w += (P^T z) dO             (A: the P^T C fragments repacked, B: dO by ldmatrix.trans)
//   dK_w += dS^T Q                 (A: dS^T repacked, B: Q by ldmatrix.trans)
// and stores dS^T (as T) in shared memory; then the CTA computes dQ (kM x D) += dS K for the
// tile (A: dS by ldmatrix.trans of dS^T, B: K by ldmatrix.trans), warps split over query row
// blocks and column halves, and adds it into an fp32 dQ buffer with atomicAdd (converted and
// scaled on the host). Deterministic mode (torch.use_deterministic_algorithms) skips that phase
// and the host computes dQ with the SIMT dq kernel (one warp per query row, no atomics).
// Head dims above 128 split the columns (kSplit = 2): dK and dV of 64 keys x 256 columns do not fit
// in registers, so kSplit CTAs share a key block, each computing the full S^T and dP^T (a
// reduction over every column of the head dim) but accumulating only its own 128 columns of dK, dV
// and dQ: S^T and dP^T are computed twice (7 products' worth of tensor work where 5 are needed).
// delta = rowsum(dO * O) comes from the host (fp64 products). Masks: everything the forward
// takes (causal / windows from AttnGeom, bool / additive masks via RowIndexer with the
// additive mask's gradient dS written once per (row, key), ALiBi, dropout replayed from the
// forward's counter-based hash), element by element.
#include "common.cuh"
#include "attention_tc.cuh"
#include "attention_tc_tile.cuh"

#include <cstring>

namespace pyllm {
namespace PYLLM_CUDA_NS {
namespace {

constexpr int kBwdKeys = 16 * kTcWarps;  // keys per CTA

struct TcBwdParams : AttnFeatures {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;                     // T, same geometry as the output
  const float* lse;                     // [B, Hq, Lq]
  const float* delta;                   // [B, Hq, Lq]
  float* dq;                            // fp32 [B, Hq, Lq, D], atomics; null in deterministic mode
  float* dk;                            // fp32 [B, Hkv, Lk, D]
  float* dv;                            // fp32 [B, Hkv, Lk, Dv]
  float* dmask;                         // fp32 [B, Hq, Lq, Lk] or null
  int64_t qs[3], ks[3], vs[3], os[3];   // element strides of dims B, H, L (16-byte multiples)
  int64_t Hq, Hkv, Lq, Lk, group;
  int64_t d8, dv8;                      // head dims as stored (multiples of 8, zero-padded)
  int64_t D, Dv;                        // head dims written
  float scale, scale_log2;
  const void* mask;
  int mask_kind;
  const bool* skip_if;                  // device flag: return at once when set (non-finite inputs)
};

template <int kD>
struct BwdTile {
  using Row = TcTile<kD>;                         // K, V, Q, dO rows: kD / 8 chunks, swizzled
  // Column parts: each CTA of a key block owns kDH = kD / kSplit columns of dK, dV and dQ.
  static constexpr int kSplit = kD <= 128 ? 1 : 2;
  static constexpr int kDH = kD / kSplit;
  // Queries per step: 32 at head dim 64, 16 at 128 (more spills registers: the dK and dV
  // accumulators already take kDH / 2 each; ptxas -v, docs/GPU.md).
  static constexpr int kM = kDH <= 64 ? 32 : 16;
  using Ds = TcLayout<kM / 8>;                    // dS^T: kBwdKeys rows (keys) x kM queries
  static constexpr int kRowBlocks = kM / 16;      // dQ phase: 16-query row blocks ...
  static constexpr int kColSplit = kTcWarps / kRowBlocks;  // ... each shared by this many warps
  // Buffers of the per-step inputs (Q, dO, lse, delta, mask row offsets): two up to head dim 128,
  // the next step's loading while this one computes; one with column parts (shared memory).
  static constexpr int kBuf = kSplit > 1 ? 1 : 2;
  static constexpr int kOffV = 16 * kBwdKeys * Row::kPitch;
  static constexpr int kTileQ = 16 * kM * Row::kPitch;  // bytes of one Q or dO tile
  static constexpr int kOffQ = 2 * kOffV;                // buffer b: Q at kOffQ + 2 b kTileQ, then dO
  // With column parts (head dim 256) the dS^T tile reuses the dO tile's space once dV's products
  // have read it (one more barrier per step): 80 KiB instead of 83, two CTAs per A100 SM.
  static constexpr bool kDsOverDO = kSplit > 1;
  static constexpr int kOffDS = kDsOverDO ? kOffQ + kTileQ : kOffQ + 2 * kBuf * kTileQ;
  static constexpr int kOffLse = kDsOverDO ? kOffQ + 2 * kTileQ : kOffDS + 16 * kBwdKeys * Ds::kPitch;
  static constexpr int kOffDelta = kOffLse + 4 * kM * kBuf;
  static constexpr int kOffMask = kOffDelta + 4 * kM * kBuf;  // mask row offsets (int64)
  static constexpr size_t kSmemBytes = kOffMask + 8 * kM * kBuf;
  static_assert((kDH / 8) % (2 * kColSplit) == 0, "dQ column split");
  static_assert((kM * (kD / 8)) % kTcThreads == 0, "loader split");
  static_assert(!kDsOverDO || (kBwdKeys * Ds::kPitch <= kM * Row::kPitch && kBuf == 1), "dS^T fits in the dO tile");
};

// Minimum CTAs per SM (ptxas heuristics, measured with -Xptxas -v): at head dim 64 without it ptxas
// for sm_90 stops at 168 registers and spills; at 128 any minimum (0 = none) makes sm_80 spill.
template <typename T, int kD>
__global__ void __launch_bounds__(kTcThreads, kD <= 64 ? 2 : 0) attn_tc_bwd_kernel(TcBwdParams p) {
  using Bt = BwdTile<kD>;
  using Ds = typename Bt::Ds;
  constexpr int kM = Bt::kM;
  constexpr int kNT = kM / 8;   // S^T n-tiles (queries)
  constexpr int kOT = Bt::kDH / 8;  // dK / dV n-tiles (this CTA's columns of the head dim)
  constexpr int kOTq = kOT / Bt::kColSplit;  // dQ n-tiles per warp
  if (p.skip_if != nullptr && *p.skip_if) return;  // uniform: the SIMT kernels serve this call
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  // The kSplit CTAs of a key block are adjacent (they read the same K, V, Q and dO).
  const int part = (int)(blockIdx.x % Bt::kSplit);
  // Byte offset of this CTA's first column in a K / Q / dO tile row: a whole number of 8-chunk
  // groups, so it commutes with the XOR swizzle and TcLane::at keeps compile-time chunk indices.
  static_assert(Bt::kSplit == 1 || kOT % 8 == 0, "column parts of whole 8-chunk groups");
  const int coff = part * 16 * kOT;
  const int64_t blk = (int64_t)blockIdx.x / Bt::kSplit;
  const int64_t nkt = (p.Lk + kBwdKeys - 1) / kBwdKeys;
  const int64_t bkv = blk / nkt, b = bkv / p.Hkv, kvh = bkv % p.Hkv;
  const int64_t j0 = (blk % nkt) * kBwdKeys;
  const int64_t j1 = j0 + kBwdKeys < p.Lk ? j0 + kBwdKeys : p.Lk;

  unsigned char* smem = pyllm_dynamic_smem<unsigned char>();
  unsigned char* sk = smem;
  unsigned char* sv = smem + Bt::kOffV;
  unsigned char* sds = smem + Bt::kOffDS;

  load_tile<kD, kBwdKeys>(sk, static_cast<const T*>(p.k) + b * p.ks[0] + kvh * p.ks[1], p.ks[2], j0, p.Lk, p.d8);
  load_tile<kD, kBwdKeys>(sv, static_cast<const T*>(p.v) + b * p.vs[0] + kvh * p.vs[1], p.vs[2], j0, p.Lk, p.dv8);
  tc::cp_async_commit();

  // This lane's two keys (rows of S^T): lane/4 and lane/4 + 8 of the warp's 16.
  int kj[2];
  bool kvalid[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    kj[r] = (int)(j0 + warp * 16 + lane / 4 + 8 * r);
    kvalid[r] = kj[r] < p.Lk;
  }
  const bool elementwise = p.mask_kind != kMaskNone || p.alibi != nullptr || p.dropout;
  float* const dmask = part == 0 ? p.dmask : nullptr;  // every part computes the same dS: one writes it

  float dk[kOT][4], dv[kOT][4];
#pragma unroll
  for (int n = 0; n < kOT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  const int lm = lane / 8, lr = lane % 8;
  const TcLane<kD> alane(lr, lm / 2);  // A from K / V rows: matrices (rows +0/+8) x (chunk +0/+1)
  const TcLane<kD> blane(lr, lm % 2);  // B from Q / dO rows: (chunk +0/+1) x (rows +0/+8)
  const TcLane<kD> tlane(lr, lm / 2);  // B from Q / dO / K rows, .trans: (rows +0/+8) x (chunk +0/+1)
  const TcLaneOf<Ds> dlane(lr, lm % 2);  // A from dS^T, .trans: (keys +0/+8) x (queries +0/+8)
  const int arow = 2 * warp + lm % 2, brow = lm / 2, trow = lm % 2, drow = lm / 2;

  // The steps: every query tile that sees these keys (the same tiles for every head: the geometry
  // does not depend on it), of every query head of the kv group; step t is tile t % ntile of head
  // h0 + t / ntile. With two buffers the next step's Q and dO are in flight (cp.async) while this
  // step computes; its lse, delta and mask row offsets are stored beside them.
  const int64_t h0 = kvh * p.group, ntile = (p.Lq + kM - 1) / kM, total = p.group * ntile;
  auto next_step = [&](int64_t t) {  // the first step >= t whose tile some query of sees the keys
    for (; t < total; ++t) {
      const int64_t i0 = (t % ntile) * kM, i1 = i0 + kM < p.Lq ? i0 + kM : p.Lq;
      if (p.g.lo(i0) < j1 && p.g.hi(i1 - 1) > j0) break;
    }
    return t;
  };
  auto stage = [&](int64_t t, int buf) {  // issues step t's loads into buffer buf (no commit)
    const int64_t h = h0 + t / ntile, i0 = (t % ntile) * kM, rbase = (b * p.Hq + h) * p.Lq;
    load_tile<kD, kM>(smem + Bt::kOffQ + 2 * buf * Bt::kTileQ,
                      static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1], p.qs[2], i0, p.Lq, p.d8);
    load_tile<kD, kM>(smem + Bt::kOffQ + (2 * buf + 1) * Bt::kTileQ,
                      static_cast<const T*>(p.dout) + b * p.os[0] + h * p.os[1], p.os[2], i0, p.Lq, p.dv8);
    float* lse_b = reinterpret_cast<float*>(smem + Bt::kOffLse) + buf * kM;
    float* delta_b = reinterpret_cast<float*>(smem + Bt::kOffDelta) + buf * kM;
    int64_t* moff_b = reinterpret_cast<int64_t*>(smem + Bt::kOffMask) + buf * kM;
    for (int r = tid; r < kM; r += kTcThreads) {
      const bool ok = i0 + r < p.Lq;
      lse_b[r] = ok ? p.lse[rbase + i0 + r] * kLog2e : -INFINITY;
      delta_b[r] = ok ? p.delta[rbase + i0 + r] : 0.f;
      if (p.mask_kind != kMaskNone) moff_b[r] = p.mi.offset(rbase + (ok ? i0 + r : 0));  // once per query
    }
  };
  int64_t t = next_step(0), tn = 0;
  if constexpr (Bt::kBuf == 2) {
    if (t < total) stage(t, 0);
    tc::cp_async_commit();
  }
  for (int buf = 0; t < total; t = tn, buf = (buf + 1) % Bt::kBuf) {
    tn = next_step(t + 1);
    // The previous step's reads of the buffer filled next (and of sds) are done.
    __syncthreads();
    if constexpr (Bt::kBuf == 2) {
      if (tn < total) stage(tn, buf ^ 1);
      tc::cp_async_commit();  // (empty after the last step: the group count stays uniform)
      tc::cp_async_wait<1>();  // this step's copies have landed; the next step's may be in flight
    } else {
      stage(t, 0);
      tc::cp_async_commit();
      tc::cp_async_wait<0>();
    }
    __syncthreads();
    {
      const int64_t h = h0 + t / ntile, i0 = (t % ntile) * kM, i1 = i0 + kM < p.Lq ? i0 + kM : p.Lq;
      const int64_t rbase = (b * p.Hq + h) * p.Lq;
      const float slope = p.alibi ? p.alibi[b * p.alibi_bstride + h] * kLog2e : 0.f;
      unsigned char* const sq = smem + Bt::kOffQ + 2 * buf * Bt::kTileQ;
      unsigned char* const sdo = sq + Bt::kTileQ;
      const float* const slse = reinterpret_cast<const float*>(smem + Bt::kOffLse) + buf * kM;
      const float* const sdelta = reinterpret_cast<const float*>(smem + Bt::kOffDelta) + buf * kM;
      const int64_t* const smoff = reinterpret_cast<const int64_t*>(smem + Bt::kOffMask) + buf * kM;

      float s[kNT][4], dp[kNT][4];  // S^T = K_w Q^T, dP^T = V_w dO^T
      mma_pair<T, kD, kNT>(s, dp, sk, sv, sq, sdo, alane, arow, blane, brow);

      // P^T (dropped) into s, dS^T into dp. A tile every (query, key) pair sees in full, with
      // no mask, ALiBi or dropout, skips the per-element tests.
      const bool full = !elementwise && i1 - i0 == kM && j1 - j0 == kBwdKeys && p.g.lo(i1 - 1) <= j0 &&
                        p.g.hi(i0) >= j1;
      // The queries of this tile that see each of the lane's keys: columns [tlo, thi), 32-bit.
      int tlo[2], thi[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t a = kvalid[r] ? p.g.qlo(kj[r]) - i0 : kM, z = kvalid[r] ? p.g.qhi(kj[r]) - i0 : 0;
        tlo[r] = (int)(a < 0 ? 0 : (a > kM ? kM : a));
        thi[r] = (int)(z < 0 ? 0 : (z > i1 - i0 ? i1 - i0 : z));
      }
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2, col = n * 8 + 2 * (lane % 4) + (e % 2);
          const int64_t i = i0 + col, j = kj[r];
          const float L = slse[col];
          float pv = 0.f, ds = 0.f;
          const bool visible = full || (col >= tlo[r] && col < thi[r]);
          if (visible && L != -INFINITY) {
            float x = s[n][e] * p.scale_log2;
            const int64_t rid = rbase + i;
            if (!full) {
              if (p.alibi) {
                const int64_t pos = i + p.g.shift;
                x -= slope * (float)(pos > j ? pos - j : j - pos);
              }
              if (p.mask_kind == kMaskBool) {
                if (!static_cast<const bool*>(p.mask)[smoff[col] + j * p.mi.col_stride]) x = -INFINITY;
              } else if (p.mask_kind == kMaskFloat) {
                x += static_cast<const float*>(p.mask)[smoff[col] + j * p.mi.col_stride] * kLog2e;
              }
            }
            if (x != -INFINITY) {
              const float pr = exp2f(x - L);
              const float z = p.dropout ? (dropout_hash(p.seed, (uint64_t)rid * (uint64_t)p.Lk + (uint64_t)j) >=
                                                   p.drop_threshold
                                               ? p.drop_scale
                                               : 0.f)
                                        : 1.f;
              pv = pr * z;
              ds = pr * (dp[n][e] * z - sdelta[col]);
            }
            if (dmask != nullptr) dmask[rid * p.Lk + j] = ds;
          }
          s[n][e] = pv;
          dp[n][e] = ds;
        }
      }
      // The C fragments of n-tiles 2kk, 2kk+1 are the A fragment of k-step kk.
      uint32_t pa[kM / 16][4], da[kM / 16][4];
#pragma unroll
      for (int kk = 0; kk < kM / 16; ++kk) {
        pa[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
        pa[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
        pa[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        da[kk][0] = pack2<T>(dp[2 * kk][0], dp[2 * kk][1]);
        da[kk][1] = pack2<T>(dp[2 * kk][2], dp[2 * kk][3]);
        da[kk][2] = pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
        da[kk][3] = pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
      }
      auto store_ds = [&] {  // dS^T rows of this warp's keys, for the dQ phase
#pragma unroll
        for (int kk = 0; kk < kM / 16; ++kk)
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            const int n = 2 * kk + x / 2, r = x % 2;
            *reinterpret_cast<uint32_t*>(sds + Ds::off(warp * 16 + lane / 4 + 8 * r, n) + 4 * (lane % 4)) = da[kk][x];
          }
      };
      // dV_w += (P^T z) dO and dK_w += dS^T Q.
      auto dv_step = [&](int kk, int np) {
        uint32_t bf[4];
        tc::ldmatrix_x4_trans(bf, sdo + tlane.at(2 * kk + trow, np) + coff);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        tc::mma_m16n8k16<T>(dv[2 * np], pa[kk], b0, dv[2 * np]);
        tc::mma_m16n8k16<T>(dv[2 * np + 1], pa[kk], b1, dv[2 * np + 1]);
      };
      auto dk_step = [&](int kk, int np) {
        uint32_t bf[4];
        tc::ldmatrix_x4_trans(bf, sq + tlane.at(2 * kk + trow, np) + coff);
        const uint32_t q0[2] = {bf[0], bf[1]}, q1[2] = {bf[2], bf[3]};
        tc::mma_m16n8k16<T>(dk[2 * np], da[kk], q0, dk[2 * np]);
        tc::mma_m16n8k16<T>(dk[2 * np + 1], da[kk], q1, dk[2 * np + 1]);
      };
      if constexpr (!Bt::kDsOverDO) {
        if (p.dq != nullptr) store_ds();
#pragma unroll
        for (int kk = 0; kk < kM / 16; ++kk)
#pragma unroll
          for (int np = 0; np < kOT / 2; ++np) {
            dv_step(kk, np);
            dk_step(kk, np);
          }
      } else {  // dV first; dS^T then overwrites dO while dK runs
#pragma unroll
        for (int kk = 0; kk < kM / 16; ++kk)
#pragma unroll
          for (int np = 0; np < kOT / 2; ++np) dv_step(kk, np);
        if (p.dq != nullptr) {
          __syncthreads();  // every warp's reads of sdo are done
          store_ds();
        }
#pragma unroll
        for (int kk = 0; kk < kM / 16; ++kk)
#pragma unroll
          for (int np = 0; np < kOT / 2; ++np) dk_step(kk, np);
      }
      if (p.dq == nullptr) continue;  // uniform: deterministic mode computes dQ separately

      // dQ (kM x D) += dS K for this tile: warp -> query row block rb, column part cs.
      __syncthreads();  // every warp's dS^T rows are in sds
      const int rb = warp % Bt::kRowBlocks, cs = warp / Bt::kRowBlocks;
      float acc[kOTq][4];
#pragma unroll
      for (int n = 0; n < kOTq; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kBwdKeys / 16; ++kk) {
        uint32_t a[4];
        tc::ldmatrix_x4_trans(a, sds + dlane.at(2 * kk + drow, rb));
#pragma unroll
        for (int np = 0; np < kOTq / 2; ++np) {
          uint32_t bf[4];
          tc::ldmatrix_x4_trans(bf, sk + tlane.at(2 * kk + trow, cs * (kOTq / 2) + np) + coff);
          const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
          tc::mma_m16n8k16<T>(acc[2 * np], a, b0, acc[2 * np]);
          tc::mma_m16n8k16<T>(acc[2 * np + 1], a, b1, acc[2 * np + 1]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t i = i0 + rb * 16 + lane / 4 + 8 * r;
        if (i >= p.Lq) continue;
        float* row = p.dq + (rbase + i) * p.D;
#pragma unroll
        for (int n = 0; n < kOTq; ++n) {
          const int col = (part * kOT + cs * kOTq + n) * 8 + 2 * (lane % 4);
          if (col < p.D) atomicAdd(row + col, acc[n][2 * r]);
          if (col + 1 < p.D) atomicAdd(row + col + 1, acc[n][2 * r + 1]);
        }
      }
    }
  }
  tc::cp_async_wait<0>();  // a CTA no query tile reaches still waits for its K / V copies

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!kvalid[r]) continue;
    float* dkr = p.dk + (bkv * p.Lk + kj[r]) * p.D;
    float* dvr = p.dv + (bkv * p.Lk + kj[r]) * p.Dv;
#pragma unroll
    for (int n = 0; n < kOT; ++n) {
      const int col = (part * kOT + n) * 8 + 2 * (lane % 4);
      if (col < p.D) dkr[col] = dk[n][2 * r] * p.scale;
      if (col + 1 < p.D) dkr[col + 1] = dk[n][2 * r + 1] * p.scale;
      if (col < p.Dv) dvr[col] = dv[n][2 * r];
      if (col + 1 < p.Dv) dvr[col + 1] = dv[n][2 * r + 1];
    }
  }
}

template <typename T, int kD>
void launch_bwd(const TcBwdParams& p, int64_t B) {
  using Bt = BwdTile<kD>;
  auto kern = attn_tc_bwd_kernel<T, kD>;
  const int64_t blocks = B * p.Hkv * ((p.Lk + kBwdKeys - 1) / kBwdKeys) * Bt::kSplit;
  TORCH_CHECK(blocks <= 0x7fffffff, "pyllm: attention backward grid too large (", blocks, " CTAs)");
  if (Bt::kSmemBytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Bt::kSmemBytes);
    TORCH_CHECK(err == cudaSuccess, "pyllm: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, ", Bt::kSmemBytes,
                ") failed: ", cudaGetErrorString(err));
  }
  PYLLM_LAUNCH(kern, (unsigned)blocks, kTcThreads, Bt::kSmemBytes, PYLLM_STREAM(), p);
}


// ---- deterministic mode: dQ in its own pass (no atomics) ----
// CTA = 4 warps = 64 query rows of one (batch, query head), warp w rows 16w..16w+15 (the
// forward's layout); it walks the key tiles its rows see, kN keys at a time, and for each:
//   S = Q K^T, dP = dO V^T      (A: Q / dO rows by ldmatrix, B: K / V rows)
//   P = exp(S * scale + masks - lse), dS = P (dP z - delta)   (z: the forward's dropout, replayed)
//   dQ += dS K                  (A: dS repacked from the C fragments, B: K by ldmatrix.trans)
// then writes its rows of dQ (scaled) once. Every (query, key) pair's dS is formed by one thread
// in one fixed order: bit-identical across runs and block orders. It also writes the additive
// mask's gradient (dS, once per pair). K and V are single-buffered: this pass is the
// deterministic alternative to the atomics, not the default.
template <int kD>
struct DqTile {
  using Row = TcTile<kD>;
  static constexpr int kN = kD <= 64 ? 64 : (kD <= 128 ? 32 : 16);  // keys per step (registers)
  static constexpr int kOffDO = 16 * kBlockM * Row::kPitch;
  static constexpr int kOffK = 2 * kOffDO;
  static constexpr int kOffV = kOffK + 16 * kN * Row::kPitch;
  static constexpr size_t kSmemBytes = kOffV + 16 * kN * Row::kPitch;
  static_assert((kN * (kD / 8)) % kTcThreads == 0, "loader split");
};

template <typename T, int kD>
__global__ void __launch_bounds__(kTcThreads) attn_tc_dq_kernel(TcBwdParams p) {
  using Dt = DqTile<kD>;
  constexpr int kN = Dt::kN;
  constexpr int kNT = kN / 8;   // S / dP n-tiles (keys)
  constexpr int kOT = kD / 8;   // dQ n-tiles (head dim)
  if (p.skip_if != nullptr && *p.skip_if) return;  // uniform: the SIMT dq kernel serves this call
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int64_t nmt = (p.Lq + kBlockM - 1) / kBlockM;
  const int64_t bh = (int64_t)blockIdx.x / nmt, b = bh / p.Hq, h = bh % p.Hq, kvh = h / p.group;
  const int64_t i0 = ((int64_t)blockIdx.x % nmt) * kBlockM;
  const int64_t ilast = (i0 + kBlockM < p.Lq ? i0 + kBlockM : p.Lq) - 1;
  const int64_t rbase = (b * p.Hq + h) * p.Lq;

  unsigned char* smem = pyllm_dynamic_smem<unsigned char>();
  unsigned char* sq = smem;
  unsigned char* sdo = smem + Dt::kOffDO;
  unsigned char* sk = smem + Dt::kOffK;
  unsigned char* sv = smem + Dt::kOffV;
  load_tile<kD, kBlockM>(sq, static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1], p.qs[2], i0, p.Lq, p.d8);
  load_tile<kD, kBlockM>(sdo, static_cast<const T*>(p.dout) + b * p.os[0] + h * p.os[1], p.os[2], i0, p.Lq, p.dv8);
  tc::cp_async_commit();
  const T* kb = static_cast<const T*>(p.k) + b * p.ks[0] + kvh * p.ks[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.vs[0] + kvh * p.vs[1];

  // This lane's two rows: lane/4 and lane/4 + 8 of the warp's 16.
  int ri[2], rlo[2], rhi[2];
  int64_t moff[2];
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = i0 + warp * 16 + lane / 4 + 8 * r;
    const bool valid = i < p.Lq;
    ri[r] = (int)(valid ? i : i0);
    rlo[r] = valid ? (int)p.g.lo(i) : 0;
    rhi[r] = valid ? (int)p.g.hi(i) : 0;  // invalid rows see nothing
    moff[r] = p.mask_kind != kMaskNone ? p.mi.offset(rbase + ri[r]) : 0;
    lse2[r] = valid ? p.lse[rbase + i] * kLog2e : -INFINITY;
    delta[r] = valid ? p.delta[rbase + i] : 0.f;
  }
  const float slope = p.alibi ? p.alibi[b * p.alibi_bstride + h] * kLog2e : 0.f;
  const bool elementwise = p.mask_kind != kMaskNone || p.alibi != nullptr;
  const int64_t klo = p.g.lo(i0);
  int64_t khi = p.g.hi(ilast);
  if (khi < klo) khi = klo;

  float dq[kOT][4];
#pragma unroll
  for (int n = 0; n < kOT; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

  const int lm = lane / 8, lr = lane % 8;
  const TcLane<kD> alane(lr, lm / 2);  // A from Q / dO rows: (rows +0/+8) x (chunk +0/+1)
  const TcLane<kD> blane(lr, lm % 2);  // B from K / V rows: (chunk +0/+1) x (keys +0/+8)
  const TcLane<kD> tlane(lr, lm / 2);  // B from K rows, .trans: (keys +0/+8) x (chunk +0/+1)
  const int arow = 2 * warp + lm % 2, brow = lm / 2, trow = lm % 2;

  for (int64_t k0 = klo; k0 < khi; k0 += kN) {
    __syncthreads();  // the previous tile's reads of sk, sv are done
    load_tile<kD, kN>(sk, kb, p.ks[2], k0, khi, p.d8);
    load_tile<kD, kN>(sv, vb, p.vs[2], k0, khi, p.dv8);
    tc::cp_async_commit();
    tc::cp_async_wait<0>();
    __syncthreads();

    float s[kNT][4], dp[kNT][4];  // S = Q K^T, dP = dO V^T
    mma_pair<T, kD, kNT>(s, dp, sq, sdo, sk, sv, alane, arow, blane, brow);

    const bool full = !elementwise && k0 >= p.g.lo(ilast) && k0 + kN <= p.g.hi(i0);
    int tlo[2], thi[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) tile_bounds<kN>(rlo[r], rhi[r], k0, tlo[r], thi[r]);
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, jt = n * 8 + 2 * (lane % 4) + (e % 2);
        const int64_t j = k0 + jt, rid = rbase + ri[r];
        float ds = 0.f;
        if ((full || (jt >= tlo[r] && jt < thi[r])) && lse2[r] != -INFINITY) {
          float x = s[n][e] * p.scale_log2;
          if (!full) {
            if (p.alibi) {
              const int64_t pos = (int64_t)ri[r] + p.g.shift;
              x -= slope * (float)(pos > j ? pos - j : j - pos);
            }
            if (p.mask_kind == kMaskBool) {
              if (!static_cast<const bool*>(p.mask)[moff[r] + j * p.mi.col_stride]) x = -INFINITY;
            } else if (p.mask_kind == kMaskFloat) {
              x += static_cast<const float*>(p.mask)[moff[r] + j * p.mi.col_stride] * kLog2e;
            }
          }
          if (x != -INFINITY) {
            const float pr = exp2f(x - lse2[r]);
            const float z = p.dropout ? (dropout_hash(p.seed, (uint64_t)rid * (uint64_t)p.Lk + (uint64_t)j) >=
                                                 p.drop_threshold
                                             ? p.drop_scale
                                             : 0.f)
                                      : 1.f;
            ds = pr * (dp[n][e] * z - delta[r]);
          }
          if (p.dmask != nullptr) p.dmask[rid * p.Lk + j] = ds;
        }
        s[n][e] = ds;
      }
    }
    // dQ += dS K: the C fragments of n-tiles 2kk, 2kk+1 are the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int np = 0; np < kOT / 2; ++np) {
        uint32_t bf[4];
        tc::ldmatrix_x4_trans(bf, sk + tlane.at(2 * kk + trow, np));
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        tc::mma_m16n8k16<T>(dq[2 * np], a, b0, dq[2 * np]);
        tc::mma_m16n8k16<T>(dq[2 * np + 1], a, b1, dq[2 * np + 1]);
      }
    }
  }
  tc::cp_async_wait<0>();  // a CTA whose rows see no key still waits for its Q / dO copies

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = i0 + warp * 16 + lane / 4 + 8 * r;
    if (i >= p.Lq) continue;
    float* row = p.dq + (rbase + i) * p.D;
#pragma unroll
    for (int n = 0; n < kOT; ++n) {
      const int col = n * 8 + 2 * (lane % 4);
      if (col < p.D) row[col] = dq[n][2 * r] * p.scale;
      if (col + 1 < p.D) row[col + 1] = dq[n][2 * r + 1] * p.scale;
    }
  }
}

template <typename T, int kD>
void launch_dq(const TcBwdParams& p, int64_t B) {
  using Dt = DqTile<kD>;
  auto kern = attn_tc_dq_kernel<T, kD>;
  const int64_t blocks = B * p.Hq * ((p.Lq + kBlockM - 1) / kBlockM);
  TORCH_CHECK(blocks <= 0x7fffffff, "pyllm: attention dQ grid too large (", blocks, " CTAs)");
  if (Dt::kSmemBytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Dt::kSmemBytes);
    TORCH_CHECK(err == cudaSuccess, "pyllm: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, ", Dt::kSmemBytes,
                ") failed: ", cudaGetErrorString(err));
  }
  PYLLM_LAUNCH(kern, (unsigned)blocks, kTcThreads, Dt::kSmemBytes, PYLLM_STREAM(), p);
}

template <int kD>
void add_bwd_config(std::vector<std::vector<int64_t>>& out) {
  using Bt = BwdTile<kD>;
  out.push_back({kD, kBwdKeys, Bt::kM, kTcThreads, (int64_t)Bt::kSmemBytes, Bt::kSplit, DqTile<kD>::kN,
                 (int64_t)DqTile<kD>::kSmemBytes});
}

}  // namespace

int attention_tc_bwd_head_dim(int64_t d, int64_t dv) {
  const int64_t m = d > dv ? d : dv;
  return m <= 64 ? 64 : (m <= 128 ? 128 : (m <= kTcBwdMaxHeadDim ? 256 : 0));
}

bool attention_tc_bwd_eligible(const at::Tensor& q, const at::Tensor& v) {
  return attention_tc_eligible(q, v) && attention_tc_bwd_head_dim(q.size(3), v.size(3)) != 0;
}

std::vector<std::vector<int64_t>> attention_tc_bwd_configs() {
  std::vector<std::vector<int64_t>> out;
  add_bwd_config<64>(out);
  add_bwd_config<128>(out);
  add_bwd_config<256>(out);
  return out;
}

namespace {
// The parameters both backward kernels take; q, k, v, o are the tc_operand views (kept alive by the
// caller).
TcBwdParams bwd_params(const at::Tensor& query, const at::Tensor& value, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, const at::Tensor& delta,
                       const TcAttnArgs& a, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dmask,
                       const bool* skip_if) {
  TcBwdParams p{};
  static_cast<AttnFeatures&>(p) = a.f;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.defined() ? dq.data_ptr<float>() : nullptr;
  p.dk = dk.defined() ? dk.data_ptr<float>() : nullptr;
  p.dv = dv.defined() ? dv.data_ptr<float>() : nullptr;
  p.dmask = dmask.defined() && dmask.numel() > 0 ? dmask.data_ptr<float>() : nullptr;
  for (int d = 0; d < 3; ++d) {
    p.qs[d] = q.stride(d);
    p.ks[d] = k.stride(d);
    p.vs[d] = v.stride(d);
    p.os[d] = o.stride(d);
  }
  p.Hq = q.size(1);
  p.Hkv = k.size(1);
  p.Lq = q.size(2);
  p.Lk = k.size(2);
  p.group = p.Hq / p.Hkv;
  p.d8 = q.size(3);
  p.dv8 = v.size(3);
  p.D = query.size(3);
  p.Dv = value.size(3);
  p.scale = a.scale;
  p.scale_log2 = a.scale * kLog2e;
  p.mask = a.mask.defined() ? a.mask.data_ptr() : nullptr;
  p.mask_kind = !a.mask.defined() ? kMaskNone : (a.mask.scalar_type() == at::kBool ? kMaskBool : kMaskFloat);
  p.skip_if = skip_if;
  return p;
}
}  // namespace

void attention_tc_backward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           const at::Tensor& grad_out, const at::Tensor& lse, const at::Tensor& delta,
                           const TcAttnArgs& a, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dmask,
                           const bool* skip_if) {
  const at::Tensor q = tc_operand(query), k = tc_operand(key), v = tc_operand(value), o = tc_operand(grad_out);
  const TcBwdParams p = bwd_params(query, value, q, k, v, o, lse, delta, a, dq, dk, dv, dmask, skip_if);
  const int64_t B = q.size(0);
  const int kd = attention_tc_bwd_head_dim(query.size(3), value.size(3));
  const bool half = q.scalar_type() == at::kHalf;
  switch (kd) {
    case 64: return half ? launch_bwd<__half, 64>(p, B) : launch_bwd<__nv_bfloat16, 64>(p, B);
    case 128: return half ? launch_bwd<__half, 128>(p, B) : launch_bwd<__nv_bfloat16, 128>(p, B);
    case 256: return half ? launch_bwd<__half, 256>(p, B) : launch_bwd<__nv_bfloat16, 256>(p, B);
    default: TORCH_CHECK(false, "pyllm: no tensor-core attention backward for head dims ", query.size(3), ", ",
                         value.size(3));
  }
}

void attention_tc_dq(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const at::Tensor& grad_out, const at::Tensor& lse, const at::Tensor& delta, const TcAttnArgs& a,
                     at::Tensor& dq, at::Tensor& dmask, const bool* skip_if) {
  const at::Tensor q = tc_operand(query), k = tc_operand(key), v = tc_operand(value), o = tc_operand(grad_out);
  at::Tensor none;
  const TcBwdParams p = bwd_params(query, value, q, k, v, o, lse, delta, a, dq, none, none, dmask, skip_if);
  const int64_t B = q.size(0);
  const int kd = attention_tc_bwd_head_dim(query.size(3), value.size(3));
  const bool half = q.scalar_type() == at::kHalf;
  switch (kd) {
    case 64: return half ? launch_dq<__half, 64>(p, B) : launch_dq<__nv_bfloat16, 64>(p, B);
    case 128: return half ? launch_dq<__half, 128>(p, B) : launch_dq<__nv_bfloat16, 128>(p, B);
    case 256: return half ? launch_dq<__half, 256>(p, B) : launch_dq<__nv_bfloat16, 256>(p, B);
    default: TORCH_CHECK(false, "pyllm: no tensor-core attention dQ pass for head dims ", query.size(3), ", ",
                         value.size(3));
  }
}

}  // namespace PYLLM_CUDA_NS
}  // namespace pyllm

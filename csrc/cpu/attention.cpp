// CPU kernels: fused scaled-dot-product attention, forward and backward.
//
// Forward (flash style, O(L) extra memory): for each (batch, head, block of query rows)
// loop over blocks of keys: S = (scale*Q) K^T (BLAS), add the mask (bool or additive,
// any broadcast shape/strides, read in place through a RowIndexer), hide keys outside the
// causal/sliding window, and fold S into a running max / sum / fp32 output accumulator
// (online softmax). Key blocks that causality or the window hide entirely are never
// touched. Rows with every key hidden give zeros and lse = -inf.
// Decode (Lq <= 16): the query rows of all heads of a GQA group are stacked into one block
// (K/V read once per group) and the keys are split across threads; partial results are
// merged by log-sum-exp.
// Backward (FlashAttention-2 recomputation from q, k, v, out, lse): one parallel pass over
// query blocks computes dQ (and the additive mask's gradient when asked), a second over key
// blocks computes dK and dV, summing over the query heads of a GQA group. No races.
// Dropout: a counter-based hash of (seed, b, h, i, j) decides each kept element, so forward
// and backward regenerate the same mask without storing it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <limits>

#include "../include/pyllm/attention.h"
#include "../include/pyllm/broadcast.h"
#include "../include/pyllm/checks.h"
#include "../include/pyllm/ops/attention.h"
#include "../include/pyllm/varlen.h"
#include "common.h"

// BLAS sgemm as exported by libtorch's MKL/OpenBLAS (weak: absent -> at::addmm_out).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

namespace pyllm::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Block sizes (measured on AVX-512, 2 MiB L2: a 128 x 512 fp32 score block stays in L2).
// Causal masks use shorter query blocks so less of the diagonal block is wasted.
constexpr int64_t kBlockQ = 128, kBlockQCausal = 64, kBlockK = 512;
constexpr int64_t kDecodeMaxLq = 16;
constexpr int64_t kDecodeTasks = 32;  // decode: key splits x head groups to aim for

// Row-major C[m,n] = op(A)[m,k] * op(B)[k,n] + beta * C. No alpha: MKL's sgemm (2024.2, measured on
// an AMD EPYC) rounds alpha * AB differently with its thread count (torch.set_num_threads), which made
// dQ differ in the last bit between thread counts; callers scale afterwards (zgemm).
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const float alpha = 1.f;
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  // A row-major is [ta ? k : m] x [ta ? m : k]; its leading dim must cover its columns.
  const int64_t acols = ta ? m : k, bcols = tb ? k : n;
  lda = std::max(lda, acols);  // only differs when A has one row (stride then irrelevant)
  ldb = std::max(ldb, bcols);
  const bool fits = std::max({m, n, k, lda, ldb, ldc}) < (int64_t)INT_MAX;
  if (sgemm_ != nullptr && fits) {
    const int M = (int)m, N = (int)n, K = (int)k, LDA = (int)lda, LDB = (int)ldb, LDC = (int)ldc;
    const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
    // Column-major view: C^T = op(B)^T op(A)^T.
    sgemm_(&tB, &tA, &N, &M, &K, &alpha, B, &LDB, A, &LDA, &beta, C, &LDC);
    return;
  }
  const auto opt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = at::from_blob(const_cast<float*>(A), {ta ? k : m, ta ? m : k}, {lda, 1}, opt);
  at::Tensor b = at::from_blob(const_cast<float*>(B), {tb ? n : k, tb ? k : n}, {ldb, 1}, opt);
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opt);
  at::addmm_out(c, c, ta ? a.t() : a, tb ? b.t() : b, beta, alpha);
}

// C = beta * C + alpha * op(A) op(B) where the terms with op(A)[i][k] == 0 are skipped: a zero
// probability (a hidden key, a dropped or fully masked entry) or a zero score gradient contributes
// nothing, even against a NaN or Inf in B, where IEEE 0 * NaN would make the output NaN (pyllm's
// non-finite rule, FlashAttention's too: hidden keys are never read). One dense GEMM into a scratch
// block; a non-finite value in B always leaves a non-finite value in its product rows, so only the
// rows that come out non-finite (NaN inputs: rare) are redone term by term.
void zgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda,
           const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  thread_local std::vector<float> tmp;
  if ((int64_t)tmp.size() < m * n) tmp.resize(m * n);
  float* t = tmp.data();
  gemm(ta, tb, m, n, k, A, lda, B, ldb, 0.f, t, n);
  for (int64_t i = 0; i < m; ++i) {
    float* tr = t + i * n;
    float z = 0.f;
#pragma omp simd reduction(+ : z)
    for (int64_t j = 0; j < n; ++j) z += tr[j] * 0.f;  // NaN iff the row holds a NaN or an Inf
    if (z == 0.f) continue;
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (int64_t kk = 0; kk < k; ++kk) {
        const float av = ta ? A[kk * lda + i] : A[i * lda + kk];
        if (av != 0.f) acc += (double)av * (tb ? B[j * ldb + kk] : B[kk * ldb + j]);
      }
      tr[j] = (float)acc;
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    float* cr = C + i * ldc;
    const float* tr = t + i * n;
    if (beta == 0.f && alpha == 1.f) std::copy(tr, tr + n, cr);
    else for (int64_t j = 0; j < n; ++j) cr[j] = beta * cr[j] + alpha * tr[j];
  }
}

// Runs fn(task) for task in [0, n) on all threads, handing out tasks dynamically
// (causal blocks have very different costs).
template <typename F>
void dynamic_for(int64_t n, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(t);
  });
}

enum class MaskKind { kNone, kBool, kFloat };

// Everything a block needs, with q/k/v as fp32 and last dim contiguous.
struct Args {
  const float* q;            // fp32 (converted once: O(Lq * D))
  const void *k, *v;         // storage dtype, converted per block
  int kv_type = 0;           // 0 fp32, 1 fp16, 2 bf16
  int64_t qs[3], ks[3], vs[3];  // strides of dims B, H, L
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv, group;
  float scale;
  AttnGeom g;
  MaskKind mk = MaskKind::kNone;
  const void* mask = nullptr;
  RowIndexer mi;
  float dropout_p = 0.f;
  uint32_t drop_threshold = 0;
  float drop_scale = 1.f;
  uint64_t seed = 0;
  int64_t bq = kBlockQ, bk = kBlockK;
  const float* alibi = nullptr;  // ALiBi slopes (fp32): [Hq] (alibi_bstride 0) or [B, Hq] (alibi_bstride Hq)
  int64_t alibi_bstride = 0;

  const float* qrow(int64_t b, int64_t h, int64_t i) const { return q + b * qs[0] + h * qs[1] + i * qs[2]; }
  int64_t koff(int64_t b, int64_t h, int64_t j) const { return b * ks[0] + h * ks[1] + j * ks[2]; }
  int64_t voff(int64_t b, int64_t h, int64_t j) const { return b * vs[0] + h * vs[1] + j * vs[2]; }
  int64_t row_id(int64_t b, int64_t h, int64_t i) const { return (b * Hq + h) * Lq + i; }
};

// A block of K or V rows as fp32: the tensor itself (fp32) or a converted copy in `buf`.
struct Blk {
  const float* p;
  int64_t ld;
};
Blk rows_f32(const void* base, int type, int64_t off, int64_t ld, int64_t n, int64_t dim,
             std::vector<float>& buf) {
  if (type == 0) return {static_cast<const float*>(base) + off, ld};
  if ((int64_t)buf.size() < n * dim) buf.resize(n * dim);
  const uint16_t* src = static_cast<const uint16_t*>(base) + off;
  if (ld == dim) {  // contiguous rows: one call for the whole block
    if (type == 1) row::half_to_float(src, buf.data(), n * dim);
    else row::bf16_to_float(src, buf.data(), n * dim);
    return {buf.data(), dim};
  }
  for (int64_t r = 0; r < n; ++r) {
    if (type == 1) row::half_to_float(src + r * ld, buf.data() + r * dim, dim);
    else row::bf16_to_float(src + r * ld, buf.data() + r * dim, dim);
  }
  return {buf.data(), dim};
}
Blk k_block(const Args& a, int64_t b, int64_t h, int64_t k0, int64_t n, std::vector<float>& buf) {
  return rows_f32(a.k, a.kv_type, a.koff(b, h, k0), a.ks[2], n, a.D, buf);
}
Blk v_block(const Args& a, int64_t b, int64_t h, int64_t k0, int64_t n, std::vector<float>& buf) {
  return rows_f32(a.v, a.kv_type, a.voff(b, h, k0), a.vs[2], n, a.Dv, buf);
}

// Hides the keys [k0, k0+n) of score row `s` (query i of row `rid`) that the geometry or
// the mask hide (-inf) and adds an additive mask. Returns false if every key is hidden.
bool mask_row(const Args& a, float* s, int64_t rid, int64_t i, int64_t k0, int64_t n) {
  int64_t lo = 0, hi = n;
  if (a.g.bounded()) {
    lo = std::max<int64_t>(0, a.g.lo(i) - k0);
    hi = std::min<int64_t>(n, a.g.hi(i) - k0);
    if (lo >= hi) return false;
    for (int64_t j = 0; j < lo; ++j) s[j] = kNegInf;
    for (int64_t j = hi; j < n; ++j) s[j] = kNegInf;
  }
  if (a.alibi) {  // -slope * |p - j| on the visible keys, p = i + shift (the query's key position)
    const int64_t bh = rid / a.Lq;
    const float slope = a.alibi[(bh / a.Hq) * a.alibi_bstride + bh % a.Hq];
    const int64_t p = i + a.g.shift;
    for (int64_t j = lo; j < hi; ++j) s[j] -= slope * (float)std::abs(p - (k0 + j));
  }
  if (a.mk == MaskKind::kNone) return true;
  const int64_t cs = a.mi.col_stride, len = hi - lo;
  const int64_t off = a.mi.offset(rid) + (k0 + lo) * cs;
  float* sr = s + lo;
  if (a.mk == MaskKind::kBool) {
    const uint8_t* m = static_cast<const uint8_t*>(a.mask) + off;
    if (cs == 1) {
      row::mask_fill_bool(sr, m, len);
    } else if (cs == 0) {
      if (!m[0]) return false;
    } else {
      for (int64_t j = 0; j < len; ++j)
        if (!m[j * cs]) sr[j] = kNegInf;
    }
  } else {
    const float* m = static_cast<const float*>(a.mask) + off;
    if (cs == 1) {
      row::add(sr, m, sr, len);
    } else {
      for (int64_t j = 0; j < len; ++j) sr[j] += m[j * cs];
    }
  }
  return true;
}

// p[j] *= keep(j) / (1 - dropout_p) for the keys k0.. of row `rid`.
void dropout_row(const Args& a, float* p, int64_t rid, int64_t k0, int64_t n) {
  const uint64_t base = (uint64_t)rid * (uint64_t)a.Lk + (uint64_t)k0;
  for (int64_t j = 0; j < n; ++j)
    p[j] = dropout_hash(a.seed, base + j) >= a.drop_threshold ? p[j] * a.drop_scale : 0.f;
}

struct Work {
  std::vector<float> qs, s, s2, o, m, l, dq, dk, dv, dout, lse, dd, kb, vb;
  void need(std::vector<float>& v, int64_t n) {
    if ((int64_t)v.size() < n) v.resize(n);
  }
};

// A block of query rows sharing one KV head: head h0 + r / nq, query i0 + r % nq.
struct RowBlock {
  int64_t b, kvh, h0, nh, i0, nq;
  int64_t rows() const { return nh * nq; }
  int64_t head(int64_t r) const { return h0 + r / nq; }
  int64_t query(int64_t r) const { return i0 + r % nq; }
};

// Loads scale * Q rows of the block into w.qs [R, D].
void load_q(const Args& a, const RowBlock& rb, Work& w) {
  const int64_t R = rb.rows();
  w.need(w.qs, R * a.D);
  for (int64_t r = 0; r < R; ++r) row::scale(a.qrow(rb.b, rb.head(r), rb.query(r)), w.qs.data() + r * a.D, a.D, a.scale);
}

// Key range [klo, khi) that any row of the block can see, within [kbeg, kend).
std::pair<int64_t, int64_t> key_range(const Args& a, const RowBlock& rb, int64_t kbeg, int64_t kend) {
  int64_t lo = kbeg, hi = kend;
  if (a.g.bounded()) {
    lo = std::max(lo, a.g.lo(rb.i0));
    hi = std::min(hi, a.g.hi(rb.i0 + rb.nq - 1));
  }
  if (a.mk == MaskKind::kBool && lo < hi && a.mi.col_stride != 0) {
    // A bool mask row shared by every row of the block (padding masks): drop the hidden
    // keys at both ends of the range.
    const int64_t off = a.mi.offset(a.row_id(rb.b, rb.h0, rb.i0));
    bool shared = true;
    for (int64_t r = 1; r < rb.rows() && shared; ++r)
      shared = a.mi.offset(a.row_id(rb.b, rb.head(r), rb.query(r))) == off;
    if (shared) {
      const uint8_t* m = static_cast<const uint8_t*>(a.mask) + off;
      const int64_t cs = a.mi.col_stride;
      while (lo < hi && !m[lo * cs]) ++lo;
      while (hi > lo && !m[(hi - 1) * cs]) --hi;
    }
  }
  return {lo, std::max(lo, hi)};
}

// Online-softmax forward of one block over keys [kbeg, kend): leaves the unnormalized
// output in w.o [R, Dv], the running max in w.m and the sum in w.l.
void forward_block(const Args& a, const RowBlock& rb, int64_t kbeg, int64_t kend, Work& w) {
  const int64_t R = rb.rows(), D = a.D, Dv = a.Dv;
  load_q(a, rb, w);
  w.need(w.o, R * Dv);
  w.need(w.m, R);
  w.need(w.l, R);
  w.need(w.s, R * a.bk);
  float *o = w.o.data(), *m = w.m.data(), *l = w.l.data(), *s = w.s.data();
  std::fill(o, o + R * Dv, 0.f);
  std::fill(m, m + R, kNegInf);
  std::fill(l, l + R, 0.f);
  const auto [klo, khi] = key_range(a, rb, kbeg, kend);
  // Equal chunks of at most bk keys (no small trailing chunk), multiples of 16.
  const int64_t nchunks = (khi - klo + a.bk - 1) / a.bk;
  const int64_t chunk = nchunks > 0 ? std::min(a.bk, ((khi - klo + nchunks - 1) / nchunks + 15) / 16 * 16) : a.bk;
  for (int64_t k0 = klo; k0 < khi; k0 += chunk) {
    const int64_t n = std::min(chunk, khi - k0);
    const Blk kb = k_block(a, rb.b, rb.kvh, k0, n, w.kb);
    gemm(false, true, R, n, D, w.qs.data(), D, kb.p, kb.ld, 0.f, s, n);
    bool any = false;
    for (int64_t r = 0; r < R; ++r) {
      float* sr = s + r * n;
      const int64_t h = rb.head(r), i = rb.query(r), rid = a.row_id(rb.b, h, i);
      float mnew = kNegInf;
      const bool visible = mask_row(a, sr, rid, i, k0, n);
      if (visible) mnew = std::max(m[r], row::max(sr, n));
      if (mnew == kNegInf) {
        // Nothing visible so far, or only NaN scores (row::max skips NaN): a NaN makes l NaN, so
        // the row comes out NaN as torch's softmax gives it; otherwise it stays a masked row.
        if (visible && std::any_of(sr, sr + n, [](float v) { return v != v; }))
          l[r] = std::numeric_limits<float>::quiet_NaN();
        std::fill(sr, sr + n, 0.f);
        continue;
      }
      any = true;
      const float sum = row::exp_sub_sum(sr, sr, n, mnew);
      if (m[r] != mnew) {
        const float alpha = m[r] == kNegInf ? 0.f : std::exp(m[r] - mnew);
        row::scale(o + r * Dv, o + r * Dv, Dv, alpha);
        l[r] *= alpha;
      }
      l[r] += sum;
      m[r] = mnew;
      if (a.dropout_p > 0.f) dropout_row(a, sr, rid, k0, n);
    }
    if (any) {
      const Blk vb = v_block(a, rb.b, rb.kvh, k0, n, w.vb);
      zgemm(false, false, R, Dv, n, 1.f, s, n, vb.p, vb.ld, 1.f, o, Dv);
    }
  }
}

// out[row] = o / l, lse = m + log(l) (zeros / -inf when nothing was visible). A NaN score (a NaN
// in q or k) makes l NaN: the row comes out NaN, as torch's softmax gives it, never zeros.
void finish_row(const float* o, float m, float l, float* out, float* lse, int64_t Dv) {
  if (l > 0.f || l != l) {
    row::scale(o, out, Dv, 1.f / l);
    *lse = m + std::log(l);
  } else {
    std::fill(out, out + Dv, 0.f);
    *lse = kNegInf;
  }
}

void attention_forward(const Args& a, float* out, float* lse) {
  const int64_t Dv = a.Dv;
  if (a.Lq <= kDecodeMaxLq) {
    // Decode: stack the group's heads, split the keys across threads.
    const int64_t hchunk = std::max<int64_t>(1, std::min<int64_t>(a.group, 256 / a.Lq));
    const int64_t nhc = (a.group + hchunk - 1) / hchunk;
    const int64_t groups = a.B * a.Hkv * nhc;
    // The split depends on the shape only (about kDecodeTasks tasks), never on the thread count:
    // the combined result is bit-identical for any torch.set_num_threads (issue 12).
    int64_t nsplit = std::min<int64_t>((a.Lk + a.bk - 1) / a.bk, (kDecodeTasks + groups - 1) / groups);
    nsplit = std::max<int64_t>(1, nsplit);
    const int64_t per = ((a.Lk + nsplit - 1) / nsplit + 15) / 16 * 16;
    nsplit = std::max<int64_t>(1, (a.Lk + per - 1) / per);
    const int64_t R = hchunk * a.Lq;
    std::vector<float> po, pm, pl;
    if (nsplit > 1) {
      po.resize(groups * nsplit * R * Dv);
      pm.resize(groups * nsplit * R);
      pl.resize(groups * nsplit * R);
    }
    auto block_of = [&](int64_t gi) {
      const int64_t hc = gi % nhc, kvh = (gi / nhc) % a.Hkv, b = gi / (nhc * a.Hkv);
      const int64_t h0 = kvh * a.group + hc * hchunk;
      return RowBlock{b, kvh, h0, std::min(hchunk, (kvh + 1) * a.group - h0), 0, a.Lq};
    };
    dynamic_for(groups * nsplit, [&](int64_t t) {
      thread_local Work w;
      const int64_t gi = t / nsplit, sp = t % nsplit;
      const RowBlock rb = block_of(gi);
      forward_block(a, rb, sp * per, std::min(a.Lk, (sp + 1) * per), w);
      const int64_t R2 = rb.rows();
      if (nsplit == 1) {
        for (int64_t r = 0; r < R2; ++r) {
          const int64_t rid = a.row_id(rb.b, rb.head(r), rb.query(r));
          finish_row(w.o.data() + r * Dv, w.m[r], w.l[r], out + rid * Dv, lse + rid, Dv);
        }
      } else {
        std::copy(w.o.begin(), w.o.begin() + R2 * Dv, po.begin() + t * R * Dv);
        std::copy(w.m.begin(), w.m.begin() + R2, pm.begin() + t * R);
        std::copy(w.l.begin(), w.l.begin() + R2, pl.begin() + t * R);
      }
    });
    if (nsplit > 1) {
      at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
        std::vector<float> acc(Dv);
        for (int64_t gi = g0; gi < g1; ++gi) {
          const RowBlock rb = block_of(gi);
          for (int64_t r = 0; r < rb.rows(); ++r) {
            float M = kNegInf;
            for (int64_t sp = 0; sp < nsplit; ++sp) M = std::max(M, pm[(gi * nsplit + sp) * R + r]);
            float L = 0.f;
            std::fill(acc.begin(), acc.end(), 0.f);
            if (M != kNegInf) {
              for (int64_t sp = 0; sp < nsplit; ++sp) {
                const int64_t t = gi * nsplit + sp;
                const float mm = pm[t * R + r];
                if (mm == kNegInf) continue;
                const float f = std::exp(mm - M);
                L += pl[t * R + r] * f;
                const float* src = po.data() + (t * R + r) * Dv;
                for (int64_t d = 0; d < Dv; ++d) acc[d] += f * src[d];
              }
            }
            const int64_t rid = a.row_id(rb.b, rb.head(r), rb.query(r));
            finish_row(acc.data(), M, L, out + rid * Dv, lse + rid, Dv);
          }
        }
      });
    }
    return;
  }
  const int64_t nqb = (a.Lq + a.bq - 1) / a.bq;
  // Most expensive blocks first (the last query blocks under top-left causal masks).
  const bool reverse = a.g.causal;
  dynamic_for(a.B * a.Hq * nqb, [&](int64_t t) {
    thread_local Work w;
    const int64_t bh = t / nqb, qi = t % nqb, qb = reverse ? nqb - 1 - qi : qi;
    const int64_t b = bh / a.Hq, h = bh % a.Hq, i0 = qb * a.bq;
    const RowBlock rb{b, h / a.group, h, 1, i0, std::min(a.bq, a.Lq - i0)};
    forward_block(a, rb, 0, a.Lk, w);
    for (int64_t r = 0; r < rb.nq; ++r) {
      const int64_t rid = a.row_id(b, h, i0 + r);
      finish_row(w.o.data() + r * a.Dv, w.m[r], w.l[r], out + rid * a.Dv, lse + rid, a.Dv);
    }
  });
}

// ----------------------------------------------------------------------------- backward
struct BwdArgs {
  const float* dout;  // [B, Hq, Lq, Dv] contiguous
  const float* lse;   // [B, Hq, Lq]
  const float* delta; // rowsum(dout * out) [B, Hq, Lq]
  float* dq;          // [B, Hq, Lq, D] contiguous
  float* dk;          // [B, Hkv, Lk, D]
  float* dv;          // [B, Hkv, Lk, Dv]
  float* dmask;       // [B, Hq, Lq, Lk] or null
};

// For rows of `rb` and keys [k0, k0+n): P = exp(S - lse) into w.s, dS into w.s2.
// Returns false when every row is fully hidden in this key block.
bool recompute_block(const Args& a, const BwdArgs& g, const RowBlock& rb, int64_t k0, int64_t n,
                     const Blk& kb, const Blk& vb, const float* dout_rows, const float* lse_rows, const float* delta_rows, Work& w,
                     float* pdrop) {
  const int64_t R = rb.rows();
  float *s = w.s.data(), *dp = w.s2.data();
  gemm(false, true, R, n, a.D, w.qs.data(), a.D, kb.p, kb.ld, 0.f, s, n);
  gemm(false, true, R, n, a.Dv, dout_rows, a.Dv, vb.p, vb.ld, 0.f, dp, n);
  bool any = false;
  for (int64_t r = 0; r < R; ++r) {
    float *sr = s + r * n, *dpr = dp + r * n;
    const int64_t i = rb.query(r), rid = a.row_id(rb.b, rb.head(r), i);
    if (lse_rows[r] == kNegInf || !mask_row(a, sr, rid, i, k0, n)) {
      std::fill(sr, sr + n, 0.f);
      std::fill(dpr, dpr + n, 0.f);
      if (pdrop) std::fill(pdrop + r * n, pdrop + (r + 1) * n, 0.f);
      continue;
    }
    any = true;
    if (lse_rows[r] != lse_rows[r]) {
      // A row holding a NaN score: P is NaN at its visible keys, 0 at the hidden ones (-inf).
      for (int64_t j = 0; j < n; ++j) sr[j] = sr[j] == kNegInf ? 0.f : std::numeric_limits<float>::quiet_NaN();
    } else {
      row::exp_sub(sr, sr, n, lse_rows[r]);
    }
    if (a.dropout_p > 0.f) {
      // dV uses the dropped probabilities; dS uses the dropped dP with the undropped P.
      if (pdrop) {
        std::copy(sr, sr + n, pdrop + r * n);
        dropout_row(a, pdrop + r * n, rid, k0, n);
      }
      dropout_row(a, dpr, rid, k0, n);
    }
    row::sub_mul(sr, dpr, dpr, n, delta_rows[r]);  // dS (overwrites dP)
    // A zero probability contributes nothing: dS is 0 there even when dP is NaN (a NaN in a hidden
    // key's V, or in this query's dO), never 0 * NaN.
    for (int64_t j = 0; j < n; ++j)
      if (sr[j] == 0.f) dpr[j] = 0.f;
  }
  return any;
}

void attention_backward_impl(const Args& a, const BwdArgs& g) {
  const int64_t D = a.D, Dv = a.Dv;
  const int64_t nqb = (a.Lq + a.bq - 1) / a.bq, nkb = (a.Lk + a.bk - 1) / a.bk;
  // Pass 1: dQ (and dmask) per query block.
  dynamic_for(a.B * a.Hq * nqb, [&](int64_t t) {
    thread_local Work w;
    const int64_t bh = t / nqb, qb = t % nqb, b = bh / a.Hq, h = bh % a.Hq, i0 = qb * a.bq;
    const RowBlock rb{b, h / a.group, h, 1, i0, std::min(a.bq, a.Lq - i0)};
    const int64_t R = rb.nq, rid0 = a.row_id(b, h, i0);
    load_q(a, rb, w);
    w.need(w.s, R * a.bk);
    w.need(w.s2, R * a.bk);
    w.need(w.dq, R * D);
    std::fill(w.dq.begin(), w.dq.begin() + R * D, 0.f);
    const auto [klo, khi] = key_range(a, rb, 0, a.Lk);
    for (int64_t k0 = klo; k0 < khi; k0 += a.bk) {
      const int64_t n = std::min(a.bk, khi - k0);
      const Blk kb = k_block(a, b, rb.kvh, k0, n, w.kb), vb = v_block(a, b, rb.kvh, k0, n, w.vb);
      if (!recompute_block(a, g, rb, k0, n, kb, vb, g.dout + rid0 * Dv, g.lse + rid0, g.delta + rid0, w, nullptr))
        continue;
      zgemm(false, false, R, D, n, a.scale, w.s2.data(), n, kb.p, kb.ld, 1.f, w.dq.data(), D);
      if (g.dmask)
        for (int64_t r = 0; r < R; ++r)
          std::copy(w.s2.data() + r * n, w.s2.data() + (r + 1) * n, g.dmask + (rid0 + r) * a.Lk + k0);
    }
    std::copy(w.dq.begin(), w.dq.begin() + R * D, g.dq + rid0 * D);
  });
  // Pass 2: dK, dV per key block, summed over the group's query heads and query blocks.
  dynamic_for(a.B * a.Hkv * nkb, [&](int64_t t) {
    thread_local Work w;
    const int64_t bkv = t / nkb, kbi = t % nkb, b = bkv / a.Hkv, kvh = bkv % a.Hkv;
    const int64_t k0 = kbi * a.bk, n = std::min(a.bk, a.Lk - k0);
    w.need(w.dk, n * D);
    w.need(w.dv, n * Dv);
    w.need(w.s, a.bq * a.bk);
    w.need(w.s2, a.bq * a.bk);
    if (a.dropout_p > 0.f) w.need(w.dd, a.bq * a.bk);
    std::fill(w.dk.begin(), w.dk.begin() + n * D, 0.f);
    std::fill(w.dv.begin(), w.dv.begin() + n * Dv, 0.f);
    const Blk kb = k_block(a, b, kvh, k0, n, w.kb), vb = v_block(a, b, kvh, k0, n, w.vb);
    for (int64_t h = kvh * a.group; h < (kvh + 1) * a.group; ++h) {
      for (int64_t i0 = 0; i0 < a.Lq; i0 += a.bq) {
        const RowBlock rb{b, kvh, h, 1, i0, std::min(a.bq, a.Lq - i0)};
        const auto [klo, khi] = key_range(a, rb, k0, k0 + n);
        if (klo >= khi) continue;
        const int64_t R = rb.nq, rid0 = a.row_id(b, h, i0);
        load_q(a, rb, w);
        float* pd = a.dropout_p > 0.f ? w.dd.data() : nullptr;
        if (!recompute_block(a, g, rb, k0, n, kb, vb, g.dout + rid0 * Dv, g.lse + rid0, g.delta + rid0, w, pd))
          continue;
        zgemm(true, false, n, Dv, R, 1.f, pd ? pd : w.s.data(), n, g.dout + rid0 * Dv, Dv, 1.f, w.dv.data(), Dv);
        // dK = scale * dS^T Q = dS^T (scale * Q)
        zgemm(true, false, n, D, R, 1.f, w.s2.data(), n, w.qs.data(), D, 1.f, w.dk.data(), D);
      }
    }
    std::copy(w.dk.begin(), w.dk.begin() + n * D, g.dk + (bkv * a.Lk + k0) * D);
    std::copy(w.dv.begin(), w.dv.begin() + n * Dv, g.dv + (bkv * a.Lk + k0) * Dv);
  });
}

// ----------------------------------------------------------------------------- setup
// Last dim contiguous (a view when it already is), optionally converted to fp32.
at::Tensor prep(const at::Tensor& t, bool to_f32) {
  at::Tensor f = (to_f32 && t.scalar_type() != at::kFloat) ? t.to(at::kFloat) : t;
  if (f.size(-1) > 1 && f.stride(-1) != 1) f = f.contiguous();
  // BLAS needs a row stride covering the row (true for any non-overlapping layout).
  if (f.size(-2) > 1 && f.stride(-2) < f.size(-1)) f = f.contiguous();
  return f;
}


Args make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
               bool causal, bool bottom_right, int64_t wl, int64_t wr, double dropout_p, int64_t seed) {
  Args a;
  a.q = q.data_ptr<float>();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.kv_type = k.scalar_type() == at::kFloat ? 0 : (k.scalar_type() == at::kHalf ? 1 : 2);
  for (int d = 0; d < 3; ++d) {
    a.qs[d] = q.stride(d);
    a.ks[d] = k.stride(d);
    a.vs[d] = v.stride(d);
  }
  a.B = q.size(0);
  a.Hq = q.size(1);
  a.Lq = q.size(2);
  a.D = q.size(3);
  a.Hkv = k.size(1);
  a.Lk = k.size(2);
  a.Dv = v.size(3);
  a.group = a.Hq / a.Hkv;
  a.scale = (float)scale;
  a.g = make_attn_geom(a.Lq, a.Lk, causal, bottom_right, wl, wr);
  if (causal || wr >= 0) a.bq = kBlockQCausal;
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "pyllm: dropout_p must be in [0, 1), got ", dropout_p);
  a.dropout_p = (float)dropout_p;
  if (dropout_p > 0.0) {
    a.drop_threshold = (uint32_t)std::min(4294967295.0, std::ldexp(dropout_p, 32));
    a.drop_scale = (float)(1.0 / (1.0 - dropout_p));
    a.seed = (uint64_t)seed;
  }
  return a;
}

// Sets a.mask/a.mi; returns the holder tensor keeping the mask alive.
at::Tensor setup_mask(Args& a, const std::optional<at::Tensor>& mask, const at::Tensor& q) {
  if (!mask.has_value() || !mask->defined()) return {};
  const at::Tensor mf = expand_mask(mask, q, {a.B, a.Hq, a.Lq, a.Lk}, "attn_mask", "query", a.mi,
                                    /*to_float=*/true, /*allow_double=*/true);
  const auto mt = mask->scalar_type();
  a.mk = mt == at::kBool ? MaskKind::kBool : MaskKind::kFloat;
  a.mask = mf.data_ptr();
  return mf;
}

// Sets a.alibi; returns the holder tensor keeping the slopes alive.
at::Tensor setup_alibi(Args& a, const std::optional<at::Tensor>& alibi, const at::Tensor& q) {
  at::Tensor t = alibi_f32(alibi, a.B, a.Hq, q);
  if (t.defined()) {
    a.alibi = t.data_ptr<float>();
    a.alibi_bstride = t.dim() == 2 ? a.Hq : 0;
  }
  return t;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& query, const at::Tensor& key,
                                             const at::Tensor& value, const std::optional<at::Tensor>& mask,
                                             double scale, bool causal, bool bottom_right, int64_t window_left,
                                             int64_t window_right, double dropout_p, int64_t seed,
                                             const std::optional<at::Tensor>& alibi_slopes) {
  check_attention_qkv(query, key, value);
  const at::Tensor q = prep(query, true), k = prep(key, false), v = prep(value, false);
  Args a = make_args(q, k, v, scale, causal, bottom_right, window_left, window_right, dropout_p, seed);
  const at::Tensor mholder = setup_mask(a, mask, query);
  const at::Tensor aholder = setup_alibi(a, alibi_slopes, query);
  const auto fopt = query.options().dtype(at::kFloat);
  at::Tensor out = at::empty({a.B, a.Hq, a.Lq, a.Dv}, fopt);
  at::Tensor lse = at::empty({a.B, a.Hq, a.Lq}, fopt);
  if (a.Lk == 0) {  // no keys: every row is fully masked
    out.zero_();
    lse.fill_(kNegInf);
  } else if (lse.numel() > 0) {
    attention_forward(a, out.data_ptr<float>(), lse.data_ptr<float>());
  }
  if (query.scalar_type() != at::kFloat) out = out.to(query.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, double scale,
    bool causal, bool bottom_right, int64_t window_left, int64_t window_right, double dropout_p,
    int64_t seed, bool mask_grad, const std::optional<at::Tensor>& alibi_slopes) {
  check_attention_qkv(query, key, value);
  const at::Tensor q = prep(query, true), k = prep(key, false), v = prep(value, false);
  Args a = make_args(q, k, v, scale, causal, bottom_right, window_left, window_right, dropout_p, seed);
  const at::Tensor mholder = setup_mask(a, mask, query);
  const at::Tensor aholder = setup_alibi(a, alibi_slopes, query);
  const std::vector<int64_t> oshape{a.B, a.Hq, a.Lq, a.Dv};
  TORCH_CHECK(grad_out.sizes() == oshape && out.sizes() == oshape, "pyllm: grad_out and out must have shape ",
              oshape, ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({a.B, a.Hq, a.Lq}) && lse.scalar_type() == at::kFloat,
              "pyllm: lse must be float32 of shape [", a.B, ", ", a.Hq, ", ", a.Lq, "]");
  const auto fopt = query.options().dtype(at::kFloat);
  const at::Tensor dout = grad_out.to(at::kFloat).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  // fp64 products and sum: delta feeds dS = P (dP - delta), which cancels its leading digits.
  const at::Tensor delta = (dout.to(at::kDouble) * out.to(at::kDouble)).sum(-1).to(at::kFloat).contiguous();
  at::Tensor dq = at::empty({a.B, a.Hq, a.Lq, a.D}, fopt);
  at::Tensor dk = at::empty({a.B, a.Hkv, a.Lk, a.D}, fopt);
  at::Tensor dv = at::empty({a.B, a.Hkv, a.Lk, a.Dv}, fopt);
  const bool want_dmask = mask_grad && a.mk == MaskKind::kFloat;
  at::Tensor dmask = want_dmask ? at::zeros({a.B, a.Hq, a.Lq, a.Lk}, fopt) : at::empty({0}, fopt);
  BwdArgs g{dout.data_ptr<float>(), lse_c.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<float>(),
            dk.data_ptr<float>(), dv.data_ptr<float>(), want_dmask ? dmask.data_ptr<float>() : nullptr};
  if (a.B * a.Hq * a.Lq > 0 && a.Lk > 0) {
    attention_backward_impl(a, g);
  } else {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  const auto dt = query.scalar_type();
  if (dt != at::kFloat) {
    dq = dq.to(dt);
    dk = dk.to(dt);
    dv = dv.to(dt);
  }
  return {dq, dk, dv, dmask};
}

// varlen_attention forward: one parallel loop over (sequence, query block, head) tasks of the whole
// packed batch, each running the dense kernel's forward_block on its sequence's rows (base pointers
// shifted to the sequence start; geometry, dropout stream and row ids per sequence, exactly as a
// dense call on that sequence would use). Output is written head-major [H, T, Dv] (each task's rows
// are contiguous there), then transposed once to the packed [T, H, Dv].
std::tuple<at::Tensor, at::Tensor> varlen_attention(const at::Tensor& query, const at::Tensor& key,
                                                    const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                                    const at::Tensor& cu_seqlens_k, double scale, bool causal,
                                                    int64_t window_left, int64_t window_right, double dropout_p,
                                                    int64_t seed, const std::optional<at::Tensor>& alibi_slopes) {
  check_varlen_qkv(query, key, value);
  const VarlenSeqs sq = varlen_seqs(query, key, cu_seqlens_q, cu_seqlens_k);
  const at::Tensor alibi = alibi_f32(alibi_slopes, (int64_t)sq.q.size() - 1, query.size(1), query);
  auto as_bhld = [](const at::Tensor& t) { return t.permute({1, 0, 2}).unsqueeze(0); };
  const at::Tensor q = prep(as_bhld(query), true), k = prep(as_bhld(key), false), v = prep(as_bhld(value), false);
  const Args a = make_args(q, k, v, scale, causal, true, window_left, window_right, dropout_p, seed);
  const int64_t T = query.size(0), H = a.Hq, Dv = a.Dv, nseq = (int64_t)sq.q.size() - 1;
  const int64_t esize = a.kv_type == 0 ? 4 : 2;
  const auto fopt = query.options().dtype(at::kFloat);
  at::Tensor out = at::empty({H, T, Dv}, fopt), lse = at::empty({H, T}, fopt);
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (sequence, query block), longest sequences first
  std::vector<int64_t> order(nseq);
  for (int64_t b = 0; b < nseq; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return sq.q[x + 1] - sq.q[x] > sq.q[y + 1] - sq.q[y];
  });
  for (int64_t b : order)
    for (int64_t i0 = 0; i0 < sq.q[b + 1] - sq.q[b]; i0 += a.bq) tasks.emplace_back(b, i0);
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  dynamic_for((int64_t)tasks.size() * H, [&](int64_t t) {
    thread_local Work w;
    const auto [b, i0] = tasks[t / H];
    const int64_t h = t % H, q0 = sq.q[b], k0 = sq.k[b];
    Args s = a;  // the sequence as a dense [1, H, Lq, D] problem
    s.Lq = sq.q[b + 1] - q0;
    s.Lk = sq.k[b + 1] - k0;
    s.q = a.q + q0 * a.qs[2];
    s.k = static_cast<const char*>(a.k) + k0 * a.ks[2] * esize;
    s.v = static_cast<const char*>(a.v) + k0 * a.vs[2] * esize;
    s.g = make_attn_geom(s.Lq, s.Lk, causal, true, window_left, window_right);
    s.seed = (uint64_t)seq_seed(seed, (size_t)b);
    if (alibi.defined()) {  // this sequence's slopes, indexed by head (the dense problem has B = 1)
      s.alibi = alibi.data_ptr<float>() + (alibi.dim() == 2 ? b * H : 0);
      s.alibi_bstride = 0;
    }
    const RowBlock rb{0, h / a.group, h, 1, i0, std::min(a.bq, s.Lq - i0)};
    forward_block(s, rb, 0, s.Lk, w);
    const int64_t row0 = h * T + q0 + i0;
    for (int64_t r = 0; r < rb.nq; ++r)
      finish_row(w.o.data() + r * Dv, w.m[r], w.l[r], op + (row0 + r) * Dv, lp + row0 + r, Dv);
  });
  return {out.permute({1, 0, 2}).to(query.scalar_type()).contiguous(), lse.t().contiguous()};
}

// varlen_attention_backward: per sequence on the dense backward (varlen.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const at::Tensor& out, const at::Tensor& lse,
    double scale, bool causal, int64_t window_left, int64_t window_right, double dropout_p, int64_t seed,
    const std::optional<at::Tensor>& alibi_slopes) {
  return ::pyllm::varlen_backward(&attention_backward, grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse,
                                  scale, causal, window_left, window_right, dropout_p, seed, alibi_slopes);
}

}  // namespace pyllm::cpu

// The CPU kernels of torch.ops.pyllm (schemas: pyllm/ops/).
TORCH_LIBRARY_IMPL(pyllm, CPU, m) {
  m.impl("attention", &pyllm::cpu::attention);
  m.impl("attention_backward", &pyllm::cpu::attention_backward);
  m.impl("varlen_attention", &pyllm::cpu::varlen_attention);
  m.impl("varlen_attention_backward", &pyllm::cpu::varlen_attention_backward);
}

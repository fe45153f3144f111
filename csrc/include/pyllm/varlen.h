// Variable-length (packed) attention on top of a backend's dense attention entry points.
//
// q [total_q, Hq, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv] hold B sequences back to back;
// sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] of q (and likewise for k/v). Each
// sequence runs the backend's own attention kernel on a [1, H, L, D] view of the packed rows
// (no copies of q/k/v, no pad tokens), causal masks and windows aligned bottom-right per
// sequence, as FlashAttention >= 2.1. Shared by the CPU, CUDA and emulated builds (host code).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace pyllm {

// cu_seqlens on the host as int64, after checking that it is 1-D int32/int64, starts at 0,
// never decreases and ends at `total` (the packed row count of `what`).
inline std::vector<int64_t> host_cu_seqlens(const at::Tensor& cu, int64_t total, const char* name,
                                            const char* what) {
  TORCH_CHECK(cu.dim() == 1 && (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong) && cu.numel() >= 1,
              "pyllm: ", name, " must be a non-empty 1-D int32 or int64 tensor, got shape ", cu.sizes(),
              " and dtype ", cu.scalar_type());
  const at::Tensor c = cu.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<int64_t> v(p, p + c.numel());
  TORCH_CHECK(v.front() == 0, "pyllm: ", name, " must start at 0, got ", v.front());
  for (size_t i = 1; i < v.size(); ++i)
    TORCH_CHECK(v[i] >= v[i - 1], "pyllm: ", name, " must not decrease, got ", v[i - 1], " then ", v[i]);
  TORCH_CHECK(v.back() == total, "pyllm: ", name, " must end at the number of packed rows of ", what, " (",
              total, "), got ", v.back());
  return v;
}

inline void check_varlen_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "pyllm: varlen q, k and v must be [total_tokens, heads, head_dim], got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(0) == v.size(0) && k.size(1) == v.size(1) && q.size(2) == k.size(2),
              "pyllm: varlen k ", k.sizes(), " and v ", v.sizes(), " must agree on tokens and heads, and q ",
              q.sizes(), " and k on the head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "pyllm: query heads (", q.size(1),
              ") must be a multiple of key/value heads (", k.size(1), ")");
}

// ALiBi slopes as a contiguous fp32 tensor ([H] or [B, H]; undefined when absent), checked against
// the batch and query heads. The kernels add -slope * |i + shift - j| to the scaled score of query
// i and key j (shift = Lk - Lq when bottom-right aligned, else 0), as FlashAttention does.
inline at::Tensor alibi_f32(const std::optional<at::Tensor>& alibi, int64_t B, int64_t H, const at::Tensor& q) {
  if (!alibi.has_value() || !alibi->defined()) return {};
  const at::Tensor& a = *alibi;
  TORCH_CHECK(a.is_floating_point(), "pyllm: alibi_slopes must be a floating tensor, got ", a.scalar_type());
  TORCH_CHECK(a.device() == q.device(), "pyllm: alibi_slopes is on ", a.device(), " but query is on ", q.device());
  TORCH_CHECK((a.dim() == 1 && a.size(0) == H) || (a.dim() == 2 && a.size(0) == B && a.size(1) == H),
              "pyllm: alibi_slopes must have shape [", H, "] or [", B, ", ", H, "] (query heads), got ", a.sizes());
  return a.to(at::kFloat).contiguous();
}

// Slopes of sequence b for a per-sequence dense call: [H] as is, row b of [B, H].
inline std::optional<at::Tensor> alibi_of_seq(const std::optional<at::Tensor>& alibi, size_t b) {
  if (!alibi.has_value() || !alibi->defined()) return std::nullopt;
  return alibi->dim() == 2 ? alibi->select(0, (int64_t)b) : *alibi;
}

// Rows s..e of a packed [T, H, D] tensor as a [1, H, e - s, D] view.
inline at::Tensor seq_view(const at::Tensor& t, int64_t s, int64_t e) {
  return t.slice(0, s, e).permute({1, 0, 2}).unsqueeze(0);
}

// Decorrelates the dropout streams of the sequences of one call.
inline int64_t seq_seed(int64_t seed, size_t b) {
  return (int64_t)((uint64_t)seed + (uint64_t)b * 0x9E3779B97F4A7C15ull);
}

struct VarlenSeqs {
  std::vector<int64_t> q, k;
};

inline VarlenSeqs varlen_seqs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q,
                              const at::Tensor& cu_k) {
  VarlenSeqs s{host_cu_seqlens(cu_q, q.size(0), "cu_seqlens_q", "q"),
               host_cu_seqlens(cu_k, k.size(0), "cu_seqlens_k", "k")};
  TORCH_CHECK(s.q.size() == s.k.size(), "pyllm: cu_seqlens_q and cu_seqlens_k must have the same length "
              "(batch + 1), got ", s.q.size(), " and ", s.k.size());
  return s;
}

// Forward: `attn` is the backend's dense attention(q, k, v, mask, scale, causal, bottom_right,
// wl, wr, dropout_p, seed) -> (out [1, H, L, Dv], lse [1, H, L]). Returns out [Tq, Hq, Dv] and
// lse [Tq, Hq] (fp32; -inf for a query with no visible key).
template <typename Attn>
std::tuple<at::Tensor, at::Tensor> varlen_forward(Attn attn, const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const at::Tensor& cu_q,
                                                  const at::Tensor& cu_k, double scale, bool causal,
                                                  int64_t wl, int64_t wr, double dropout_p, int64_t seed,
                                                  const std::optional<at::Tensor>& alibi) {
  check_varlen_qkv(q, k, v);
  const VarlenSeqs s = varlen_seqs(q, k, cu_q, cu_k);
  alibi_f32(alibi, (int64_t)s.q.size() - 1, q.size(1), q);  // checks
  at::Tensor out = at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  for (size_t b = 0; b + 1 < s.q.size(); ++b) {
    const int64_t q0 = s.q[b], q1 = s.q[b + 1], k0 = s.k[b], k1 = s.k[b + 1];
    if (q1 == q0) continue;
    auto [o, l] = attn(seq_view(q, q0, q1), seq_view(k, k0, k1), seq_view(v, k0, k1), std::nullopt, scale,
                       causal, /*bottom_right=*/true, wl, wr, dropout_p, seq_seed(seed, b), alibi_of_seq(alibi, b));
    out.slice(0, q0, q1).copy_(o[0].permute({1, 0, 2}));
    lse.slice(0, q0, q1).copy_(l[0].t());
  }
  return {out, lse};
}

// Backward: `attn_bwd` is the backend's dense attention_backward. Returns dq, dk, dv (packed).
template <typename AttnBwd>
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_backward(
    AttnBwd attn_bwd, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_q, const at::Tensor& cu_k, const at::Tensor& out, const at::Tensor& lse, double scale,
    bool causal, int64_t wl, int64_t wr, double dropout_p, int64_t seed, const std::optional<at::Tensor>& alibi) {
  check_varlen_qkv(q, k, v);
  const VarlenSeqs s = varlen_seqs(q, k, cu_q, cu_k);
  alibi_f32(alibi, (int64_t)s.q.size() - 1, q.size(1), q);  // checks
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.dim() == 3 && out.size(0) == q.size(0) &&
                  out.size(1) == q.size(1) && out.size(2) == v.size(2),
              "pyllm: grad_out and out must have shape [", q.size(0), ", ", q.size(1), ", ", v.size(2), "], got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.scalar_type() == at::kFloat,
              "pyllm: lse must be float32 of shape [", q.size(0), ", ", q.size(1), "], got ", lse.sizes());
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  for (size_t b = 0; b + 1 < s.q.size(); ++b) {
    const int64_t q0 = s.q[b], q1 = s.q[b + 1], k0 = s.k[b], k1 = s.k[b + 1];
    if (q1 == q0 || k1 == k0) continue;  // no queries or no keys: zero gradients
    auto [gq, gk, gv, gm] = attn_bwd(seq_view(grad_out, q0, q1), seq_view(q, q0, q1), seq_view(k, k0, k1),
                                     seq_view(v, k0, k1), std::nullopt, seq_view(out, q0, q1),
                                     lse.slice(0, q0, q1).t().unsqueeze(0), scale, causal, true, wl, wr,
                                     dropout_p, seq_seed(seed, b), false, alibi_of_seq(alibi, b));
    dq.slice(0, q0, q1).copy_(gq[0].permute({1, 0, 2}));
    dk.slice(0, k0, k1).copy_(gk[0].permute({1, 0, 2}));
    dv.slice(0, k0, k1).copy_(gv[0].permute({1, 0, 2}));
  }
  return {dq, dk, dv};
}

}  // namespace pyllm

// Defines the varlen_attention / varlen_attention_backward entry points (declared in
// ops/attention.h) in the current namespace, on that namespace's dense ATTN / ATTN_BWD.
#define PYLLM_DEFINE_VARLEN_OPS(ATTN, ATTN_BWD)                                                          \
  std::tuple<at::Tensor, at::Tensor> varlen_attention(                                                   \
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,     \
      const at::Tensor& cu_seqlens_k, double scale, bool causal, int64_t window_left,                    \
      int64_t window_right, double dropout_p, int64_t seed, const std::optional<at::Tensor>& alibi) {    \
    return ::pyllm::varlen_forward(&ATTN, q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal,            \
                                   window_left, window_right, dropout_p, seed, alibi);                   \
  }                                                                                                      \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(                              \
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,         \
      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const at::Tensor& out,             \
      const at::Tensor& lse, double scale, bool causal, int64_t window_left, int64_t window_right,       \
      double dropout_p, int64_t seed, const std::optional<at::Tensor>& alibi) {                          \
    return ::pyllm::varlen_backward(&ATTN_BWD, grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse,  \
                                    scale, causal, window_left, window_right, dropout_p, seed, alibi);   \
  }

// pyllm's CUDA kernels (csrc/cuda/*.cu, compiled as C++ against the CPU emulation of
// CUDA) checked against ATen in double precision, built with ASan + UBSan: any
// out-of-bounds access, shared-memory overflow or UB in a kernel fails this test.
#include <ATen/ATen.h>

#include <cstdio>
#include <limits>

#include "pyllm/ops/attention.h"
#include "pyllm/ops/norm.h"
#include "pyllm/ops/softmax.h"

namespace emu = pyllm::emu;

static int g_checks = 0, g_failures = 0;

static double max_err(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return 0.0;
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// Tolerance: a few units in the last place of the dtype at magnitude `scale`.
static double tol(at::ScalarType t, double scale) {
  const double ulp = t == at::kFloat ? 1.2e-7 : (t == at::kHalf ? 9.8e-4 : 7.9e-3);
  return 4.0 * ulp * scale + 1e-6;
}

static void check(const char* what, at::ScalarType t, int64_t n, double err, double bound) {
  ++g_checks;
  const bool ok = err <= bound && !std::isnan(err);
  if (!ok) ++g_failures;
  if (!ok) std::printf("FAIL %-28s %-9s n=%-5lld err=%.3g bound=%.3g\n", what,
                       c10::toString(t), (long long)n, err, bound);
}

static void test_layer_norm(at::ScalarType t, int64_t rows, int64_t n) {
  const auto x = at::randn({rows, n}).to(t), r = at::randn({rows, n}).to(t);
  const auto w = at::randn({n}), b = at::randn({n});
  auto [y, mean, rstd] = emu::layer_norm(x, w, b, 1e-5);
  const auto ref = at::layer_norm(x.to(at::kDouble), {n}, w.to(at::kDouble), b.to(at::kDouble), 1e-5);
  const double mag = ref.abs().max().item<double>();
  check("layer_norm", t, n, max_err(y, ref), tol(t, mag));

  auto [y2, s2, m2, r2] = emu::add_layer_norm(x, r, w, b, 1e-5);
  const auto s_ref = (x + r);
  check("add_layer_norm.summed", t, n, max_err(s2, s_ref), 0.0);
  const auto ref2 = at::layer_norm(s_ref.to(at::kDouble), {n}, w.to(at::kDouble), b.to(at::kDouble), 1e-5);
  check("add_layer_norm.out", t, n, max_err(y2, ref2), tol(t, ref2.abs().max().item<double>()));

  // backward vs the analytic formula in double
  const auto dy = at::randn({rows, n}).to(t);
  auto [dx, dw, db] = emu::layer_norm_backward(dy, x, mean, rstd, w, std::nullopt);
  const auto xd = x.to(at::kDouble), dyd = dy.to(at::kDouble), wd = w.to(at::kDouble);
  const auto mu = xd.mean(-1, true);
  const auto rs = at::rsqrt((xd - mu).pow(2).mean(-1, true) + 1e-5);
  const auto xh = (xd - mu) * rs, g = dyd * wd;
  const auto dx_ref = rs * (g - g.mean(-1, true) - xh * (g * xh).mean(-1, true));
  check("layer_norm_backward.dx", t, n, max_err(dx, dx_ref), tol(t, dx_ref.abs().max().item<double>()) * 4);
  const auto dw_ref = (dyd * xh).sum(0), db_ref = dyd.sum(0);
  check("layer_norm_backward.dw", t, n, max_err(dw, dw_ref), 1e-4 * (1 + dw_ref.abs().max().item<double>()) * rows);
  check("layer_norm_backward.db", t, n, max_err(db, db_ref), 1e-4 * (1 + db_ref.abs().max().item<double>()) * rows);
}

static void test_rms_norm(at::ScalarType t, int64_t rows, int64_t n) {
  const auto x = at::randn({rows, n}).to(t);
  const auto w = at::randn({n});
  auto [y, rstd] = emu::rms_norm(x, w, 1e-6, std::nullopt, 0.0, t);
  const auto xd = x.to(at::kDouble);
  const auto rs = at::rsqrt(xd.pow(2).mean(-1, true) + 1e-6);
  const auto ref = xd * rs * w.to(at::kDouble);
  check("rms_norm", t, n, max_err(y, ref), tol(t, ref.abs().max().item<double>()));
  // add_rms_norm: the sum exactly as the dtype's own add, then RMSNorm of the sum as stored
  const auto r = at::randn({rows, n}).to(t);
  auto [y2, s2, r2] = emu::add_rms_norm(x, r, w, 1e-6, std::nullopt, 0.0, t);
  const auto s_ref = x + r, sd = s_ref.to(at::kDouble);
  check("add_rms_norm.summed", t, n, max_err(s2, s_ref), 0.0);
  const auto ref2 = sd * at::rsqrt(sd.pow(2).mean(-1, true) + 1e-6) * w.to(at::kDouble);
  check("add_rms_norm.out", t, n, max_err(y2, ref2), tol(t, ref2.abs().max().item<double>()));
  const auto dy = at::randn({rows, n});
  auto [dx, dw] = emu::rms_norm_backward(dy, x, rstd, w, std::nullopt, 0.0);
  const auto g = dy.to(at::kDouble) * w.to(at::kDouble), nrm = xd * rs;
  const auto dx_ref = rs * (g - nrm * (g * nrm).mean(-1, true));
  check("rms_norm_backward.dx", t, n, max_err(dx, dx_ref), tol(t, dx_ref.abs().max().item<double>()) * 4);
  const auto dw_ref = (dy.to(at::kDouble) * nrm).sum(0);
  check("rms_norm_backward.dw", t, n, max_err(dw, dw_ref), 1e-4 * (1 + dw_ref.abs().max().item<double>()) * rows);
}

static at::Tensor softmax_ref(const at::Tensor& x, const at::Tensor& keep, const at::Tensor& add, double scale) {
  auto s = x.to(at::kDouble) * scale;
  if (add.defined()) s = s + add.to(at::kDouble);
  if (keep.defined()) s = s.masked_fill(keep.logical_not(), -std::numeric_limits<double>::infinity());
  auto m = std::get<0>(s.max(-1, true));
  m = at::where(at::isfinite(m), m, at::zeros_like(m));
  const auto e = at::exp(s - m);
  const auto d = e.sum(-1, true);
  return at::where(d > 0, e / at::where(d > 0, d, at::ones_like(d)), at::zeros_like(e));
}

static void test_softmax(at::ScalarType t, int64_t n) {
  const int64_t B = 2, H = 3, Lq = 5;
  const auto x = at::randn({B, H, Lq, n}).to(t);
  // bool padding mask [B,1,1,n] with one fully-masked batch row
  auto keep = at::rand({B, 1, 1, n}) > 0.3;
  keep.select(0, 1).fill_(false);
  auto y = emu::masked_softmax(x, keep, 0.5, false);
  check("softmax.bool_mask", t, n, max_err(y, softmax_ref(x, keep, at::Tensor(), 0.5)), tol(t, 1.0));
  // additive [1,H,Lq,n] bias (T5-style), fp32, plus causal
  const auto bias = at::randn({1, H, Lq, n});
  y = emu::masked_softmax(x, bias, 1.0, true);
  const auto causal = at::ones({Lq, n}, at::kBool).tril();
  check("softmax.additive_causal", t, n, max_err(y, softmax_ref(x, causal, bias, 1.0)), tol(t, 1.0));
  // expanded (stride-0) non-contiguous mask
  const auto keep_col = (at::rand({n}) > 0.5).expand({B, H, Lq, n});
  y = emu::masked_softmax(x, keep_col, 1.0, false);
  check("softmax.expanded_mask", t, n, max_err(y, softmax_ref(x, keep_col, at::Tensor(), 1.0)), tol(t, 1.0));
  // backward
  const auto yp = emu::masked_softmax(x, std::nullopt, 1.0, false);
  const auto dy = at::randn_like(yp);
  const auto dx = emu::masked_softmax_backward(dy, yp, 0.5);
  const auto yd = yp.to(at::kDouble), dyd = dy.to(at::kDouble);
  const auto dx_ref = 0.5 * yd * (dyd - (dyd * yd).sum(-1, true));
  check("softmax_backward", t, n, max_err(dx, dx_ref), tol(t, 1.0 + dx_ref.abs().max().item<double>()) * 2);
}

// Attention: forward vs softmax(QK^T*scale + mask)V in double; backward vs the
// analytic gradients in double. q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] (GQA).
static void test_attention(at::ScalarType t, int64_t Lq, int64_t Lk, int64_t D, bool causal, bool bottom_right,
                           bool padding, int64_t wl, int64_t wr) {
  const int64_t B = 2, Hq = 4, Hkv = 2;
  const auto q = at::randn({B, Hq, Lq, D}).to(t), k = at::randn({B, Hkv, Lk, D}).to(t),
             v = at::randn({B, Hkv, Lk, D}).to(t);
  at::Tensor keep;
  if (padding) {
    keep = at::ones({B, 1, 1, Lk}, at::kBool);
    keep.select(0, 1).narrow(-1, Lk - Lk / 3, Lk / 3).fill_(false);  // right padding
  }
  const double scale = 1.0 / std::sqrt((double)D);
  auto [out, lse] = emu::attention(q, k, v, keep.defined() ? std::optional<at::Tensor>(keep) : std::nullopt,
                                   scale, causal, bottom_right, wl, wr, 0.0, 0, std::nullopt);
  // Reference: the same math with ATen ops, in double (the oracle) and in the test dtype
  // (plain torch's own error, which bounds ours within a small multiple, as in the Python suite).
  auto i = at::arange(Lq, at::kLong).unsqueeze(-1) + (bottom_right ? Lk - Lq : 0);
  const auto j = at::arange(Lk, at::kLong);
  auto allow = at::ones({Lq, Lk}, at::kBool);
  if (causal) allow = allow.logical_and(j.le(i));
  if (wl >= 0) allow = allow.logical_and(j.ge(i - wl));
  if (wr >= 0) allow = allow.logical_and(j.le(i + wr));
  const auto allow_full = keep.defined() ? allow.logical_and(keep) : allow.expand({B, Hq, Lq, Lk});
  const auto dout = at::randn_like(out);
  auto reference = [&](at::ScalarType dt) {
    const auto qd = q.to(dt), kd = k.to(dt).repeat_interleave(Hq / Hkv, 1),
               vd = v.to(dt).repeat_interleave(Hq / Hkv, 1), dod = dout.to(dt);
    const auto p = softmax_ref(at::matmul(qd, kd.transpose(-2, -1)), allow_full, at::Tensor(), scale).to(dt);
    const auto o = at::matmul(p, vd);
    const auto dv = at::matmul(p.transpose(-2, -1), dod).view({B, Hkv, Hq / Hkv, Lk, D}).sum(2);
    const auto dp = at::matmul(dod, vd.transpose(-2, -1));
    const auto ds = p * (dp - (dp * p).sum(-1, true));
    const auto dq = at::matmul(ds, kd) * scale;
    const auto dk = (at::matmul(ds.transpose(-2, -1), qd) * scale).view({B, Hkv, Hq / Hkv, Lk, D}).sum(2);
    return std::vector<at::Tensor>{o, dq, dk, dv};
  };
  auto [dq, dk, dv, dmask] = emu::attention_backward(
      dout, q, k, v, keep.defined() ? std::optional<at::Tensor>(keep) : std::nullopt, out, lse, scale, causal,
      bottom_right, wl, wr, 0.0, 0, false, std::nullopt);
  const auto want = reference(at::kDouble), plain = reference(t);
  const char* names[] = {"attention.out", "attention.dq", "attention.dk", "attention.dv"};
  const at::Tensor got[] = {out, dq, dk, dv};
  for (int m = 0; m < 4; ++m) {
    const double torch_err = max_err(plain[m], want[m]);
    check(names[m], t, D, max_err(got[m], want[m]), 3.0 * torch_err + tol(t, 1.0));
  }
}

int main() {
  at::manual_seed(0);
  for (auto t : {at::kFloat, at::kHalf, at::kBFloat16}) {
    for (int64_t n : {1, 7, 97, 1030, 2100}) {  // warp-per-row and block-per-row paths
      test_layer_norm(t, n > 1024 ? 3 : 9, n);
      test_rms_norm(t, n > 1024 ? 3 : 9, n);
      test_softmax(t, n);
    }
  }
  for (auto t : {at::kFloat, at::kHalf, at::kBFloat16}) {
    test_attention(t, 7, 7, 16, false, false, true, -1, -1);    // padding mask
    test_attention(t, 5, 33, 80, true, true, false, -1, -1);    // decode-like, bottom-right causal
    test_attention(t, 33, 33, 111, true, false, false, -1, -1); // odd head dim, top-left causal
    test_attention(t, 40, 40, 64, false, false, true, 4, 2);    // sliding window + padding
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}

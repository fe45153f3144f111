// Torch-free fp32 row primitives used by the CPU kernels. Each is compiled for
// several instruction sets (avx512f, avx2+fma, baseline) and picked at load time
// (GCC target_clones / ifunc), so the build needs no -march flag.
#pragma once
#include <cstdint>

namespace pyllm::cpu::row {

// Conversions between storage types and fp32 (fp16/bf16 given as raw 16-bit words).
void half_to_float(const uint16_t* src, float* dst, int64_t n);
void bf16_to_float(const uint16_t* src, float* dst, int64_t n);
void float_to_half(const float* src, uint16_t* dst, int64_t n);
void float_to_bf16(const float* src, uint16_t* dst, int64_t n);
// Round fp32 values in place through fp16 / bf16 (used by HF-style norms).
void round_through_half(float* x, int64_t n);
void round_through_bf16(float* x, int64_t n);

float sum(const float* x, int64_t n);
// sum(x) / n accumulated in fp64 and rounded once: LayerNorm's (x - mean) cancels
// catastrophically when |mean| >> std, so the mean must be correctly rounded.
float mean(const float* x, int64_t n);
// sum((x - mean)^2)
float sq_dev_sum(const float* x, int64_t n, float mean);
float sq_sum(const float* x, int64_t n);
float dot(const float* a, const float* b, int64_t n);
float max(const float* x, int64_t n);
void add(const float* a, const float* b, float* out, int64_t n);

// s = bf16(bf16 x + bf16 r) as fp32; returns sum(s) (fp64 across fp32 blocks)
double add_bf16_sum(const uint16_t* x, const uint16_t* r, float* s, int64_t n);
// layer_norm() written as bf16
void layer_norm_bf16(const float* x, uint16_t* y, int64_t n, float mean, float rstd, const float* w,
                     const float* b);
// y = (x - mean) * rstd * (w ? w : 1) + (b ? b : 0)
void layer_norm(const float* x, float* y, int64_t n, float mean, float rstd, const float* w,
                const float* b);
// y = x * s
void scale(const float* x, float* y, int64_t n, float s);
// y = y * (w + offset)  (w may be null: y unchanged)
void mul_weight(float* y, const float* w, float offset, int64_t n);

// Fused softmax front ends: y = x * s (+ add[i]) or -inf where keep[i] == 0;
// return max(y). `keep` is a bool array (1 byte per element), `add` fp32.
float scale_max(const float* x, float* y, int64_t n, float s);
float scale_keep_max(const float* x, const bool* keep, float* y, int64_t n, float s);
float scale_add_max(const float* x, const float* add, float* y, int64_t n, float s);

// Softmax pieces. x = input*scale + mask, already in fp32 (masked entries -inf).
// y[i] = exp(x[i] - m); returns the sum.
float exp_sub_sum(const float* x, float* y, int64_t n, float m);

// Attention pieces.
// s[i] = keep[i] ? s[i] : -inf   (keep: one byte per element, 0 or 1)
void mask_fill_bool(float* s, const uint8_t* keep, int64_t n);
// y[i] = exp(x[i] - m) with exp(-inf) = 0 (x[i] - m <= ~0)
void exp_sub(const float* x, float* y, int64_t n, float m);
// ds[i] = p[i] * (dp[i] - d)
void sub_mul(const float* p, const float* dp, float* ds, int64_t n, float d);

// LayerNorm backward for one row. g = dy * w (w may be null); xhat = (x - mean) * rstd.
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); accumulates dw += dy * xhat, db += dy.
void layer_norm_backward(const float* dy, const float* x, const float* w, float mean,
                         float rstd, float* dx, float* dw, float* db, int64_t n);
// RMSNorm backward for one row with effective weight (w + offset).
// n_i = x_i * rstd (optionally rounded: `nr` holds the value the forward used);
// dx = rstd * (g - n * mean(g * n)), g = dy * (w + offset); dw += dy * nr.
void rms_norm_backward(const float* dy, const float* x, const float* nr, const float* w,
                       float offset, float rstd, float* dx, float* dw, int64_t n);
// y = gelu(x + b) (b may be null), erf form or tanh approximation, as torch's F.gelu; and the
// backward dx = dy * gelu'(x + b). Vectorized (exp-based erfc / tanh), fp32, ~1e-7 absolute.
void bias_gelu(const float* x, const float* b, float* y, int64_t n, bool tanh_approx);
void bias_gelu_backward(const float* dy, const float* x, const float* b, float* dx, int64_t n, bool tanh_approx);
// Softmax backward: dx = s * y * (dy - dot(dy, y))
void softmax_backward(const float* dy, const float* y, float* dx, int64_t n, float s);

}  // namespace pyllm::cpu::row

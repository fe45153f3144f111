#include "rowops.h"

// No FP traps are ever enabled in torch: telling GCC so lets it if-convert the clamps and
// selects in these loops. Without it GCC 12 kept every loop with a `?:` on floats scalar in
// the avx2 and baseline clones (only AVX-512's masked ops avoided it): 6-8 ns per element in
// softmax/attention exp loops on an AVX2-only EPYC. Results are unchanged (no fast-math).
#pragma GCC optimize("no-trapping-math")

#include <cmath>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define PYLLM_X86_DISPATCH 1
#endif

// Every hot loop below is plain C++ that GCC vectorizes; target_clones builds one
// copy per instruction set and the loader picks the best one for this CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define PYLLM_MULTIVERSION __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define PYLLM_MULTIVERSION
#endif

#define SIMD_SUM _Pragma("omp simd reduction(+ : acc)")
#define SIMD _Pragma("omp simd")

namespace pyllm::cpu::row {
namespace {

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// IEEE fp16 <-> fp32, branch-free so loops vectorize; round-to-nearest-even.
inline float h2f(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Normal and subnormal numbers via a multiply by 2^112 of the shifted bits.
  float mag = bits_to_float(em << 13) * 5.192296858534828e+33f;  // 2^112
  const uint32_t infnan = (em >= 0x7c00u) ? (0x7f800000u | (em & 0x3ffu) << 13) : 0u;
  const uint32_t bits = infnan ? infnan : float_to_bits(mag);
  return bits_to_float(sign | bits);
}
inline uint16_t f2h(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  uint32_t out;
  if (ax > 0x7f800000u) {
    out = 0x7e00u;  // NaN
  } else if (ax >= 0x477ff000u) {
    out = 0x7c00u;  // overflow -> inf (values that round to >= 65520)
  } else if (ax < 0x38800000u) {
    // subnormal or zero: let the FPU round by adding 0.5 (2^-1)
    const float a = bits_to_float(ax) + 0.5f;
    out = float_to_bits(a) - 0x3f000000u;
  } else {
    const uint32_t mant_odd = (ax >> 13) & 1u;
    out = (ax + 0xc8000fffu + mant_odd) >> 13;  // rebias (-112<<23) and round to nearest even
  }
  return (uint16_t)(sign | out);
}
inline float bf2f(uint16_t b) { return bits_to_float((uint32_t)b << 16); }
inline uint16_t f2bf(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet NaN
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// exp(x) for x <= 0 (softmax after max subtraction), ~1 ulp, vectorizable.
inline float exp_neg(float x) {
  x = x < -88.f ? -88.f : x;
  const float log2e = 1.44269504088896341f;
  // Round to nearest (even) by the 1.5 * 2^23 trick: |x * log2e| <= 127. std::nearbyint is a
  // libm call (control flow) in the avx2 and baseline clones, which left these loops scalar
  // on CPUs without AVX-512 (measured 6-8 ns per element on an AVX2-only EPYC).
  const float n = (x * log2e + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (int32_t)n + 127;
  return p * bits_to_float((uint32_t)e << 23);
}

// GELU pieces, branch-free so that they vectorize. exp_neg clamps its argument at -88.
// Exact form: 1 + erf(z / sqrt 2) = 2 - erfc(a) for z >= 0, erfc(a) for z < 0, a = |z| / sqrt 2,
// with erfc(a) = poly(t) exp(-a^2), t = 1 / (1 + p a) (Abramowitz & Stegun 7.1.26, |error| <=
// 1.5e-7, relative in the tail since the exp factor is exact), so gelu keeps its accuracy for
// negative z where 1 + erf is tiny.
inline __attribute__((always_inline)) float one_plus_erf_scaled(float z, float e /* exp(-z^2 / 2) */) {
  const float a = std::fabs(z) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float erfc = poly * e;
  return z >= 0.f ? 2.0f - erfc : erfc;
}
// Tanh form: u = sqrt(2/pi) (z + 0.044715 z^3), e2 = exp(-2|u|); 1 + tanh(u) = 2 / (1 + e2) for
// u >= 0 and 2 e2 / (1 + e2) for u < 0 (no cancellation); 1 - tanh(u)^2 = 4 e2 / (1 + e2)^2.
#define PYLLM_INLINE inline __attribute__((always_inline))
PYLLM_INLINE float gelu_tanh(float z) {
  const float u = 0.79788456080286535588f * (z + 0.044715f * z * z * z);
  const float e2 = exp_neg(-2.0f * std::fabs(u));
  const float num = u >= 0.f ? 2.0f : 2.0f * e2;
  return 0.5f * z * num / (1.0f + e2);
}
PYLLM_INLINE float gelu_erf(float z) { return 0.5f * z * one_plus_erf_scaled(z, exp_neg(-0.5f * z * z)); }
PYLLM_INLINE float gelu_tanh_grad(float z) {
  const float u = 0.79788456080286535588f * (z + 0.044715f * z * z * z);
  const float e2 = exp_neg(-2.0f * std::fabs(u));
  const float inv = 1.0f / (1.0f + e2);
  const float num = u >= 0.f ? 2.0f : 2.0f * e2;
  const float sech2 = 4.0f * e2 * inv * inv;
  return 0.5f * num * inv + 0.5f * z * sech2 * 0.79788456080286535588f * (1.0f + 3.0f * 0.044715f * z * z);
}
PYLLM_INLINE float gelu_erf_grad(float z) {
  const float e = exp_neg(-0.5f * z * z);
  return 0.5f * one_plus_erf_scaled(z, e) + z * 0.39894228040143267794f * e;
}

}  // namespace

// fp16 <-> fp32: hardware conversions (AVX-512F / F16C, both round-to-nearest-even)
// chosen once at run time, with the portable bit-manipulation versions as fallback.
namespace {
void half_to_float_portable(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = h2f(src[i]);
}
void float_to_half_portable(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f2h(src[i]);
}
#if defined(PYLLM_X86_DISPATCH)
__attribute__((target("avx512f"))) void half_to_float_avx512(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = h2f(src[i]);
}
__attribute__((target("avx512f"))) void float_to_half_avx512(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = f2h(src[i]);
}
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = h2f(src[i]);
}
__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = f2h(src[i]);
}
#endif
using H2F = void (*)(const uint16_t*, float*, int64_t);
using F2H = void (*)(const float*, uint16_t*, int64_t);
H2F pick_h2f() {
#if defined(PYLLM_X86_DISPATCH)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return half_to_float_avx512;
  if (__builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx")) return half_to_float_f16c;
#endif
  return half_to_float_portable;
}
F2H pick_f2h() {
#if defined(PYLLM_X86_DISPATCH)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return float_to_half_avx512;
  if (__builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx")) return float_to_half_f16c;
#endif
  return float_to_half_portable;
}
const H2F g_h2f = pick_h2f();
const F2H g_f2h = pick_f2h();
}  // namespace

void half_to_float(const uint16_t* src, float* dst, int64_t n) { g_h2f(src, dst, n); }
void float_to_half(const float* src, uint16_t* dst, int64_t n) { g_f2h(src, dst, n); }
void round_through_half(float* x, int64_t n) {
  uint16_t tmp[256];
  for (int64_t i = 0; i < n; i += 256) {
    const int64_t m = n - i < 256 ? n - i : 256;
    g_f2h(x + i, tmp, m);
    g_h2f(tmp, x + i, m);
  }
}
PYLLM_MULTIVERSION void bf16_to_float(const uint16_t* src, float* dst, int64_t n) {
  SIMD for (int64_t i = 0; i < n; ++i) dst[i] = bf2f(src[i]);
}
PYLLM_MULTIVERSION void float_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  SIMD for (int64_t i = 0; i < n; ++i) dst[i] = f2bf(src[i]);
}
PYLLM_MULTIVERSION void round_through_bf16(float* x, int64_t n) {
  SIMD for (int64_t i = 0; i < n; ++i) x[i] = bf2f(f2bf(x[i]));
}

// Reductions: fp32 SIMD partial sums over blocks of kBlock elements, blocks accumulated
// in fp64. A plain 16-lane fp32 accumulation loses ~sqrt(n/16) ulps on long rows (at
// n = 20000 RMSNorm was 2.5x less accurate than torch's cascade sum); blocking bounds
// the fp32 chain to kBlock/16 adds per lane at no measurable cost.
constexpr int64_t kBlock = 256;

PYLLM_MULTIVERSION float sum(const float* x, int64_t n) {
  double total = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < n ? b0 + kBlock : n;
    float acc = 0.f;
    SIMD_SUM for (int64_t i = b0; i < b1; ++i) acc += x[i];
    total += acc;
  }
  return (float)total;
}
// Fused bf16 residual add: s = bf16(x + r) as fp32 (the sum rounded as a bf16 `x + r` stores it);
// returns sum(s) (fp32 blocks, fp64 across blocks, like sum()). One pass instead of four.
PYLLM_MULTIVERSION double add_bf16_sum(const uint16_t* x, const uint16_t* r, float* s, int64_t n) {
  double total = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < n ? b0 + kBlock : n;
    float acc = 0.f;
    SIMD_SUM for (int64_t i = b0; i < b1; ++i) {
      const float v = bf2f(f2bf(bf2f(x[i]) + bf2f(r[i])));
      s[i] = v;
      acc += v;
    }
    total += acc;
  }
  return total;
}
PYLLM_MULTIVERSION float mean(const float* x, int64_t n) {
  // Shifted by the row's first value (the pivot), so the fp32 partial sums hold only the spread
  // around it and keep their low bits when |mean| >> std; fp32 blocks, fp64 across blocks. (A
  // plain fp64 accumulation here was not vectorized by GCC on AVX2: a scalar loop in every
  // LayerNorm row.)
  const float pivot = x[0];
  double total = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < n ? b0 + kBlock : n;
    float acc = 0.f;
    SIMD_SUM for (int64_t i = b0; i < b1; ++i) acc += x[i] - pivot;
    total += acc;
  }
  return (float)((double)pivot + total / (double)n);
}
PYLLM_MULTIVERSION float sq_dev_sum(const float* x, int64_t n, float mean) {
  double total = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < n ? b0 + kBlock : n;
    float acc = 0.f;
    SIMD_SUM for (int64_t i = b0; i < b1; ++i) {
      const float d = x[i] - mean;
      acc += d * d;
    }
    total += acc;
  }
  return (float)total;
}
PYLLM_MULTIVERSION float sq_sum(const float* x, int64_t n) {
  double total = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < n ? b0 + kBlock : n;
    float acc = 0.f;
    SIMD_SUM for (int64_t i = b0; i < b1; ++i) acc += x[i] * x[i];
    total += acc;
  }
  return (float)total;
}
PYLLM_MULTIVERSION float dot(const float* a, const float* b, int64_t n) {
  double total = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < n ? b0 + kBlock : n;
    float acc = 0.f;
    SIMD_SUM for (int64_t i = b0; i < b1; ++i) acc += a[i] * b[i];
    total += acc;
  }
  return (float)total;
}
PYLLM_MULTIVERSION float max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  _Pragma("omp simd reduction(max : m)") for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
PYLLM_MULTIVERSION void add(const float* a, const float* b, float* out, int64_t n) {
  SIMD for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}
PYLLM_MULTIVERSION void layer_norm(const float* x, float* y, int64_t n, float mean, float rstd,
                                   const float* w, const float* b) {
  if (w && b) {
    SIMD for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd * w[i] + b[i];
  } else if (w) {
    SIMD for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd * w[i];
  } else if (b) {
    SIMD for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd + b[i];
  } else {
    SIMD for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd;
  }
}
// layer_norm() with the output rounded to bf16 in the same pass.
PYLLM_MULTIVERSION void layer_norm_bf16(const float* x, uint16_t* y, int64_t n, float mean, float rstd,
                                        const float* w, const float* b) {
  if (w && b) {
    SIMD for (int64_t i = 0; i < n; ++i) y[i] = f2bf((x[i] - mean) * rstd * w[i] + b[i]);
  } else if (w) {
    SIMD for (int64_t i = 0; i < n; ++i) y[i] = f2bf((x[i] - mean) * rstd * w[i]);
  } else if (b) {
    SIMD for (int64_t i = 0; i < n; ++i) y[i] = f2bf((x[i] - mean) * rstd + b[i]);
  } else {
    SIMD for (int64_t i = 0; i < n; ++i) y[i] = f2bf((x[i] - mean) * rstd);
  }
}
PYLLM_MULTIVERSION void scale(const float* x, float* y, int64_t n, float s) {
  SIMD for (int64_t i = 0; i < n; ++i) y[i] = x[i] * s;
}
PYLLM_MULTIVERSION void mul_weight(float* y, const float* w, float offset, int64_t n) {
  if (!w) return;
  SIMD for (int64_t i = 0; i < n; ++i) y[i] = y[i] * (w[i] + offset);
}
PYLLM_MULTIVERSION float scale_max(const float* x, float* y, int64_t n, float s) {
  float m = -std::numeric_limits<float>::infinity();
  _Pragma("omp simd reduction(max : m)") for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] * s;
    y[i] = v;
    m = v > m ? v : m;
  }
  return m;
}
namespace {
PYLLM_MULTIVERSION float scale_keep_max_portable(const float* x, const bool* keep, float* y, int64_t n,
                                                 float s) {
  const uint8_t* k = reinterpret_cast<const uint8_t*>(keep);
  float m = -std::numeric_limits<float>::infinity();
  _Pragma("omp simd reduction(max : m)") for (int64_t i = 0; i < n; ++i) {
    // Branch-free select on the bit patterns (GCC turns a ?: here back into a branch):
    // keep -> x*s, else -inf (0xff800000).
    const uint32_t sel = 0u - (uint32_t)(k[i] != 0);
    const float v = bits_to_float((float_to_bits(x[i] * s) & sel) | (0xff800000u & ~sel));
    y[i] = v;
    m = v > m ? v : m;
  }
  return m;
}
#if defined(PYLLM_X86_DISPATCH)
// GCC vectorizes the portable version at 128 bits (the byte mask sets the vector shape);
// this one runs 16 floats per step with the mask as a k-register blend.
__attribute__((target("avx512f"))) float scale_keep_max_avx512(const float* x, const bool* keep, float* y,
                                                              int64_t n, float s) {
  const uint8_t* k = reinterpret_cast<const uint8_t*>(keep);
  const __m512 vs = _mm512_set1_ps(s);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = ninf;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i kk = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + i)));
    const __mmask16 kept = _mm512_test_epi32_mask(kk, kk);
    const __m512 v = _mm512_mask_blend_ps(kept, ninf, _mm512_mul_ps(_mm512_loadu_ps(x + i), vs));
    _mm512_storeu_ps(y + i, v);
    vmax = _mm512_max_ps(vmax, v);
  }
  float m = _mm512_reduce_max_ps(vmax);
  for (; i < n; ++i) {
    const float v = k[i] ? x[i] * s : -std::numeric_limits<float>::infinity();
    y[i] = v;
    m = v > m ? v : m;
  }
  return m;
}
#endif
using ScaleKeepMax = float (*)(const float*, const bool*, float*, int64_t, float);
ScaleKeepMax pick_scale_keep_max() {
#if defined(PYLLM_X86_DISPATCH)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return scale_keep_max_avx512;
#endif
  return scale_keep_max_portable;
}
const ScaleKeepMax g_scale_keep_max = pick_scale_keep_max();
}  // namespace

float scale_keep_max(const float* x, const bool* keep, float* y, int64_t n, float s) {
  return g_scale_keep_max(x, keep, y, n, s);
}
PYLLM_MULTIVERSION float scale_add_max(const float* x, const float* add, float* y, int64_t n,
                                       float s) {
  float m = -std::numeric_limits<float>::infinity();
  _Pragma("omp simd reduction(max : m)") for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] * s + add[i];
    y[i] = v;
    m = v > m ? v : m;
  }
  return m;
}
PYLLM_MULTIVERSION float exp_sub_sum(const float* x, float* y, int64_t n, float m) {
  // fp32 partial sums per block, added in fp64: a plain fp32 sum of a 20000-wide row was
  // 10x less accurate than torch's softmax (a per-row normalization bias).
  double total = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < n ? b0 + kBlock : n;
    float acc = 0.f;
    SIMD_SUM for (int64_t i = b0; i < b1; ++i) {
      const float e = exp_neg(x[i] - m);
      // x = -inf (masked) gives exactly 0
      const float v = (x[i] == -std::numeric_limits<float>::infinity()) ? 0.f : e;
      y[i] = v;
      acc += v;
    }
    total += acc;
  }
  return (float)total;
}
PYLLM_MULTIVERSION void mask_fill_bool(float* s, const uint8_t* keep, int64_t n) {
  SIMD for (int64_t i = 0; i < n; ++i) s[i] = keep[i] ? s[i] : -std::numeric_limits<float>::infinity();
}
PYLLM_MULTIVERSION void exp_sub(const float* x, float* y, int64_t n, float m) {
  SIMD for (int64_t i = 0; i < n; ++i) {
    const float e = exp_neg(x[i] - m);
    y[i] = (x[i] == -std::numeric_limits<float>::infinity()) ? 0.f : e;
  }
}
PYLLM_MULTIVERSION void sub_mul(const float* p, const float* dp, float* ds, int64_t n, float d) {
  SIMD for (int64_t i = 0; i < n; ++i) ds[i] = p[i] * (dp[i] - d);
}
PYLLM_MULTIVERSION void layer_norm_backward(const float* dy, const float* x, const float* w,
                                            float mean, float rstd, float* dx, float* dw,
                                            float* db, int64_t n) {
  // g = dy * w is rounded once and stored in dx, and both passes read that value: if
  // the product were recomputed, FMA contraction could fuse it into the sum in one pass
  // but not the other, so g - mean(g) would not cancel (n = 1 gave dx = 1e-5, not 0).
  float sg = 0.f, sgx = 0.f;
  {
    float acc = 0.f, acc2 = 0.f;
    _Pragma("omp simd reduction(+ : acc, acc2)") for (int64_t i = 0; i < n; ++i) {
      const float g = w ? dy[i] * w[i] : dy[i];
      dx[i] = g;
      const float xh = (x[i] - mean) * rstd;
      acc += dx[i];
      acc2 += dx[i] * xh;
    }
    sg = acc;
    sgx = acc2;
  }
  const float mg = (float)((double)sg / (double)n), mgx = (float)((double)sgx / (double)n);
  SIMD for (int64_t i = 0; i < n; ++i) {
    const float xh = (x[i] - mean) * rstd;
    dx[i] = rstd * ((dx[i] - mg) - xh * mgx);
  }
  if (dw) {
    SIMD for (int64_t i = 0; i < n; ++i) dw[i] += dy[i] * (x[i] - mean) * rstd;
  }
  if (db) {
    SIMD for (int64_t i = 0; i < n; ++i) db[i] += dy[i];
  }
}
PYLLM_MULTIVERSION void rms_norm_backward(const float* dy, const float* x, const float* nr,
                                          const float* w, float offset, float rstd, float* dx,
                                          float* dw, int64_t n) {
  float acc = 0.f;
  SIMD_SUM for (int64_t i = 0; i < n; ++i) {
    const float g = w ? dy[i] * (w[i] + offset) : dy[i];
    acc += g * x[i] * rstd;
  }
  const float m = acc / (float)n;
  SIMD for (int64_t i = 0; i < n; ++i) {
    const float g = w ? dy[i] * (w[i] + offset) : dy[i];
    dx[i] = rstd * (g - x[i] * rstd * m);
  }
  if (dw) {
    SIMD for (int64_t i = 0; i < n; ++i) dw[i] += dy[i] * nr[i];
  }
}
PYLLM_MULTIVERSION void bias_gelu(const float* x, const float* b, float* y, int64_t n, bool tanh_approx) {
  if (b != nullptr) {
    if (tanh_approx) { SIMD for (int64_t i = 0; i < n; ++i) y[i] = gelu_tanh(x[i] + b[i]); }
    else { SIMD for (int64_t i = 0; i < n; ++i) y[i] = gelu_erf(x[i] + b[i]); }
  } else {
    if (tanh_approx) { SIMD for (int64_t i = 0; i < n; ++i) y[i] = gelu_tanh(x[i]); }
    else { SIMD for (int64_t i = 0; i < n; ++i) y[i] = gelu_erf(x[i]); }
  }
}
PYLLM_MULTIVERSION void bias_gelu_backward(const float* dy, const float* x, const float* b, float* dx, int64_t n,
                                           bool tanh_approx) {
  if (b != nullptr) {
    if (tanh_approx) { SIMD for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * gelu_tanh_grad(x[i] + b[i]); }
    else { SIMD for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * gelu_erf_grad(x[i] + b[i]); }
  } else {
    if (tanh_approx) { SIMD for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * gelu_tanh_grad(x[i]); }
    else { SIMD for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * gelu_erf_grad(x[i]); }
  }
}
PYLLM_MULTIVERSION void softmax_backward(const float* dy, const float* y, float* dx, int64_t n,
                                         float s) {
  // A probability of exactly zero (a hidden key, a fully masked row) contributes nothing: its dy
  // is not read, even a NaN, and its dx is 0 (pyllm's non-finite rule). The masked dot is taken
  // only when a zero meets a non-finite dy, so the common path stays one vectorized dot.
  float d = dot(dy, y, n);  // blocked, fp64 across blocks
  if (d != d) {
    double acc = 0.0;
    for (int64_t i = 0; i < n; ++i)
      if (y[i] != 0.f) acc += (double)dy[i] * y[i];
    d = (float)acc;
  }
  SIMD for (int64_t i = 0; i < n; ++i) dx[i] = y[i] != 0.f ? s * y[i] * (dy[i] - d) : 0.f;
}

}  // namespace pyllm::cpu::row

// fp16 / bf16 conversions must be bit-exact (round to nearest even, NaN, Inf,
// subnormals). References are computed independently with double arithmetic.
#include "emu_test.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

static float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
static uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// Value of a binary16 pattern, from the definition.
static double ref_half_value(uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  double v;
  if (e == 0)
    v = std::ldexp((double)m, -24);
  else if (e == 31)
    v = m ? NAN : INFINITY;
  else
    v = std::ldexp(1024.0 + m, e - 25);
  return s ? -v : v;
}

// Round a finite double to a binary format with `p` significand bits (incl. the
// implicit one), minimum normal exponent `emin` and largest finite `maxv`, to
// nearest even. Returns the rounded value (possibly +-inf).
static double ref_round(double x, int p, int emin, double maxv) {
  if (x == 0 || std::isnan(x)) return x;
  const double ax = std::fabs(x);
  int e;
  std::frexp(ax, &e);  // ax = f * 2^e, f in [0.5, 1)
  int exp = e - 1;     // ax in [2^exp, 2^(exp+1))
  if (exp < emin) exp = emin;
  const double ulp = std::ldexp(1.0, exp - (p - 1));
  const double q = ax / ulp;  // exact (power-of-two scaling)
  double fl = std::floor(q);
  const double rem = q - fl;
  if (rem > 0.5 || (rem == 0.5 && std::fmod(fl, 2.0) != 0)) fl += 1;
  double r = fl * ulp;
  // Overflow: beyond max + half ulp(max) goes to inf (ties to even go to inf too).
  const double ulp_max = std::ldexp(1.0, (int)std::floor(std::log2(maxv)) - (p - 1));
  if (ax >= maxv + ulp_max / 2) r = INFINITY;
  return x < 0 ? -r : r;
}
static double ref_to_half(float f) { return ref_round(f, 11, -14, 65504.0); }
static double ref_to_bf16(float f) { return ref_round(f, 8, -126, (double)bits_to_float(0x7f7f0000u)); }

static bool same_value(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return a == b && std::signbit(a) == std::signbit(b);
}

EMU_TEST(half_all_65536_patterns) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const __half h = __ushort_as_half((unsigned short)b);
    const float f = __half2float(h);
    const double ref = ref_half_value((uint16_t)b);
    EMU_CHECK_MSG(same_value(f, ref), "pattern " + std::to_string(b));
    // round trip: every non-NaN pattern is exact; NaN stays NaN.
    const __half back = __float2half_rn(f);
    if (std::isnan(ref))
      EMU_CHECK(std::isnan(__half2float(back)));
    else
      EMU_CHECK_MSG(__half_as_ushort(back) == b, "round trip " + std::to_string(b));
    EMU_CHECK((float)h == f || std::isnan(f));  // operator float
  }
}

EMU_TEST(half_rounding_midpoints_and_neighbours) {
  // For each pair of adjacent positive finite halves, test the exact midpoint and
  // the floats right next to it, plus overflow and underflow ranges.
  for (uint32_t b = 0; b < 0x7c00; ++b) {
    const double lo = ref_half_value((uint16_t)b);
    const double hi = b + 1 < 0x7c00 ? ref_half_value((uint16_t)(b + 1)) : 65536.0;
    const float mid = (float)((lo + hi) / 2);  // exact in float
    for (float f : {mid, std::nextafter(mid, 0.f), std::nextafter(mid, INFINITY), (float)lo}) {
      for (float s : {f, -f}) {
        const double got = __half2float(__float2half(s));
        EMU_CHECK_MSG(same_value(got, ref_to_half(s)), "float " + std::to_string(float_to_bits(s)));
      }
    }
  }
  uint64_t x = 88172645463325252ull;
  for (int i = 0; i < 300000; ++i) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    const float f = bits_to_float((uint32_t)x);
    const double got = __half2float(__float2half_rn(f));
    EMU_CHECK_MSG(same_value(got, ref_to_half(f)), "random float bits " + std::to_string((uint32_t)x));
  }
  EMU_CHECK(__half_as_ushort(__float2half(INFINITY)) == 0x7c00);
  EMU_CHECK(__half_as_ushort(__float2half(-INFINITY)) == 0xfc00);
  EMU_CHECK(__half_as_ushort(__float2half(65519.996f)) == 0x7bff);
  EMU_CHECK(__half_as_ushort(__float2half(65520.f)) == 0x7c00);
  EMU_CHECK(__half_as_ushort(__float2half(std::ldexp(1.f, -25))) == 0);  // tie -> even (0)
  EMU_CHECK(__half_as_ushort(__float2half(std::nextafter(std::ldexp(1.f, -25), 1.f))) == 1);
  EMU_CHECK(__half_as_ushort(__float2half(-0.f)) == 0x8000);
  EMU_CHECK(std::isnan(__half2float(__float2half(NAN))));
}

EMU_TEST(bf16_all_65536_patterns) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const __nv_bfloat16 h = __ushort_as_bfloat16((unsigned short)b);
    const float f = __bfloat162float(h);
    EMU_CHECK(float_to_bits(f) == b << 16);
    const __nv_bfloat16 back = __float2bfloat16_rn(f);
    if (std::isnan(f))
      EMU_CHECK(std::isnan(__bfloat162float(back)));
    else
      EMU_CHECK_MSG(__bfloat16_as_ushort(back) == b, "round trip " + std::to_string(b));
  }
}

EMU_TEST(bf16_rounding) {
  for (uint32_t b = 0; b < 0x7f80; ++b) {
    const float lo = bits_to_float(b << 16), hi = bits_to_float((b + 1) << 16);
    const float mid = (float)(((double)lo + (double)hi) / 2);
    for (float f : {mid, std::nextafter(mid, 0.f), std::nextafter(mid, INFINITY)})
      for (float s : {f, -f}) {
        const double got = __bfloat162float(__float2bfloat16(s));
        EMU_CHECK_MSG(same_value(got, ref_to_bf16(s)), "float bits " + std::to_string(float_to_bits(s)));
      }
  }
  uint64_t x = 0x9e3779b97f4a7c15ull;
  for (int i = 0; i < 300000; ++i) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    const float f = bits_to_float((uint32_t)(x >> 11));
    const double got = __bfloat162float(__float2bfloat16_rn(f));
    EMU_CHECK(same_value(got, ref_to_bf16(f)));
  }
  EMU_CHECK(__bfloat16_as_ushort(__float2bfloat16(INFINITY)) == 0x7f80);
  EMU_CHECK(std::isnan(__bfloat162float(__float2bfloat16(NAN))));
}

EMU_TEST(half2_helpers_and_arithmetic) {
  const __half2 h = __floats2half2_rn(1.5f, -2.25f);
  EMU_CHECK(__low2float(h) == 1.5f && __high2float(h) == -2.25f);
  const float2 f = __half22float2(h);
  EMU_CHECK(f.x == 1.5f && f.y == -2.25f);
  const __nv_bfloat162 b = __floats2bfloat162_rn(3.0f, 0.5f);
  EMU_CHECK(__low2float(b) == 3.0f && __high2float(b) == 0.5f);
  EMU_CHECK(__half2float(__hadd(__float2half(1.f), __float2half(2.f))) == 3.f);
  EMU_CHECK(__half2float(__float2half(1.f) * __float2half(3.f)) == 3.f);
  // 2049 is not representable in fp16: 2048 + 1 rounds to even (2048).
  EMU_CHECK(__half2float(__float2half(2048.f) + __float2half(1.f)) == 2048.f);
  EMU_CHECK(__bfloat162float(__float2bfloat16(256.f) + __float2bfloat16(1.f)) == 256.f);
  EMU_CHECK(std::is_trivially_copyable<__half>::value && sizeof(__half) == 2 && alignof(__half) == 2);
}

// Conversions inside a kernel behave the same.
__global__ void convert_kernel(const float* in, __half* h, __nv_bfloat16* b, float* back) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  h[i] = __float2half_rn(in[i]);
  b[i] = __float2bfloat16_rn(in[i]);
  back[i] = __half2float(h[i]) + __bfloat162float(b[i]);
}

EMU_TEST(conversions_in_kernel) {
  const int n = 1024;
  std::vector<float> in(n), back(n);
  std::vector<__half> h(n);
  std::vector<__nv_bfloat16> b(n);
  for (int i = 0; i < n; ++i) in[i] = (i - 512) * 0.3371f;
  auto k = convert_kernel;
  PYLLM_LAUNCH(k, n / 128, 128, 0, nullptr, in.data(), h.data(), b.data(), back.data());
  for (int i = 0; i < n; ++i) {
    EMU_CHECK(same_value(__half2float(h[i]), ref_to_half(in[i])));
    EMU_CHECK(same_value(__bfloat162float(b[i]), ref_to_bf16(in[i])));
    EMU_CHECK(back[i] == (float)(ref_to_half(in[i])) + (float)ref_to_bf16(in[i]));
  }
}

int main(int argc, char** argv) { return emu_test::run_all(argc, argv); }

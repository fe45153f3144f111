// GELU and its derivative in fp32, exact (erf) or tanh-approximated, as torch's
// F.gelu(approximate="none" | "tanh"). One definition for the CPU, CUDA and emulated kernels.
#pragma once
#include <cmath>

#include "broadcast.h"  // PYLLM_HOST_DEVICE

namespace pyllm {

constexpr float kSqrtHalf = 0.70710678118654752440f;      // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;    // 1/sqrt(2*pi)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;   // sqrt(2/pi)
constexpr float kGeluTanhC = 0.044715f;

PYLLM_HOST_DEVICE inline float gelu(float z, bool tanh_approx) {
  if (tanh_approx) {
    const float t = tanhf(kSqrt2OverPi * (z + kGeluTanhC * z * z * z));
    return 0.5f * z * (1.0f + t);
  }
  return 0.5f * z * (1.0f + erff(z * kSqrtHalf));
}

// d gelu(z) / dz
PYLLM_HOST_DEVICE inline float gelu_grad(float z, bool tanh_approx) {
  if (tanh_approx) {
    const float t = tanhf(kSqrt2OverPi * (z + kGeluTanhC * z * z * z));
    return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhC * z * z);
  }
  return 0.5f * (1.0f + erff(z * kSqrtHalf)) + z * kInvSqrt2Pi * expf(-0.5f * z * z);
}

}  // namespace pyllm

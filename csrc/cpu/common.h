// Helpers shared by the CPU kernels: fp32 row staging and row-parallel loops.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <vector>

#include "../include/pyllm/checks.h"
#include "rowops.h"

namespace pyllm::cpu {

// Returns a pointer to `n` fp32 values of `src`, converting into `buf` when needed.
template <typename T>
inline const float* load_row(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    row::half_to_float(reinterpret_cast<const uint16_t*>(src), buf, n);
  } else {
    row::bf16_to_float(reinterpret_cast<const uint16_t*>(src), buf, n);
  }
  return buf;
}

template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (src != dst) std::memcpy(dst, src, n * sizeof(float));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    row::float_to_half(src, reinterpret_cast<uint16_t*>(dst), n);
  } else {
    row::float_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
  }
}

// Rounds fp32 values in place as if stored in dtype `t` and loaded back.
inline void round_through(at::ScalarType t, float* x, int64_t n) {
  if (t == at::kHalf) row::round_through_half(x, n);
  else if (t == at::kBFloat16) row::round_through_bf16(x, n);
}

// Grain so that each task gets at least ~32K elements of work.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

}  // namespace pyllm::cpu

// Shared by the CUDA kernel files (also compiled for the emulation): host launch glue, RowTeam (the
// threads of one row) and the helpers that hold a row in registers (16-byte loads and stores).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#include "../include/pyllm/checks.h"
#include "../include/pyllm/cuda_compat.cuh"
#include "../include/pyllm/broadcast.h"  // PYLLM_HOST_DEVICE (after cuda_compat: __host__ under emulation)

#if defined(PYLLM_EMULATED)
#define PYLLM_STREAM() ((cudaStream_t)0)
#define PYLLM_DEVICE_GUARD(t) (void)0
#define PYLLM_KERNEL_DEVICE at::kCPU
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define PYLLM_STREAM() (c10::cuda::getCurrentCUDAStream().stream())
#define PYLLM_DEVICE_GUARD(t) const c10::cuda::CUDAGuard pyllm_device_guard_((t).device())
#define PYLLM_KERNEL_DEVICE at::kCUDA
#endif

// Each .cu file binds its entry points at its end with
//   PYLLM_CUDA_LIBRARY_IMPL(m) { m.impl("op", &pyllm::PYLLM_CUDA_NS::op); }
// which registers them for the CUDA key of `torch.ops.pyllm` under nvcc, and for the CPU key
// of `torch.ops.pyllm_emu` under the emulation. The schemas are defined in pyllm/ops/.
#include <torch/library.h>
#if defined(PYLLM_EMULATED)
#define PYLLM_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(pyllm_emu, CPU, m)
#else
#define PYLLM_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(pyllm, CUDA, m)
#endif

namespace pyllm {

// at:: storage types -> CUDA storage types (same bits).
template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

template <typename T>
inline typename CudaType<T>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename CudaType<T>::type*>(t.data_ptr());
}

inline void check_kernel_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().type() == PYLLM_KERNEL_DEVICE, "pyllm: ", name, " must be a ",
              PYLLM_KERNEL_DEVICE, " tensor for this backend, got ", t.device());
}

// Optional fp32 parameter copy (weights/biases are small; kernels read fp32).
inline const float* opt_float(const std::optional<at::Tensor>& t, at::Tensor& holder) {
  if (!t.has_value() || !t->defined()) return nullptr;
  holder = t->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

// Launch shape for row-wise kernels: one warp per row for rows of up to 1024
// elements (4 rows per 128-thread block), one block per row beyond that.
struct RowLaunch {
  bool warp_per_row;
  unsigned grid;
  unsigned block;
};
inline RowLaunch row_launch(int64_t rows, int64_t n) {
  if (n <= 1024) {
    constexpr int kRowsPerBlock = 4;
    return {true, (unsigned)((rows + kRowsPerBlock - 1) / kRowsPerBlock), 32u * kRowsPerBlock};
  }
  // about 8 elements per thread, rounded up: every row of up to 8192 fits a block's registers (norm.cu)
  int64_t threads = std::min<int64_t>(1024, ((n + 7) / 8 + 31) / 32 * 32);
  threads = std::max<int64_t>(threads, 128);
  return {false, (unsigned)rows, (unsigned)threads};
}

// The threads that cooperate on one row: a warp or a whole block.
template <bool kWarp>
struct RowTeam {
  int64_t row;
  int tid;
  int size;
  float* scratch;  // 32 floats of shared memory (block mode)
  __device__ RowTeam(float* s) : scratch(s) {
    if (kWarp) {
      row = (int64_t)blockIdx.x * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
      tid = threadIdx.x % kWarpSize;
      size = kWarpSize;
    } else {
      row = blockIdx.x;
      tid = threadIdx.x;
      size = blockDim.x;
    }
  }
  __device__ float sum(float v) const { return kWarp ? warp_sum(v) : block_sum(v, scratch); }
  __device__ float max(float v) const { return kWarp ? warp_max(v) : block_max(v, scratch); }
};

// ---- a row held in registers: one read of each input, one write of each output ----
// A row in memory is a head (the elements before its first 16-byte boundary, fewer than
// kVecOf<T>), whole 16-byte chunks, and a tail (fewer than kVecOf<T>): RowRegs below. Thread tid of
// a team of `size` (RowTeam) owns the chunks tid, tid + size, ... (coalesced 16-byte loads and
// stores) and at most one head and one tail element (scalar). At most kRegElems<kWarp> chunk
// elements per thread: 32 for a warp (rows up to 1024), 8 for a block (rows up to 8 x 1024
// threads = 8192, plus a head and a tail). Any width and any element offset of the row take this
// path as long as every tensor of the row has the same 16-byte phase (the usual case: contiguous
// tensors of one dtype); longer rows, or tensors whose phases differ, take the kernels' element
// loops, which re-read the row from L1/L2.
struct alignas(16) Vec16 {
  uint32_t w[4];
};
template <typename T>
constexpr int kVecOf = 16 / (int)sizeof(T);
template <bool kWarp>
constexpr int kRegElems = kWarp ? 32 : 8;


// True if a row of n elements fits the team's registers whatever its 16-byte phase (the most
// whole chunks a row of n holds is n / kVecOf<T>, when it starts on a boundary).
template <typename T, bool kWarp>
PYLLM_HOST_DEVICE inline bool row_fits_regs(int64_t n, int size) {
  return n / kVecOf<T> <= (int64_t)size * (kRegElems<kWarp> / kVecOf<T>);
}


template <typename T>
__device__ __forceinline__ void load_chunk(const T* p, float (&out)[kVecOf<T>]) {
  const Vec16 v = *reinterpret_cast<const Vec16*>(p);
  T e[kVecOf<T>];
  memcpy(e, &v, 16);
#pragma unroll
  for (int i = 0; i < kVecOf<T>; ++i) out[i] = load_float(e[i]);
}

// Loads kCount values of S with 16-byte loads (kCount * sizeof(S) is a multiple of 16): a chunk of
// another tensor's layout (e.g. kVecOf<bf16> = 8 fp32 gradients beside 8 bf16 inputs).
template <typename S, int kCount>
__device__ __forceinline__ void load_vals(const S* p, float* out) {
  static_assert((kCount * sizeof(S)) % 16 == 0, "whole 16-byte loads");
#pragma unroll
  for (int s = 0; s < kCount / kVecOf<S>; ++s) {
    float e[kVecOf<S>];
    load_chunk(p + s * kVecOf<S>, e);
#pragma unroll
    for (int i = 0; i < kVecOf<S>; ++i) out[s * kVecOf<S> + i] = e[i];
  }
}

// Stores kCount values as T with 16-byte stores (kCount * sizeof(T) is a multiple of 16).
template <typename T, int kCount>
__device__ __forceinline__ void store_chunk(T* p, const float* in) {
  static_assert((kCount * sizeof(T)) % 16 == 0, "whole 16-byte stores");
#pragma unroll
  for (int s = 0; s < kCount / kVecOf<T>; ++s) {
    T e[kVecOf<T>];
#pragma unroll
    for (int i = 0; i < kVecOf<T>; ++i) e[i] = store_float<T>(in[s * kVecOf<T> + i]);
    Vec16 v;
    memcpy(&v, e, 16);
    reinterpret_cast<Vec16*>(p)[s] = v;
  }
}

// This thread's part of a row held in registers: slots (k, i) of a float [kChunks + 1][kV]
// array. Slot k < kChunks is element i of the thread's chunk k (the row's elements head + (tid +
// k * size) * kV + i); slot (kChunks, 0) is head element tid, slot (kChunks, 1) tail element tid.
template <typename T, int kChunks>
struct RowRegs {
  static constexpr int kV = kVecOf<T>;
  // 32-bit offsets within the row (a row that fits registers has at most 8192 + 7 elements;
  // longer rows never index through these).
  int n, head, body_end, tid, size;
  bool fits_;
  __device__ __forceinline__ RowRegs(const T* row, int64_t n64, int tid_, int size_) : tid(tid_), size(size_) {
    const int64_t h = (int64_t)(((16 - (uintptr_t)row % 16) % 16) / sizeof(T));
    const int64_t hd = h < n64 ? h : n64;
    const int64_t chunks = (n64 - hd) / kV;
    fits_ = chunks <= (int64_t)size * kChunks;
    n = fits_ ? (int)n64 : 0;
    head = fits_ ? (int)hd : 0;
    body_end = fits_ ? (int)(hd + chunks * kV) : 0;
  }
  // True if the row's chunks fit the thread's kChunks (row_fits_regs holds it for any phase).
  __device__ __forceinline__ bool fits() const { return fits_; }
  // True if p (another tensor's row: same element offsets, element type S) is in the same 16-byte
  // phase, so its chunks are 16-byte aligned too (null: no such tensor).
  template <typename S>
  __device__ __forceinline__ bool same_phase(const S* p) const {
    return p == nullptr || ((uintptr_t)p % sizeof(S) == 0 && ((uintptr_t)p + head * sizeof(S)) % 16 == 0);
  }
  // First element of chunk k of this thread; -1 past the row's chunks.
  __device__ __forceinline__ int chunk(int k) const {
    const int j0 = head + (tid + k * size) * kV;
    return j0 < body_end ? j0 : -1;
  }
  // The row element of slot (k, i); -1 if the slot holds none.
  __device__ __forceinline__ int index(int k, int i) const {
    if (k < kChunks) {
      const int j0 = chunk(k);
      return j0 < 0 ? -1 : j0 + i;
    }
    if (i == 0) return tid < head ? tid : -1;
    if (i == 1) return body_end + tid < n ? body_end + tid : -1;
    return -1;
  }
  // f(k, i, j) for every slot of the thread that holds row element j.
  template <typename F>
  __device__ __forceinline__ void each(const F& f) const {
#pragma unroll
    for (int k = 0; k <= kChunks; ++k)
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        if (k == kChunks && i >= 2) continue;
        const int j = index(k, i);
        if (j >= 0) f(k, i, j);
      }
  }
  // Loads this thread's elements of row (an S row in the same phase) into c; empty slots get 0.
  template <typename S>
  __device__ __forceinline__ void load(float (&c)[kChunks + 1][kV], const S* row) const {
    static_assert((kV * sizeof(S)) % 16 == 0, "whole 16-byte loads");
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int j0 = chunk(k);
      if (j0 >= 0) {
        load_vals<S, kV>(row + j0, c[k]);
      } else {
#pragma unroll
        for (int i = 0; i < kV; ++i) c[k][i] = 0.f;
      }
    }
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int j = i < 2 ? index(kChunks, i) : -1;
      c[kChunks][i] = j >= 0 ? load_float(row[j]) : 0.f;
    }
  }
  // Writes value(k, i, j) to element j of row (a TO row in the same phase) for every held element.
  template <typename TO, typename F>
  __device__ __forceinline__ void store(TO* row, const F& value) const {
    static_assert((kV * sizeof(TO)) % 16 == 0, "whole 16-byte stores");
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int j0 = chunk(k);
      if (j0 < 0) continue;
      float o[kV];
#pragma unroll
      for (int i = 0; i < kV; ++i) o[i] = value(k, i, j0 + i);
      store_chunk<TO, kV>(row + j0, o);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int j = index(kChunks, i);
      if (j >= 0) row[j] = store_float<TO>(value(kChunks, i, j));
    }
  }
};

}  // namespace pyllm

// Host-side glue shared by the CUDA kernel files (also compiled for the emulation).
#pragma once
#include <ATen/ATen.h>

#include "../include/pyllm/checks.h"
#include "../include/pyllm/cuda_compat.cuh"

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
  int64_t threads = std::min<int64_t>(1024, ((n / 8) + 31) / 32 * 32);
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

}  // namespace pyllm

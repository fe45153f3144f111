// The one header every CUDA kernel source includes first.
//
// It hides the difference between a real nvcc build and the CPU emulation of CUDA
// (csrc/emulation, enabled with PYLLM_EMULATED). Kernel sources must follow the
// conventions in docs/EMULATION.md: launch only through PYLLM_LAUNCH, take dynamic
// shared memory only through pyllm_dynamic_smem<T>(), use only *_sync warp
// intrinsics with explicit masks, let every thread reach every __syncthreads, and
// convert fp16/bf16 explicitly (pyllm::load_float / pyllm::store_float below).
#pragma once

#include <cstdint>

#if defined(PYLLM_EMULATED)
#include "emu.h"
// Emulated kernels live in their own namespace so their symbols never collide with
// the nvcc-built ones if both libraries are loaded into one process.
#define PYLLM_CUDA_NS emu
#define PYLLM_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)                  \
  ::pyllm_emu::launch(__FILE__, __LINE__, #kernel, kernel, dim3(grid), dim3(block), \
                      (size_t)(smem_bytes), ##__VA_ARGS__)
template <typename T>
__device__ inline T* pyllm_dynamic_smem() {
  return reinterpret_cast<T*>(::pyllm_emu::dynamic_smem());
}
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <c10/cuda/CUDAException.h>
#define PYLLM_CUDA_NS cuda
#define PYLLM_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)      \
  do {                                                                  \
    kernel<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__);   \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                     \
  } while (0)
template <typename T>
__device__ __forceinline__ T* pyllm_dynamic_smem() {
  extern __shared__ __align__(16) unsigned char pyllm_dynamic_smem_bytes[];
  return reinterpret_cast<T*>(pyllm_dynamic_smem_bytes);
}
#endif

namespace pyllm {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

// Explicit conversions between storage types and the fp32 compute type.
__device__ __forceinline__ float load_float(float v) { return v; }
__device__ __forceinline__ float load_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float load_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float load_float(bool v) { return v ? 1.f : 0.f; }

template <typename T> __device__ __forceinline__ T store_float(float v);
template <> __device__ __forceinline__ float store_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Butterfly reductions within a warp (all 32 lanes must participate).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block-wide reductions. `scratch` must hold 32 floats of shared memory. Every thread
// of the block must call these (they contain barriers); all threads get the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = (lane < nwarps) ? scratch[lane] : 0.f;
  return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = (lane < nwarps) ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

}  // namespace pyllm

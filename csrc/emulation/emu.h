// pyllm CUDA emulation: lets CUDA kernel sources (.cu) compile with a plain C++
// compiler and run on the CPU, with every CUDA thread emulated by a fiber.
//
// Include this header (or the stand-ins cuda_runtime.h / cuda_fp16.h / cuda_bf16.h,
// which just include it) instead of the real CUDA headers. It must not depend on
// libtorch. See docs/EMULATION.md for how it works and the source conventions a
// kernel must follow.
//
// Public API (namespace pyllm_emu):
//   launch(file, line, name, kernel, grid, block, smem_bytes, args...)  run a grid
//   dynamic_smem()            current block's dynamic shared memory (0xFF-filled)
//   set_order(const char*)    "forward" | "reverse" | "random[:seed]"; nullptr = env
//   set_num_threads(int)      OS threads running blocks per launch; 0 = env
//   set_stack_kb(int)         fiber stack size in KiB; 0 = env
//   mma_m16n8k16 / ldmatrix / cp_async*: the tensor-core and async-copy instructions, emulated
//     as the PTX ISA defines them (kernels reach them through pyllm/tensor_core.cuh)
// Everything in pyllm_emu::detail is internal.
#pragma once

#ifndef PYLLM_EMULATED
#define PYLLM_EMULATED 1
#endif

// Standard headers first: libstdc++ uses __attribute__((__noinline__)) in
// <memory>, which would break once __noinline__ is a macro (defined below).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <math.h>

// Kernels use `#pragma unroll`, which g++ does not know.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#elif defined(__clang__)
#pragma clang diagnostic ignored "-Wunknown-pragmas"
#endif

// ---------------------------------------------------------------------------
// CUDA keywords
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ __inline__
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
#endif
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
// __shared__ storage is private to the running block: all fibers of a block run on
// one OS thread and each OS thread runs one block at a time.
#define __shared__ static thread_local
// __restrict__ is understood by g++/clang as is.

// ---------------------------------------------------------------------------
// Vector types
// ---------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define PYLLM_EMU_VEC2(T, N, A)              \
  struct __attribute__((aligned(A))) N##2 { \
    T x, y;                                 \
  };                                        \
  inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define PYLLM_EMU_VEC3(T, N)                                                          \
  struct N##3 {                                                                       \
    T x, y, z;                                                                        \
  };                                                                                  \
  inline N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }
#define PYLLM_EMU_VEC4(T, N, A)                                                      \
  struct __attribute__((aligned(A))) N##4 {                                         \
    T x, y, z, w;                                                                   \
  };                                                                                \
  inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }

PYLLM_EMU_VEC2(signed char, char, 2)
PYLLM_EMU_VEC4(signed char, char, 4)
PYLLM_EMU_VEC2(unsigned char, uchar, 2)
PYLLM_EMU_VEC4(unsigned char, uchar, 4)
PYLLM_EMU_VEC2(short, short, 4)
PYLLM_EMU_VEC4(short, short, 8)
PYLLM_EMU_VEC2(unsigned short, ushort, 4)
PYLLM_EMU_VEC4(unsigned short, ushort, 8)
PYLLM_EMU_VEC2(int, int, 8)
PYLLM_EMU_VEC3(int, int)
PYLLM_EMU_VEC4(int, int, 16)
PYLLM_EMU_VEC2(unsigned int, uint, 8)
PYLLM_EMU_VEC4(unsigned int, uint, 16)
PYLLM_EMU_VEC2(long long, longlong, 16)
PYLLM_EMU_VEC2(unsigned long long, ulonglong, 16)
PYLLM_EMU_VEC2(float, float, 8)
PYLLM_EMU_VEC3(float, float)
PYLLM_EMU_VEC4(float, float, 16)
PYLLM_EMU_VEC2(double, double, 16)
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }
#undef PYLLM_EMU_VEC2
#undef PYLLM_EMU_VEC3
#undef PYLLM_EMU_VEC4

constexpr int warpSize = 32;

// ---------------------------------------------------------------------------
// Runtime API subset
// ---------------------------------------------------------------------------
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    default: return "cudaErrorLaunchFailure";
  }
}
// "Device" memory is host memory in emulation.
inline cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::malloc(n ? n : 1);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
template <typename T>
inline cudaError_t cudaMalloc(T** p, size_t n) {
  return cudaMalloc(reinterpret_cast<void**>(p), n);
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  if (n) std::memmove(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind k, cudaStream_t = nullptr) {
  return cudaMemcpy(d, s, n, k);
}
inline cudaError_t cudaMemset(void* d, int v, size_t n) {
  if (n) std::memset(d, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t = nullptr) { return cudaMemset(d, v, n); }

// Per-kernel attributes. As on the GPU, a launch with more than 48 KiB of dynamic shared
// memory fails unless cudaFuncAttributeMaxDynamicSharedMemorySize was raised for that kernel.
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
namespace pyllm_emu {
cudaError_t func_set_attribute(const void* kernel, int attr, int value);
}
template <typename... A>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(A...), cudaFuncAttribute attr, int value) {
  return ::pyllm_emu::func_set_attribute(reinterpret_cast<const void*>(kernel), (int)attr, value);
}

// ---------------------------------------------------------------------------
// Emulator runtime interface
// ---------------------------------------------------------------------------
namespace pyllm_emu {

void* dynamic_smem();
void set_order(const char* order);  // nullptr: use PYLLM_EMU_ORDER again
void set_num_threads(int n);        // <= 0: use PYLLM_EMU_THREADS again
void set_stack_kb(int kb);          // <= 0: use PYLLM_EMU_STACK_KB again

namespace detail {

struct ThreadState {
  uint3 tid;
  unsigned lane, warp, linear;
};
struct BlockState {
  uint3 bid;
  dim3 bdim;
  dim3 gdim;
  void* smem;
  size_t smem_bytes;
};

inline thread_local ThreadState* t_thread = nullptr;
inline thread_local const BlockState* t_block = nullptr;

[[noreturn]] void not_in_kernel(const char* what);

inline const ThreadState& cur_thread(const char* what) {
  const ThreadState* p = t_thread;
  if (__builtin_expect(p == nullptr, 0)) not_in_kernel(what);
  return *p;
}
inline const BlockState& cur_block(const char* what) {
  const BlockState* p = t_block;
  if (__builtin_expect(p == nullptr, 0)) not_in_kernel(what);
  return *p;
}

enum class Op : int {
  Barrier,
  BarrierCount,
  BarrierAnd,
  BarrierOr,
  ShflIdx,
  ShflUp,
  ShflDown,
  ShflXor,
  Ballot,
  Any,
  All,
  SyncWarp,
  ActiveMask,
  Mma,       // mma.sync.aligned (warp-collective, all 32 lanes, same instruction)
  Ldmatrix,  // ldmatrix.sync.aligned
};

// Suspends the calling CUDA thread at a barrier / warp intrinsic until the
// rendezvous completes; returns the op's result (raw bits for shuffles).
std::uint64_t sync_point(Op op, unsigned mask, std::uint64_t value, int size, long long param, int width,
                         const char* file, int line, int col);

struct LaunchDesc {
  const char* file;
  int line;
  const char* name;
  dim3 grid;
  dim3 block;
  size_t smem_bytes;
  void (*invoke)(const void* payload);
  const void* payload;
  const void* kernel_addr;  // to name the kernel in messages (dladdr)
};
void run_grid(const LaunchDesc& d);

template <typename T>
inline std::uint64_t to_bits(const T& v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "warp shuffle: type must be trivially copyable and at most 8 bytes");
  std::uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(std::uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace detail

// Runs the whole grid on the CPU and returns when it is done. Throws
// std::runtime_error on any detected error (kernel name, launch site, offending
// barrier/intrinsic site, block index and thread ranges in the message).
template <typename... KArgs, typename... Args>
void launch(const char* file, int line, const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block,
            size_t smem_bytes, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "pyllm_emu::launch: wrong number of kernel arguments");
  using Tuple = std::tuple<std::decay_t<KArgs>...>;
  struct Payload {
    void (*k)(KArgs...);
    Tuple args;
  };
  // Like CUDA, arguments are converted to the parameter types once, at launch.
  const Payload p{kernel, Tuple(std::forward<Args>(args)...)};
  detail::LaunchDesc d;
  d.file = file;
  d.line = line;
  d.name = name;
  d.grid = grid;
  d.block = block;
  d.smem_bytes = smem_bytes;
  d.invoke = [](const void* pp) {
    const Payload* q = static_cast<const Payload*>(pp);
    std::apply(q->k, q->args);  // each CUDA thread gets its own copies of the parameters
  };
  d.payload = &p;
  d.kernel_addr = reinterpret_cast<const void*>(kernel);
  detail::run_grid(d);
}

}  // namespace pyllm_emu

// ---------------------------------------------------------------------------
// Built-in variables (per CUDA thread = per fiber)
// ---------------------------------------------------------------------------
#define threadIdx (::pyllm_emu::detail::cur_thread("threadIdx").tid)
#define blockIdx (::pyllm_emu::detail::cur_block("blockIdx").bid)
#define blockDim (::pyllm_emu::detail::cur_block("blockDim").bdim)
#define gridDim (::pyllm_emu::detail::cur_block("gridDim").gdim)

// ---------------------------------------------------------------------------
// Barriers and warp intrinsics. The trailing defaulted arguments record the call
// site; never pass them explicitly.
// ---------------------------------------------------------------------------
#if defined(__has_builtin)
#if __has_builtin(__builtin_COLUMN)
#define PYLLM_EMU_COLUMN() __builtin_COLUMN()
#endif
#endif
#if !defined(PYLLM_EMU_COLUMN) && __cplusplus >= 202002L && defined(__has_include)
#if __has_include(<source_location>)
#include <source_location>
#define PYLLM_EMU_COLUMN() ((int)std::source_location::current().column())
#endif
#endif
#ifndef PYLLM_EMU_COLUMN
#define PYLLM_EMU_COLUMN() 0
#endif
#define PYLLM_EMU_SITE_PARAMS \
  const char *pyllm_file_ = __builtin_FILE(), int pyllm_line_ = __builtin_LINE(), int pyllm_col_ = PYLLM_EMU_COLUMN()
#define PYLLM_EMU_SITE pyllm_file_, pyllm_line_, pyllm_col_

inline void __syncthreads(PYLLM_EMU_SITE_PARAMS) {
  ::pyllm_emu::detail::sync_point(::pyllm_emu::detail::Op::Barrier, 0, 0, 0, 0, 0, PYLLM_EMU_SITE);
}
inline int __syncthreads_count(int pred, PYLLM_EMU_SITE_PARAMS) {
  return (int)::pyllm_emu::detail::sync_point(::pyllm_emu::detail::Op::BarrierCount, 0, pred != 0, 0, 0, 0,
                                              PYLLM_EMU_SITE);
}
inline int __syncthreads_and(int pred, PYLLM_EMU_SITE_PARAMS) {
  return (int)::pyllm_emu::detail::sync_point(::pyllm_emu::detail::Op::BarrierAnd, 0, pred != 0, 0, 0, 0,
                                              PYLLM_EMU_SITE);
}
inline int __syncthreads_or(int pred, PYLLM_EMU_SITE_PARAMS) {
  return (int)::pyllm_emu::detail::sync_point(::pyllm_emu::detail::Op::BarrierOr, 0, pred != 0, 0, 0, 0,
                                              PYLLM_EMU_SITE);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, PYLLM_EMU_SITE_PARAMS) {
  ::pyllm_emu::detail::sync_point(::pyllm_emu::detail::Op::SyncWarp, mask, 0, 0, 0, 32, PYLLM_EMU_SITE);
}
inline unsigned __activemask(PYLLM_EMU_SITE_PARAMS) {
  return (unsigned)::pyllm_emu::detail::sync_point(::pyllm_emu::detail::Op::ActiveMask, 0, 0, 0, 0, 32,
                                                   PYLLM_EMU_SITE);
}
inline unsigned __ballot_sync(unsigned mask, int pred, PYLLM_EMU_SITE_PARAMS) {
  return (unsigned)::pyllm_emu::detail::sync_point(::pyllm_emu::detail::Op::Ballot, mask, pred != 0, 0, 0, 32,
                                                   PYLLM_EMU_SITE);
}
inline int __any_sync(unsigned mask, int pred, PYLLM_EMU_SITE_PARAMS) {
  return (int)::pyllm_emu::detail::sync_point(::pyllm_emu::detail::Op::Any, mask, pred != 0, 0, 0, 32,
                                              PYLLM_EMU_SITE);
}
inline int __all_sync(unsigned mask, int pred, PYLLM_EMU_SITE_PARAMS) {
  return (int)::pyllm_emu::detail::sync_point(::pyllm_emu::detail::Op::All, mask, pred != 0, 0, 0, 32,
                                              PYLLM_EMU_SITE);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32, PYLLM_EMU_SITE_PARAMS) {
  return ::pyllm_emu::detail::from_bits<T>(::pyllm_emu::detail::sync_point(
      ::pyllm_emu::detail::Op::ShflIdx, mask, ::pyllm_emu::detail::to_bits(var), (int)sizeof(T), srcLane, width,
      PYLLM_EMU_SITE));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = 32, PYLLM_EMU_SITE_PARAMS) {
  return ::pyllm_emu::detail::from_bits<T>(::pyllm_emu::detail::sync_point(
      ::pyllm_emu::detail::Op::ShflUp, mask, ::pyllm_emu::detail::to_bits(var), (int)sizeof(T), delta, width,
      PYLLM_EMU_SITE));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = 32, PYLLM_EMU_SITE_PARAMS) {
  return ::pyllm_emu::detail::from_bits<T>(::pyllm_emu::detail::sync_point(
      ::pyllm_emu::detail::Op::ShflDown, mask, ::pyllm_emu::detail::to_bits(var), (int)sizeof(T), delta, width,
      PYLLM_EMU_SITE));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32, PYLLM_EMU_SITE_PARAMS) {
  return ::pyllm_emu::detail::from_bits<T>(::pyllm_emu::detail::sync_point(
      ::pyllm_emu::detail::Op::ShflXor, mask, ::pyllm_emu::detail::to_bits(var), (int)sizeof(T), laneMask, width,
      PYLLM_EMU_SITE));
}

// ---------------------------------------------------------------------------
// Tensor-core and asynchronous-copy instructions (PTX ISA 8.x, sm_80+), emulated.
// Kernels call them through csrc/include/pyllm/tensor_core.cuh (inline PTX under nvcc).
//  - mma_m16n8k16: mma.sync.aligned.m16n8k16.row.col.f32.{f16|bf16}.{f16|bf16}.f32. Warp-collective:
//    all 32 lanes must execute the same instruction (same call site); each lane passes its A (4 x
//    b32 = 8 halves), B (2 x b32) and C (4 x f32) fragments in the ISA's layout and gets its D
//    fragment. Products are exact and summed in fp64, rounded once to fp32 (the hardware's
//    accumulation order and intermediate rounding are unspecified; this is the exact sum).
//  - ldmatrix: ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16. Lanes 8i..8i+7 give the row
//    addresses of matrix i (16-byte aligned, in the block's dynamic shared memory); lane l receives
//    in register i the b16 pair (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i, or with .trans the
//    pair (rows 2(l%4), 2(l%4)+1, col l/4). Read at the instruction.
//  - cp_async: cp.async.{ca,cg}.shared.global [dst], [src], cp_size, src_size: queued in the
//    thread's open group; bytes past src_size are zero-filled. commit_group closes the open group;
//    wait_group(N) lands every committed group but the N most recent: the data reaches shared
//    memory only then, so a read before the wait sees the old contents. wait_all = commit + wait 0.
// ---------------------------------------------------------------------------
namespace pyllm_emu {
void mma_m16n8k16(float* d, const std::uint32_t* a, const std::uint32_t* b, const float* c, bool bf16,
                  const char* file, int line, int col);
void ldmatrix(std::uint32_t* r, int num, bool trans, const void* addr, const char* file, int line, int col);
void cp_async(void* dst, const void* src, int cp_size, int src_size, bool cg, const char* file, int line, int col);
void cp_async_commit(const char* file, int line, int col);
void cp_async_wait(int n, const char* file, int line, int col);
// Shared-memory bank conflicts of ldmatrix since the last reset: `phases` counts 8x8 matrices
// read (one 128-byte wavefront each when conflict-free), `extra` the additional wavefronts
// their bank conflicts cost (per matrix: the most distinct 4-byte words any one of the 32
// banks must deliver, minus 1). Process-wide, all kernels.
void ldmatrix_bank_stats(std::uint64_t* phases, std::uint64_t* extra, bool reset);
int cp_async_pending_groups();  // committed groups of the calling thread not yet waited for (tests)
}  // namespace pyllm_emu

// ---------------------------------------------------------------------------
// Memory fences, caches, misc
// ---------------------------------------------------------------------------
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline T __ldca(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline T __ldlu(const T* p) { return *p; }
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }
template <typename T>
inline void __stwb(T* p, T v) { *p = v; }
template <typename T>
inline void __stwt(T* p, T v) { *p = v; }
inline void __nanosleep(unsigned) {}
[[noreturn]] inline void __trap() { throw std::runtime_error("__trap() called in device code"); }
inline long long clock64() { return (long long)std::chrono::steady_clock::now().time_since_epoch().count(); }

// ---------------------------------------------------------------------------
// Math and bit intrinsics
// ---------------------------------------------------------------------------
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) {
  *s = sinf(x);
  *c = cosf(x);
}
inline float __powf(float x, float y) { return powf(x, y); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0

inline float __int_as_float(int v) { return ::pyllm_emu::detail::from_bits<float>((std::uint32_t)v); }
inline int __float_as_int(float v) { return (int)(std::uint32_t)::pyllm_emu::detail::to_bits(v); }
inline float __uint_as_float(unsigned v) { return ::pyllm_emu::detail::from_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return (unsigned)::pyllm_emu::detail::to_bits(v); }
inline double __longlong_as_double(long long v) { return ::pyllm_emu::detail::from_bits<double>((std::uint64_t)v); }
inline long long __double_as_longlong(double v) { return (long long)::pyllm_emu::detail::to_bits(v); }

inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline unsigned __float2uint_rz(float x) { return (unsigned)x; }
inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
inline long long __float2ll_rz(float x) { return (long long)x; }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline float __double2float_rn(double x) { return (float)x; }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return ((unsigned long long)__brev((unsigned)x) << 32) | __brev((unsigned)(x >> 32));
}
inline int __mul24(int a, int b) { return (int)(((long long)(a << 8 >> 8)) * (long long)(b << 8 >> 8)); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * (long long)b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long v = ((unsigned long long)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}

// max/min overloads as in CUDA's math headers (same-type, plus the mixed ones CUDA has).
#define PYLLM_EMU_MINMAX(A, B, R)                        \
  inline R max(A a, B b) { return (R)a > (R)b ? (R)a : (R)b; } \
  inline R min(A a, B b) { return (R)a < (R)b ? (R)a : (R)b; }
PYLLM_EMU_MINMAX(int, int, int)
PYLLM_EMU_MINMAX(unsigned int, unsigned int, unsigned int)
PYLLM_EMU_MINMAX(int, unsigned int, unsigned int)
PYLLM_EMU_MINMAX(unsigned int, int, unsigned int)
PYLLM_EMU_MINMAX(long, long, long)
PYLLM_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
PYLLM_EMU_MINMAX(long long, long long, long long)
PYLLM_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
PYLLM_EMU_MINMAX(long long, unsigned long long, unsigned long long)
PYLLM_EMU_MINMAX(unsigned long long, long long, unsigned long long)
#undef PYLLM_EMU_MINMAX
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax((double)a, b); }
inline double min(float a, double b) { return fmin((double)a, b); }
inline double max(double a, float b) { return fmax(a, (double)b); }
inline double min(double a, float b) { return fmin(a, (double)b); }

// ---------------------------------------------------------------------------
// Atomics (correct across the worker OS threads; sequentially consistent)
// ---------------------------------------------------------------------------
namespace pyllm_emu {
namespace detail {
template <typename T, typename F>
inline T atomic_update(T* addr, F f) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "atomic: unsupported size");
  using U = std::conditional_t<sizeof(T) == 2, std::uint16_t,
                               std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>>;
  U* p = reinterpret_cast<U*>(addr);
  U old_bits = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  for (;;) {
    T old_v;
    std::memcpy(&old_v, &old_bits, sizeof(T));
    const T new_v = f(old_v);
    U new_bits;
    std::memcpy(&new_bits, &new_v, sizeof(T));
    if (__atomic_compare_exchange_n(p, &old_bits, new_bits, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
      return old_v;
  }
}
}  // namespace detail
}  // namespace pyllm_emu

#define PYLLM_EMU_ATOMIC_INT(T)                                                                               \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }                      \
  inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }                      \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }                    \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }                      \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }                        \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }                      \
  inline T atomicMax(T* a, T v) {                                                                           \
    return ::pyllm_emu::detail::atomic_update(a, [v](T o) { return o > v ? o : v; });                       \
  }                                                                                                         \
  inline T atomicMin(T* a, T v) {                                                                           \
    return ::pyllm_emu::detail::atomic_update(a, [v](T o) { return o < v ? o : v; });                       \
  }                                                                                                         \
  inline T atomicCAS(T* a, T cmp, T v) {                                                                    \
    __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                    \
    return cmp;                                                                                             \
  }
PYLLM_EMU_ATOMIC_INT(int)
PYLLM_EMU_ATOMIC_INT(unsigned int)
PYLLM_EMU_ATOMIC_INT(long long)
PYLLM_EMU_ATOMIC_INT(unsigned long long)
#undef PYLLM_EMU_ATOMIC_INT
inline unsigned short atomicCAS(unsigned short* a, unsigned short cmp, unsigned short v) {
  __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
inline float atomicAdd(float* a, float v) {
  return ::pyllm_emu::detail::atomic_update(a, [v](float o) { return o + v; });
}
inline double atomicAdd(double* a, double v) {
  return ::pyllm_emu::detail::atomic_update(a, [v](double o) { return o + v; });
}
inline float atomicExch(float* a, float v) {
  return ::pyllm_emu::detail::atomic_update(a, [v](float) { return v; });
}
inline unsigned atomicInc(unsigned* a, unsigned limit) {
  return ::pyllm_emu::detail::atomic_update(a, [limit](unsigned o) { return o >= limit ? 0u : o + 1u; });
}
inline unsigned atomicDec(unsigned* a, unsigned limit) {
  return ::pyllm_emu::detail::atomic_update(
      a, [limit](unsigned o) { return (o == 0u || o > limit) ? limit : o - 1u; });
}

// ---------------------------------------------------------------------------
// fp16 / bf16
// ---------------------------------------------------------------------------
namespace pyllm_emu {
namespace detail {

// float -> IEEE binary16, round to nearest even; NaN -> 0x7fff (as CUDA).
inline std::uint16_t f32_to_f16_bits(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;                              // NaN
  if (a >= 0x477ff000u) return (std::uint16_t)(sign | 0x7c00u);      // >= 65520 (or inf) -> inf
  if (a >= 0x38800000u) {                                            // normal half (>= 2^-14)
    const std::uint32_t b = a - 0x38000000u;                         // rebias exponent 127 -> 15
    std::uint32_t h = b >> 13;
    const std::uint32_t rem = b & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;          // carry may bump the exponent
    return (std::uint16_t)(sign | h);
  }
  if (a <= 0x33000000u) return (std::uint16_t)sign;                  // <= 2^-25 -> +-0 (tie goes to even 0)
  // subnormal half: units of 2^-24
  const std::uint32_t e = a >> 23;                                   // 102..112
  const std::uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126u - e;                              // 14..24
  std::uint32_t h = m >> shift;
  const std::uint32_t rem = m & ((1u << shift) - 1u);
  const std::uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (h & 1u))) ++h;
  return (std::uint16_t)(sign | h);
}

inline float f16_bits_to_f32(std::uint16_t h) {
  const std::uint32_t sign = (std::uint32_t)(h & 0x8000u) << 16;
  const std::uint32_t e = (h >> 10) & 0x1fu;
  const std::uint32_t m = h & 0x3ffu;
  std::uint32_t x;
  if (e == 0x1fu) {
    x = sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u);  // inf / quiet NaN
  } else if (e == 0) {
    if (m == 0) {
      x = sign;
    } else {  // subnormal: normalise
      int sh = 0;
      std::uint32_t mm = m;
      while (!(mm & 0x400u)) {
        mm <<= 1;
        ++sh;
      }
      x = sign | ((std::uint32_t)(113 - sh) << 23) | ((mm & 0x3ffu) << 13);
    }
  } else {
    x = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// float -> bfloat16, round to nearest even; NaN -> 0x7fff (as CUDA).
inline std::uint16_t f32_to_bf16_bits(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  x += 0x7fffu + ((x >> 16) & 1u);
  return (std::uint16_t)(x >> 16);
}
inline float bf16_bits_to_f32(std::uint16_t b) {
  const std::uint32_t x = (std::uint32_t)b << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

}  // namespace detail
}  // namespace pyllm_emu

struct __half_raw {
  unsigned short x;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};

struct __align__(2) __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(const __half_raw& r) : __x(r.x) {}
  __half(float f) : __x(::pyllm_emu::detail::f32_to_f16_bits(f)) {}
  __half(double d) : __x(::pyllm_emu::detail::f32_to_f16_bits((float)d)) {}
  __half(int v) : __half((float)v) {}
  __half(unsigned int v) : __half((float)v) {}
  __half(long long v) : __half((float)v) {}
  __half(unsigned long long v) : __half((float)v) {}
  __half(short v) : __half((float)v) {}
  __half(unsigned short v) : __half((float)v) {}
  operator float() const { return ::pyllm_emu::detail::f16_bits_to_f32(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
};

struct __align__(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(::pyllm_emu::detail::f32_to_bf16_bits(f)) {}
  __nv_bfloat16(double d) : __x(::pyllm_emu::detail::f32_to_bf16_bits((float)d)) {}
  __nv_bfloat16(int v) : __nv_bfloat16((float)v) {}
  __nv_bfloat16(unsigned int v) : __nv_bfloat16((float)v) {}
  __nv_bfloat16(long long v) : __nv_bfloat16((float)v) {}
  __nv_bfloat16(unsigned long long v) : __nv_bfloat16((float)v) {}
  __nv_bfloat16(short v) : __nv_bfloat16((float)v) {}
  __nv_bfloat16(unsigned short v) : __nv_bfloat16((float)v) {}
  operator float() const { return ::pyllm_emu::detail::bf16_bits_to_f32(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __half half;

struct __align__(4) __half2 {
  __half x, y;
  __half2() = default;
  constexpr __half2(const __half& a, const __half& b) : x(a), y(b) {}
};
struct __align__(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  __nv_bfloat162() = default;
  constexpr __nv_bfloat162(const __nv_bfloat16& a, const __nv_bfloat16& b) : x(a), y(b) {}
};
typedef __half2 half2;
typedef __nv_bfloat162 nv_bfloat162;

static_assert(sizeof(__half) == 2 && std::is_trivially_copyable<__half>::value &&
                  std::is_standard_layout<__half>::value && std::is_trivially_default_constructible<__half>::value,
              "__half layout");
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivially_copyable<__nv_bfloat16>::value &&
                  std::is_standard_layout<__nv_bfloat16>::value,
              "__nv_bfloat16 layout");
static_assert(sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4, "x2 layout");

// --- conversions
inline __half __float2half(float f) { return __half_raw{::pyllm_emu::detail::f32_to_f16_bits(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) { return ::pyllm_emu::detail::f16_bits_to_f32(h.__x); }
inline __half __double2half(double d) { return __float2half((float)d); }
inline __half __int2half_rn(int i) { return __float2half((float)i); }
inline int __half2int_rn(__half h) { return (int)nearbyintf(__half2float(h)); }
inline int __half2int_rz(__half h) { return (int)__half2float(h); }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __short_as_half(short s) { return __half_raw{(unsigned short)s}; }
inline __half __ushort_as_half(unsigned short s) { return __half_raw{s}; }
inline __half2 __float2half2_rn(float f) { return __half2(__float2half(f), __float2half(f)); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__float2half(a), __float2half(b)); }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float2 __half22float2(__half2 h) { return make_float2(__half2float(h.x), __half2float(h.y)); }
inline float2 __half2float2(__half2 h) { return __half22float2(h); }  // alias
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __half2 __half2half2(__half h) { return __half2(h, h); }
inline __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
inline __half2 __lows2half2(__half2 a, __half2 b) { return __half2(a.x, b.x); }
inline __half2 __highs2half2(__half2 a, __half2 b) { return __half2(a.y, b.y); }

inline __nv_bfloat16 __float2bfloat16(float f) {
  return __nv_bfloat16_raw{::pyllm_emu::detail::f32_to_bf16_bits(f)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return ::pyllm_emu::detail::bf16_bits_to_f32(b.__x); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __float2bfloat16((float)d); }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return (short)h.__x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __short_as_bfloat16(short s) { return __nv_bfloat16_raw{(unsigned short)s}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short s) { return __nv_bfloat16_raw{s}; }
inline __nv_bfloat162 __float2bfloat162_rn(float f) {
  return __nv_bfloat162(__float2bfloat16(f), __float2bfloat16(f));
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162(__float2bfloat16(a), __float2bfloat16(b));
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return make_float2(__bfloat162float(h.x), __bfloat162float(h.y));
}
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 h) { return __nv_bfloat162(h, h); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162(a, b); }

// --- arithmetic (computed in fp32 and rounded once: exact for + - * / and sqrt)
#define PYLLM_EMU_LOWP_OPS(T, T2, TOF, FROMF)                                                            \
  inline T operator+(const T& a, const T& b) { return FROMF(TOF(a) + TOF(b)); }                          \
  inline T operator-(const T& a, const T& b) { return FROMF(TOF(a) - TOF(b)); }                          \
  inline T operator*(const T& a, const T& b) { return FROMF(TOF(a) * TOF(b)); }                          \
  inline T operator/(const T& a, const T& b) { return FROMF(TOF(a) / TOF(b)); }                          \
  inline T operator-(const T& a) {                                                                       \
    T r = a;                                                                                             \
    r.__x ^= 0x8000u;                                                                                    \
    return r;                                                                                            \
  }                                                                                                      \
  inline T operator+(const T& a) { return a; }                                                           \
  inline T& operator+=(T& a, const T& b) { return a = a + b; }                                           \
  inline T& operator-=(T& a, const T& b) { return a = a - b; }                                           \
  inline T& operator*=(T& a, const T& b) { return a = a * b; }                                           \
  inline T& operator/=(T& a, const T& b) { return a = a / b; }                                           \
  inline bool operator==(const T& a, const T& b) { return TOF(a) == TOF(b); }                            \
  inline bool operator!=(const T& a, const T& b) { return TOF(a) != TOF(b); }                            \
  inline bool operator<(const T& a, const T& b) { return TOF(a) < TOF(b); }                              \
  inline bool operator>(const T& a, const T& b) { return TOF(a) > TOF(b); }                              \
  inline bool operator<=(const T& a, const T& b) { return TOF(a) <= TOF(b); }                            \
  inline bool operator>=(const T& a, const T& b) { return TOF(a) >= TOF(b); }                            \
  inline T __hadd(T a, T b) { return a + b; }                                                            \
  inline T __hsub(T a, T b) { return a - b; }                                                            \
  inline T __hmul(T a, T b) { return a * b; }                                                            \
  inline T __hdiv(T a, T b) { return a / b; }                                                            \
  inline T __hneg(T a) { return -a; }                                                                    \
  inline T __habs(T a) {                                                                                 \
    a.__x &= 0x7fffu;                                                                                    \
    return a;                                                                                            \
  }                                                                                                      \
  inline T __hfma(T a, T b, T c) { return FROMF((float)fma((double)TOF(a), (double)TOF(b), (double)TOF(c))); } \
  inline T __hmax(T a, T b) { return FROMF(fmaxf(TOF(a), TOF(b))); }                                     \
  inline T __hmin(T a, T b) { return FROMF(fminf(TOF(a), TOF(b))); }                                     \
  inline bool __hisnan(T a) { return isnan(TOF(a)); }                                                    \
  inline int __hisinf(T a) { return isinf(TOF(a)) ? (TOF(a) < 0 ? -1 : 1) : 0; }                        \
  inline bool __heq(T a, T b) { return a == b; }                                                         \
  inline bool __hne(T a, T b) { return a != b; }                                                         \
  inline bool __hlt(T a, T b) { return a < b; }                                                          \
  inline bool __hle(T a, T b) { return a <= b; }                                                         \
  inline bool __hgt(T a, T b) { return a > b; }                                                          \
  inline bool __hge(T a, T b) { return a >= b; }                                                         \
  inline T hexp(T a) { return FROMF(expf(TOF(a))); }                                                     \
  inline T hlog(T a) { return FROMF(logf(TOF(a))); }                                                     \
  inline T hsqrt(T a) { return FROMF(sqrtf(TOF(a))); }                                                   \
  inline T hrsqrt(T a) { return FROMF(1.0f / sqrtf(TOF(a))); }                                           \
  inline T2 __hadd2(T2 a, T2 b) { return T2(a.x + b.x, a.y + b.y); }                                     \
  inline T2 __hsub2(T2 a, T2 b) { return T2(a.x - b.x, a.y - b.y); }                                     \
  inline T2 __hmul2(T2 a, T2 b) { return T2(a.x * b.x, a.y * b.y); }                                     \
  inline T2 __h2div(T2 a, T2 b) { return T2(a.x / b.x, a.y / b.y); }                                     \
  inline T2 __hfma2(T2 a, T2 b, T2 c) { return T2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)); }       \
  inline T2 __hmax2(T2 a, T2 b) { return T2(__hmax(a.x, b.x), __hmax(a.y, b.y)); }                       \
  inline T2 __hmin2(T2 a, T2 b) { return T2(__hmin(a.x, b.x), __hmin(a.y, b.y)); }                       \
  inline T2 __hneg2(T2 a) { return T2(-a.x, -a.y); }                                                     \
  inline T2 operator+(const T2& a, const T2& b) { return __hadd2(a, b); }                                \
  inline T2 operator-(const T2& a, const T2& b) { return __hsub2(a, b); }                                \
  inline T2 operator*(const T2& a, const T2& b) { return __hmul2(a, b); }                                \
  inline T2 operator/(const T2& a, const T2& b) { return __h2div(a, b); }                                \
  inline T2& operator+=(T2& a, const T2& b) { return a = a + b; }                                        \
  inline T2& operator*=(T2& a, const T2& b) { return a = a * b; }
PYLLM_EMU_LOWP_OPS(__half, __half2, __half2float, __float2half)
PYLLM_EMU_LOWP_OPS(__nv_bfloat16, __nv_bfloat162, __bfloat162float, __float2bfloat16)
#undef PYLLM_EMU_LOWP_OPS
// Note: __hfma computes in double (53 bits >= 2*11+2 and 2*8+2), so one rounding to
// half/bf16 gives the correctly rounded fused result.

inline __half atomicAdd(__half* a, __half v) {
  return ::pyllm_emu::detail::atomic_update(a, [v](__half o) { return o + v; });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* a, __nv_bfloat16 v) {
  return ::pyllm_emu::detail::atomic_update(a, [v](__nv_bfloat16 o) { return o + v; });
}
inline __half2 atomicAdd(__half2* a, __half2 v) {
  return ::pyllm_emu::detail::atomic_update(a, [v](__half2 o) { return o + v; });
}
inline __nv_bfloat162 atomicAdd(__nv_bfloat162* a, __nv_bfloat162 v) {
  return ::pyllm_emu::detail::atomic_update(a, [v](__nv_bfloat162 o) { return o + v; });
}

// Tensor-core and asynchronous-copy instructions for pyllm's CUDA kernels (sm_80+): one set of
// inline wrappers, inline PTX under nvcc and the CPU emulation (csrc/emulation, emulated exactly
// as the PTX ISA defines them) otherwise. Kernels use only these, never raw asm, so every
// instruction a kernel issues is also checked under the emulation.
//
//   mma_m16n8k16<T>(d, a, b, c)     mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32, T = __half |
//                                   __nv_bfloat16; a: 4 x b32 (A 16x16 row), b: 2 x b32 (B 16x8
//                                   col), c/d: 4 x f32. Fragment layouts: PTX ISA, "Matrix
//                                   fragments for mma.m16n8k16 with floating point type".
//   ldmatrix_x1/x2/x4(r, p)         ldmatrix.sync.aligned.m8n8.{x1,x2,x4}.shared.b16 (and _trans):
//                                   p = this lane's row address (lanes 8i..8i+7: matrix i).
//   cp_async_ca<4|8|16>(dst, src, src_bytes), cp_async_cg16(dst, src, src_bytes)
//                                   cp.async.{ca,cg}.shared.global with zero-fill past src_bytes.
//   cp_async_commit(), cp_async_wait<N>(), cp_async_wait_all()
//
// Under the emulation each wrapper takes the caller's source position as defaulted parameters,
// so warp-collective rendezvous and error messages name the kernel's own line.
#pragma once

#include <cstdint>

#if defined(PYLLM_EMULATED)
#include "emu.h"
#define PYLLM_TC_SITE , PYLLM_EMU_SITE_PARAMS
#define PYLLM_EMU_SITE_PARAMS_OR_NOTHING PYLLM_EMU_SITE_PARAMS
#define PYLLM_TC_HD inline
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define PYLLM_TC_SITE
#define PYLLM_EMU_SITE_PARAMS_OR_NOTHING
#define PYLLM_TC_HD __device__ __forceinline__
#endif

namespace pyllm {
namespace tc {

template <typename T>
struct MmaType;
template <>
struct MmaType<__half> {
  static constexpr bool kBf16 = false;
};
template <>
struct MmaType<__nv_bfloat16> {
  static constexpr bool kBf16 = true;
};

template <typename T>
PYLLM_TC_HD void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                              const float (&c)[4] PYLLM_TC_SITE) {
#if defined(PYLLM_EMULATED)
  ::pyllm_emu::mma_m16n8k16(d, a, b, c, MmaType<T>::kBf16, PYLLM_EMU_SITE);
#else
  if constexpr (MmaType<T>::kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
#endif
}

#if !defined(PYLLM_EMULATED)
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

#if defined(PYLLM_EMULATED)
#define PYLLM_TC_LDMATRIX(NAME, NUM, TRANS, PTX)                                   \
  inline void NAME(uint32_t (&r)[NUM], const void* p PYLLM_TC_SITE) {             \
    ::pyllm_emu::ldmatrix(r, NUM, TRANS, p, PYLLM_EMU_SITE);                       \
  }
#else
#define PYLLM_TC_LDMATRIX_ASM_1 "{%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_u32(p))
#define PYLLM_TC_LDMATRIX_ASM_2 "{%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(p))
#define PYLLM_TC_LDMATRIX_ASM_4 \
  "{%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p))
#define PYLLM_TC_LDMATRIX(NAME, NUM, TRANS, PTX)                                   \
  __device__ __forceinline__ void NAME(uint32_t (&r)[NUM], const void* p) {        \
    asm volatile(PTX " " PYLLM_TC_LDMATRIX_ASM_##NUM);                             \
  }
#endif

PYLLM_TC_LDMATRIX(ldmatrix_x1, 1, false, "ldmatrix.sync.aligned.m8n8.x1.shared.b16")
PYLLM_TC_LDMATRIX(ldmatrix_x2, 2, false, "ldmatrix.sync.aligned.m8n8.x2.shared.b16")
PYLLM_TC_LDMATRIX(ldmatrix_x4, 4, false, "ldmatrix.sync.aligned.m8n8.x4.shared.b16")
PYLLM_TC_LDMATRIX(ldmatrix_x1_trans, 1, true, "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16")
PYLLM_TC_LDMATRIX(ldmatrix_x2_trans, 2, true, "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16")
PYLLM_TC_LDMATRIX(ldmatrix_x4_trans, 4, true, "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16")
#undef PYLLM_TC_LDMATRIX

// cp.async.ca (cp_size 4, 8 or 16) with zero-fill: bytes [src_bytes, N) of dst become 0.
template <int N>
PYLLM_TC_HD void cp_async_ca(void* dst, const void* src, int src_bytes = N PYLLM_TC_SITE) {
  static_assert(N == 4 || N == 8 || N == 16, "cp.async.ca copies 4, 8 or 16 bytes");
#if defined(PYLLM_EMULATED)
  ::pyllm_emu::cp_async(dst, src, N, src_bytes, false, PYLLM_EMU_SITE);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_u32(dst)), "l"(src), "n"(N),
               "r"(src_bytes));
#endif
}

// cp.async.cg (16 bytes, bypasses L1) with zero-fill.
PYLLM_TC_HD void cp_async_cg16(void* dst, const void* src, int src_bytes = 16 PYLLM_TC_SITE) {
#if defined(PYLLM_EMULATED)
  ::pyllm_emu::cp_async(dst, src, 16, src_bytes, true, PYLLM_EMU_SITE);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes));
#endif
}

PYLLM_TC_HD void cp_async_commit(PYLLM_EMU_SITE_PARAMS_OR_NOTHING) {
#if defined(PYLLM_EMULATED)
  ::pyllm_emu::cp_async_commit(PYLLM_EMU_SITE);
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
PYLLM_TC_HD void cp_async_wait(PYLLM_EMU_SITE_PARAMS_OR_NOTHING) {
#if defined(PYLLM_EMULATED)
  ::pyllm_emu::cp_async_wait(N, PYLLM_EMU_SITE);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// cp.async.wait_all == commit_group + wait_group 0 (PTX ISA).
PYLLM_TC_HD void cp_async_wait_all(PYLLM_EMU_SITE_PARAMS_OR_NOTHING) {
#if defined(PYLLM_EMULATED)
  ::pyllm_emu::cp_async_commit(PYLLM_EMU_SITE);
  ::pyllm_emu::cp_async_wait(0, PYLLM_EMU_SITE);
#else
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}

}  // namespace tc
}  // namespace pyllm

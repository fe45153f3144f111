// The pybind11 module (pyllm._C or pyllm._C_emu): build information and capabilities.
// Importing it also runs the TORCH_LIBRARY registrations linked into the same library.
#include <torch/extension.h>

#if defined(PYLLM_EMULATED)
#include "emu.h"
namespace pyllm::emu {
std::vector<std::vector<int64_t>> attention_tc_configs();  // csrc/cuda/attention_tc.cu
std::vector<std::vector<int64_t>> attention_tc_bwd_configs();  // csrc/cuda/attention_tc_bwd.cu
int attention_tc_last_splits();
int64_t attention_tc_last_ctas();
std::vector<int64_t> norm_row_plan(int64_t n, int64_t elem_bytes);  // csrc/cuda/norm.cu
}
#endif

#ifndef PYLLM_TORCH_VERSION
#define PYLLM_TORCH_VERSION "unknown"
#endif
#ifndef PYLLM_CUDA_ARCHS
#define PYLLM_CUDA_ARCHS ""
#endif
#ifndef PYLLM_KERNELS
#define PYLLM_KERNELS ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyllm native kernels";
#if defined(PYLLM_EMULATED)
  m.attr("namespace") = "pyllm_emu";
  m.attr("backend") = "cuda-emulated";
  m.attr("with_cuda") = false;
  m.def(
      "ldmatrix_bank_stats",
      [](bool reset) {
        std::uint64_t phases = 0, extra = 0;
        pyllm_emu::ldmatrix_bank_stats(&phases, &extra, reset);
        return py::make_tuple(phases, extra);
      },
      py::arg("reset") = false,
      "(8x8 matrices read by ldmatrix, extra wavefronts their shared-memory bank conflicts cost) since the "
      "last reset, over every emulated kernel");
  m.def("attention_tc_configs", &pyllm::emu::attention_tc_configs,
        "per head-dim instantiation of the tensor-core attention forward: [head_dim, block_m, block_n, threads, "
        "smem_bytes, q_in_regs, smem_pitch_chunks, xor_swizzle]");
  m.def("attention_tc_bwd_configs", &pyllm::emu::attention_tc_bwd_configs,
        "per head-dim instantiation of the tensor-core attention backward: [head_dim, keys_per_cta, "
        "queries_per_step, threads, smem_bytes]");
  m.def(
      "set_order",
      [](std::optional<std::string> order) { pyllm_emu::set_order(order ? order->c_str() : nullptr); },
      py::arg("order"),
      "emulated block order for the following launches: 'forward', 'reverse' or 'random[:seed]'; None: "
      "PYLLM_EMU_ORDER again");
  m.def("attention_tc_last_splits", &pyllm::emu::attention_tc_last_splits,
        "key splits (flash-decoding CTAs per query tile) of the last tensor-core attention forward");
  m.def("norm_row_plan", &pyllm::emu::norm_row_plan, py::arg("n"), py::arg("elem_bytes"),
        "the CUDA norm forwards' plan for rows of n elements of elem_bytes: [warp_per_row, threads_per_row, "
        "row_in_registers]");
  m.def("attention_tc_last_ctas", &pyllm::emu::attention_tc_last_ctas,
        "CTAs per key split of the last tensor-core attention forward (batch x heads x query tiles)");
#else
  m.attr("namespace") = "pyllm";
  m.attr("backend") = "native";
#if defined(PYLLM_WITH_CUDA)
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#endif
  m.attr("torch_version") = PYLLM_TORCH_VERSION;
#if defined(PYLLM_CUDA_VERSION)
  m.attr("cuda_version") = PYLLM_CUDA_VERSION;
#else
  m.attr("cuda_version") = py::none();
#endif
  m.attr("cuda_archs") = PYLLM_CUDA_ARCHS;
  m.attr("kernels") = PYLLM_KERNELS;
#if defined(__VERSION__)
  m.attr("compiler") = __VERSION__;
#endif
}

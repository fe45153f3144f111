// CUDA kernels: softmax(input * scale + mask) over the last dim with bool/additive
// masks of any broadcast shape and strides, top-left causal masking, and zeros for
// fully-masked rows; backward dx = scale * y * (dy - sum(dy * y)), zero-probability terms skipped.
// One warp per row up to 1024 columns, one block per row beyond: no length limit. Rows of up to
// 1024 (warp) / 8192 (block), any width and offset, are held in registers (one read of each input,
// 16-byte loads with a scalar head and tail, one write of the output: RowRegs in common.cuh);
// longer rows, or tensors in different 16-byte phases, re-read the row.
#include "common.cuh"
#include "../include/pyllm/broadcast.h"
#include "../include/pyllm/ops/softmax.h"

namespace pyllm {
namespace PYLLM_CUDA_NS {
namespace {

struct NoMask {};

template <typename M>
__device__ __forceinline__ float apply_mask(float s, const M* m, int64_t idx) {
  if constexpr (std::is_same_v<M, NoMask>) {
    return s;
  } else if constexpr (std::is_same_v<M, bool>) {
    return m[idx] ? s : -INFINITY;
  } else {
    return s + load_float(m[idx]);
  }
}

template <typename T, typename M, bool kWarp>
__global__ void masked_softmax_fwd_kernel(const T* __restrict__ x, const M* __restrict__ mask,
                                          RowIndexer mi, T* __restrict__ y, int64_t rows,
                                          int64_t n, int64_t lq, float scale, bool causal) {
  __shared__ float scratch[32];
  RowTeam<kWarp> team(scratch);
  const bool active = team.row < rows;
  const int64_t base = active ? team.row * n : 0;
  const int64_t mbase = active ? mi.offset(team.row) : 0;
  const int64_t valid = !active ? 0 : (causal ? (team.row % lq + 1 < n ? team.row % lq + 1 : n) : n);
  constexpr int kV = kVecOf<T>, kChunks = kRegElems<kWarp> / kV;
  const RowRegs<T, kChunks> rr(x + base, n, team.tid, team.size);
  if (row_fits_regs<T, kWarp>(n, team.size) && rr.same_phase(y + base)) {  // uniform per team
    // The row in registers: x read once, the mask once, y written once; c holds the masked
    // scores, -inf where hidden (causal, mask) and in the slots holding no element.
    float c[kChunks + 1][kV];
    float mx = -INFINITY, nans = 0.f;
    if (active) rr.load(c, x + base);
#pragma unroll
    for (int k = 0; k <= kChunks; ++k)
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        const int j = active && (k < kChunks || i < 2) ? rr.index(k, i) : -1;
        float s = -INFINITY;
        if (j >= 0 && j < valid) {
          s = apply_mask(c[k][i] * scale, mask, mbase + j * mi.col_stride);
          if (s != s) nans += 1.f;  // fmaxf drops NaN: count them apart
          else mx = fmaxf(mx, s);
        }
        c[k][i] = s;
      }
    mx = team.max(mx);
    if (team.sum(nans) > 0.f) mx = NAN;  // as below: the row is NaN at its visible positions
    float acc = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int k = 0; k <= kChunks; ++k)
#pragma unroll
        for (int i = 0; i < kV; ++i) acc += c[k][i] == -INFINITY ? 0.f : expf(c[k][i] - mx);
    }
    const float total = team.sum(acc);
    const float inv = (total > 0.f || total != total) ? 1.f / total : 0.f;
    if (active)
      rr.store(y + base, [&](int k, int i, int64_t) {
        return (c[k][i] == -INFINITY || mx == -INFINITY) ? 0.f : (mx != mx ? NAN : expf(c[k][i] - mx) * inv);
      });
    return;  // uniform: the whole team took this path, past its last barrier
  }
  float mx = -INFINITY, nans = 0.f;
  for (int64_t j = team.tid; j < valid; j += team.size) {
    const float s = apply_mask(load_float(x[base + j]) * scale, mask, mbase + j * mi.col_stride);
    if (s != s) nans += 1.f;  // fmaxf drops NaN: count them apart
    else mx = fmaxf(mx, s);
  }
  mx = team.max(mx);
  // A visible NaN score makes the row NaN at every visible position, as torch's softmax does (never
  // zeros: only rows whose keys are all masked get zeros); hidden positions stay 0.
  if (team.sum(nans) > 0.f) mx = NAN;
  float acc = 0.f;
  if (mx != -INFINITY) {
    for (int64_t j = team.tid; j < valid; j += team.size) {
      const float s = apply_mask(load_float(x[base + j]) * scale, mask, mbase + j * mi.col_stride);
      acc += (s == -INFINITY) ? 0.f : expf(s - mx);
    }
  }
  const float total = team.sum(acc);
  const float inv = (total > 0.f || total != total) ? 1.f / total : 0.f;
  if (active) {
    for (int64_t j = team.tid; j < n; j += team.size) {
      float p = 0.f;
      if (j < valid && mx != -INFINITY) {
        const float s = apply_mask(load_float(x[base + j]) * scale, mask, mbase + j * mi.col_stride);
        // A NaN row is NaN at its visible positions; a hidden one (-inf) is 0 in every row.
        p = (s == -INFINITY) ? 0.f : (mx != mx ? NAN : expf(s - mx) * inv);
      }
      y[base + j] = store_float<T>(p);
    }
  }
}

template <typename T, bool kWarp>
__global__ void masked_softmax_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                          T* __restrict__ dx, int64_t rows, int64_t n, float scale) {
  __shared__ float scratch[32];
  RowTeam<kWarp> team(scratch);
  const bool active = team.row < rows;
  const int64_t base = active ? team.row * n : 0;
  constexpr int kV = kVecOf<T>, kChunks = kRegElems<kWarp> / kV;
  const RowRegs<T, kChunks> rr(y + base, n, team.tid, team.size);
  if (row_fits_regs<T, kWarp>(n, team.size) && rr.same_phase(dy + base) && rr.same_phase(dx + base)) {
    // y and dy read once into registers, dx written once; same rules as below.
    float yc[kChunks + 1][kV], gc[kChunks + 1][kV];
    float acc = 0.f;
    if (active) {
      rr.load(yc, y + base);
      rr.load(gc, dy + base);
      rr.each([&](int k, int i, int64_t) {
        if (yc[k][i] != 0.f) acc += gc[k][i] * yc[k][i];
      });
    }
    const float dot = team.sum(acc);
    if (active)
      rr.store(dx + base, [&](int k, int i, int64_t) {
        return yc[k][i] != 0.f ? scale * yc[k][i] * (gc[k][i] - dot) : 0.f;
      });
    return;  // uniform: the whole team took this path, past its last barrier
  }
  float acc = 0.f;
  // A probability of exactly zero (a hidden key, a fully masked row) contributes nothing: its
  // dy is not read into the dot, even a NaN, and its dx is 0 (pyllm's non-finite rule).
  if (active)
    for (int64_t j = team.tid; j < n; j += team.size) {
      const float yv = load_float(y[base + j]);
      if (yv != 0.f) acc += load_float(dy[base + j]) * yv;
    }
  const float dot = team.sum(acc);
  if (active)
    for (int64_t j = team.tid; j < n; j += team.size) {
      const float yv = load_float(y[base + j]);
      dx[base + j] = store_float<T>(yv != 0.f ? scale * yv * (load_float(dy[base + j]) - dot) : 0.f);
    }
}

template <typename scalar_t, typename M>
void launch_fwd(const at::Tensor& input, const M* mask, const RowIndexer& mi, at::Tensor& out,
                float scale, bool causal) {
  using T = typename CudaType<scalar_t>::type;
  const int64_t n = input.size(-1), rows = input.numel() / n;
  const int64_t lq = input.dim() >= 2 ? input.size(-2) : 1;
  const RowLaunch L = row_launch(rows, n);
  auto k = L.warp_per_row ? masked_softmax_fwd_kernel<T, M, true> : masked_softmax_fwd_kernel<T, M, false>;
  PYLLM_LAUNCH(k, L.grid, L.block, 0, PYLLM_STREAM(), cuda_ptr<scalar_t>(input), mask, mi,
               cuda_ptr<scalar_t>(out), rows, n, lq, scale, causal);
}

}  // namespace

at::Tensor masked_softmax(const at::Tensor& input_, const std::optional<at::Tensor>& mask,
                          double scale, bool causal) {
  PYLLM_CHECK_FLOAT(input_, "input");
  check_kernel_device(input_, "input");
  TORCH_CHECK(input_.dim() >= 1, "pyllm: input must have at least 1 dimension");
  TORCH_CHECK(!causal || input_.dim() >= 2, "pyllm: causal=True needs input with >= 2 dims");
  PYLLM_DEVICE_GUARD(input_);
  const at::Tensor input = input_.contiguous();
  at::Tensor out = at::empty_like(input);
  if (input.numel() == 0) return out;
  RowIndexer mi;
  const at::Tensor mfull = expand_mask(mask, input, input.sizes(), "mask", "input", mi);
  const bool has_mask = mfull.defined();
  const float s = (float)scale;
  PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_masked_softmax_cuda", [&] {
    if (!has_mask) {
      launch_fwd<scalar_t, NoMask>(input, nullptr, mi, out, s, causal);
    } else {
      switch (mfull.scalar_type()) {
        case at::kBool: launch_fwd<scalar_t, bool>(input, mfull.data_ptr<bool>(), mi, out, s, causal); break;
        case at::kFloat: launch_fwd<scalar_t, float>(input, mfull.data_ptr<float>(), mi, out, s, causal); break;
        case at::kHalf: launch_fwd<scalar_t, __half>(input, cuda_ptr<at::Half>(mfull), mi, out, s, causal); break;
        default: launch_fwd<scalar_t, __nv_bfloat16>(input, cuda_ptr<at::BFloat16>(mfull), mi, out, s, causal); break;
      }
    }
  });
  return out;
}

at::Tensor masked_softmax_backward(const at::Tensor& grad_out_, const at::Tensor& out_,
                                   double scale) {
  PYLLM_CHECK_FLOAT(out_, "out");
  check_kernel_device(out_, "out");
  TORCH_CHECK(grad_out_.sizes() == out_.sizes(), "pyllm: grad_out must have shape ",
              out_.sizes(), ", got ", grad_out_.sizes());
  PYLLM_DEVICE_GUARD(out_);
  const at::Tensor y = out_.contiguous(), dy = grad_out_.to(out_.scalar_type()).contiguous();
  at::Tensor dx = at::empty_like(y);
  if (y.numel() == 0) return dx;
  const int64_t n = y.size(-1), rows = y.numel() / n;
  const RowLaunch L = row_launch(rows, n);
  PYLLM_DISPATCH_FLOATING(y.scalar_type(), "pyllm_masked_softmax_bwd_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    auto k = L.warp_per_row ? masked_softmax_bwd_kernel<T, true> : masked_softmax_bwd_kernel<T, false>;
    PYLLM_LAUNCH(k, L.grid, L.block, 0, PYLLM_STREAM(), cuda_ptr<scalar_t>(dy), cuda_ptr<scalar_t>(y),
                 cuda_ptr<scalar_t>(dx), rows, n, (float)scale);
  });
  return dx;
}

}  // namespace PYLLM_CUDA_NS
}  // namespace pyllm

// torch.ops.pyllm (CUDA key) under nvcc, torch.ops.pyllm_emu (CPU key) under the emulation.
PYLLM_CUDA_LIBRARY_IMPL(m) {
  m.impl("masked_softmax", &pyllm::PYLLM_CUDA_NS::masked_softmax);
  m.impl("masked_softmax_backward", &pyllm::PYLLM_CUDA_NS::masked_softmax_backward);
}

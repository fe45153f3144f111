// CUDA kernels: LayerNorm, add+LayerNorm, RMSNorm, add+RMSNorm, forward and backward.
// One warp per row up to 1024 elements, one block per row beyond; fp32 two-pass
// mean/variance with warp-shuffle (and shared-memory) reductions. Forward: rows of up to 1024
// (warp) or 8192 (block) elements, any width and offset, are read once into registers (16-byte
// loads, a scalar head and tail: RowRegs in common.cuh) and written once with 16-byte stores; the
// dx backwards hold dy and x the same way; longer rows, or tensors in different 16-byte phases,
// re-read the row element by element (L1/L2).
#include "common.cuh"
#include "../include/pyllm/ops/norm.h"


namespace pyllm {
namespace PYLLM_CUDA_NS {
namespace {

// round mode for RMSNorm's intermediate (HF Llama/T5 cast the normalized value).
enum RoundMode : int { kRoundNone = 0, kRoundHalf = 1, kRoundBf16 = 2 };
__device__ __forceinline__ float round_as(float v, int mode) {
  if (mode == kRoundHalf) return __half2float(__float2half_rn(v));
  if (mode == kRoundBf16) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}
inline int round_mode(std::optional<at::ScalarType> t) {
  if (!t.has_value()) return kRoundNone;
  if (*t == at::kHalf) return kRoundHalf;
  if (*t == at::kBFloat16) return kRoundBf16;
  return kRoundNone;
}

// Loads this thread's elements of row x (+ res: the sum, rounded to T, is written to `summed` and
// kept as stored) into c, chunk by chunk; empty slots are zeros.
template <typename T, int kChunks>
__device__ __forceinline__ void load_row_regs(const RowRegs<T, kChunks>& rr, float (&c)[kChunks + 1][kVecOf<T>],
                                              const T* x, const T* res, T* summed) {
  constexpr int kV = kVecOf<T>;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int j0 = rr.chunk(k);
    if (j0 >= 0) {
      load_chunk(x + j0, c[k]);
      if (res) {
        float r[kV];
        load_chunk(res + j0, r);
#pragma unroll
        for (int i = 0; i < kV; ++i) c[k][i] = load_float(store_float<T>(c[k][i] + r[i]));
        store_chunk<T, kV>(summed + j0, c[k]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kV; ++i) c[k][i] = 0.f;
    }
  }
#pragma unroll
  for (int i = 0; i < kV; ++i) {  // the head and tail elements, one at most of each
    const int j = i < 2 ? rr.index(kChunks, i) : -1;
    float v = 0.f;
    if (j >= 0) {
      v = load_float(x[j]);
      if (res) {
        const T sv = store_float<T>(v + load_float(res[j]));
        summed[j] = sv;
        v = load_float(sv);
      }
    }
    c[kChunks][i] = v;
  }
}

template <typename T, bool kWarp, bool kResidual>
__global__ void layer_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res,
                                      T* __restrict__ summed, T* __restrict__ y,
                                      const float* __restrict__ w, const float* __restrict__ b,
                                      float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                      int64_t rows, int64_t n, float eps) {
  __shared__ float scratch[32];
  RowTeam<kWarp> team(scratch);
  const bool active = team.row < rows;  // no early return: block mode has barriers
  const int64_t base = active ? team.row * n : 0;
  constexpr int kV = kVecOf<T>, kChunks = kRegElems<kWarp> / kV;
  // Uniform across the team (it depends on the row's address): the row in registers, or the
  // element loops re-reading it.
  const RowRegs<T, kChunks> rr(x + base, n, team.tid, team.size);
  const bool regs = row_fits_regs<T, kWarp>(n, team.size) && rr.same_phase(y + base) &&
                    (!kResidual || (rr.same_phase(res + base) && rr.same_phase(summed + base)));
  float c[kChunks + 1][kV];
  // Shifted sum: accumulate v - pivot (pivot = the row's first value, as normalized) so
  // the mean stays accurate when |mean| >> std (plain fp32 sums lose the low bits that
  // x - mean keeps, and LayerNorm divides that error by std).
  float pivot = 0.f;
  if (active && n > 0) {
    pivot = load_float(x[base]);
    if (kResidual) pivot = load_float(store_float<T>(pivot + load_float(res[base])));
  }
  float acc = 0.f;
  if (regs) {
    if (active) {
      load_row_regs<T, kChunks>(rr, c, x + base, kResidual ? res + base : nullptr, kResidual ? summed + base : nullptr);
      rr.each([&](int k, int i, int64_t) { acc += c[k][i] - pivot; });
    }
    const float mean = pivot + team.sum(acc) / (float)n;
    acc = 0.f;
    if (active)
      rr.each([&](int k, int i, int64_t) {
        const float d = c[k][i] - mean;
        acc += d * d;
      });
    const float rstd = rsqrtf(team.sum(acc) / (float)n + eps);
    if (active) {
      rr.store(y + base, [&](int k, int i, int64_t j) {
        float v = (c[k][i] - mean) * rstd;
        if (w) v *= w[j];
        if (b) v += b[j];
        return v;
      });
      if (team.tid == 0) {
        mean_out[team.row] = mean;
        rstd_out[team.row] = rstd;
      }
    }
    return;  // uniform: every thread of the team took this path, past its last barrier
  }
  if (active) {
    for (int64_t j = team.tid; j < n; j += team.size) {
      float v = load_float(x[base + j]);
      if (kResidual) {
        const T s = store_float<T>(v + load_float(res[base + j]));
        summed[base + j] = s;
        v = load_float(s);  // normalize the sum as stored
      }
      acc += v - pivot;
    }
  }
  const float mean = pivot + team.sum(acc) / (float)n;
  const T* src = kResidual ? summed : x;
  acc = 0.f;
  if (active) {
    for (int64_t j = team.tid; j < n; j += team.size) {
      const float d = load_float(src[base + j]) - mean;
      acc += d * d;
    }
  }
  const float rstd = rsqrtf(team.sum(acc) / (float)n + eps);
  if (active) {
    for (int64_t j = team.tid; j < n; j += team.size) {
      float v = (load_float(src[base + j]) - mean) * rstd;
      if (w) v *= w[j];
      if (b) v += b[j];
      y[base + j] = store_float<T>(v);
    }
    if (team.tid == 0) {
      mean_out[team.row] = mean;
      rstd_out[team.row] = rstd;
    }
  }
}

// dx for one row: g = dy*w, xhat = (x-mean)*rstd, dx = rstd*(g - mean(g) - xhat*mean(g*xhat)) (+extra)
template <typename T, bool kWarp>
__global__ void layer_norm_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                         const float* __restrict__ mean, const float* __restrict__ rstd,
                                         const float* __restrict__ w, const T* __restrict__ extra,
                                         T* __restrict__ dx, int64_t rows, int64_t n) {
  __shared__ float scratch[32];
  RowTeam<kWarp> team(scratch);
  const bool active = team.row < rows;
  const int64_t base = active ? team.row * n : 0;
  const float mu = active ? mean[team.row] : 0.f, rs = active ? rstd[team.row] : 0.f;
  float sg = 0.f, sgx = 0.f;
  constexpr int kV = kVecOf<T>, kChunks = kRegElems<kWarp> / kV;
  // Uniform across the team: dy and x held in registers (each read once), as in the forward.
  const RowRegs<T, kChunks> rr(x + base, n, team.tid, team.size);
  if (row_fits_regs<T, kWarp>(n, team.size) && rr.same_phase(dy + base) && rr.same_phase(dx + base)) {
    float g[kChunks + 1][kV], d[kChunks + 1][kV];  // g = dy * w, d = x - mean
    if (active) {
      rr.load(g, dy + base);
      rr.load(d, x + base);
      rr.each([&](int k, int i, int64_t j) {
        g[k][i] = __fmul_rn(g[k][i], w ? w[j] : 1.f);
        d[k][i] -= mu;
        sg += g[k][i];
        sgx += g[k][i] * d[k][i] * rs;
      });
    }
    const float mg = team.sum(sg) / (float)n;
    const float mgx = team.sum(sgx) / (float)n;
    if (active)
      rr.store(dx + base, [&](int k, int i, int64_t j) {
        float v = rs * ((g[k][i] - mg) - d[k][i] * rs * mgx);
        if (extra) v += load_float(extra[base + j]);
        return v;
      });
    return;  // uniform: every thread of the team took this path, past its last barrier
  }
  if (active) {
    for (int64_t j = team.tid; j < n; j += team.size) {
      // __fmul_rn: g is rounded the same way in both passes (no FMA contraction into the
      // sum), so g - mean(g) cancels exactly when it should (n = 1 gives dx = 0).
      const float g = __fmul_rn(load_float(dy[base + j]), w ? w[j] : 1.f);
      sg += g;
      sgx += g * (load_float(x[base + j]) - mu) * rs;
    }
  }
  const float mg = team.sum(sg) / (float)n;
  const float mgx = team.sum(sgx) / (float)n;
  if (active) {
    for (int64_t j = team.tid; j < n; j += team.size) {
      const float g = __fmul_rn(load_float(dy[base + j]), w ? w[j] : 1.f);
      float v = rs * ((g - mg) - (load_float(x[base + j]) - mu) * rs * mgx);
      if (extra) v += load_float(extra[base + j]);
      dx[base + j] = store_float<T>(v);
    }
  }
}

// Column partial sums for weight/bias grads: block (bx, by) sums rows [by*chunk, ...)
// for 256 columns. mode 0: LayerNorm (dw = dy*xhat, db = dy); mode 1: RMSNorm
// (dw = dy * round(x*rstd)).
template <typename T, typename G>
__global__ void norm_bwd_dw_kernel(const G* __restrict__ dy, const T* __restrict__ x,
                                   const float* __restrict__ mean, const float* __restrict__ rstd,
                                   float* __restrict__ part_w, float* __restrict__ part_b,
                                   int64_t rows, int64_t n, int64_t chunk, int mode, int rmode) {
  const int64_t col = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t r0 = (int64_t)blockIdx.y * chunk;
  const int64_t r1 = r0 + chunk < rows ? r0 + chunk : rows;
  if (col < n) {
    float aw = 0.f, ab = 0.f;
    for (int64_t r = r0; r < r1; ++r) {
      const float g = load_float(dy[r * n + col]);
      const float xv = load_float(x[r * n + col]);
      if (mode == 0) {
        aw += g * (xv - mean[r]) * rstd[r];
        ab += g;
      } else {
        aw += g * round_as(xv * rstd[r], rmode);
      }
    }
    part_w[blockIdx.y * n + col] = aw;
    if (part_b) part_b[blockIdx.y * n + col] = ab;
  }
}

// RMSNorm of x, or (res != null: add_rms_norm) of the sum x + res, stored to `summed` rounded to
// TI and normalized as stored. The residual test is uniform per launch (no extra instantiation).
template <typename TI, typename TO, bool kWarp>
__global__ void rms_norm_fwd_kernel(const TI* __restrict__ x, const TI* __restrict__ res, TI* __restrict__ summed,
                                    TO* __restrict__ y, const float* __restrict__ w, float* __restrict__ rstd_out,
                                    int64_t rows, int64_t n, float eps, int rmode, float offset) {
  __shared__ float scratch[32];
  RowTeam<kWarp> team(scratch);
  const bool active = team.row < rows;
  const int64_t base = active ? team.row * n : 0;
  constexpr int kV = kVecOf<TI>, kChunks = kRegElems<kWarp> / kV;
  // Uniform across the team: the row in registers, or the element loops re-reading it.
  const RowRegs<TI, kChunks> rr(x + base, n, team.tid, team.size);
  const bool regs = row_fits_regs<TI, kWarp>(n, team.size) && rr.same_phase(y + base) &&
                    (!res || (rr.same_phase(res + base) && rr.same_phase(summed + base)));
  if (regs) {
    float c[kChunks + 1][kV];
    float acc = 0.f;
    if (active) {
      load_row_regs<TI, kChunks>(rr, c, x + base, res ? res + base : nullptr, res ? summed + base : nullptr);
      rr.each([&](int k, int i, int64_t) { acc += c[k][i] * c[k][i]; });
    }
    const float rstd = rsqrtf(team.sum(acc) / (float)n + eps);
    if (active) {
      rr.store(y + base, [&](int k, int i, int64_t j) {
        const float v = round_as(c[k][i] * rstd, rmode);
        return w ? v * (w[j] + offset) : v;
      });
      if (team.tid == 0) rstd_out[team.row] = rstd;
    }
    return;  // uniform: every thread of the team took this path, past its last barrier
  }
  float acc = 0.f;
  if (active) {
    for (int64_t j = team.tid; j < n; j += team.size) {
      float v = load_float(x[base + j]);
      if (res) {
        const TI s = store_float<TI>(v + load_float(res[base + j]));
        summed[base + j] = s;
        v = load_float(s);
      }
      acc += v * v;
    }
  }
  const TI* src = res ? summed : x;  // this thread's own writes: no barrier needed to re-read them
  const float rstd = rsqrtf(team.sum(acc) / (float)n + eps);
  if (active) {
    for (int64_t j = team.tid; j < n; j += team.size) {
      float v = round_as(load_float(src[base + j]) * rstd, rmode);
      if (w) v *= (w[j] + offset);
      y[base + j] = store_float<TO>(v);
    }
    if (team.tid == 0) rstd_out[team.row] = rstd;
  }
}

template <typename T, bool kWarp>
__global__ void rms_norm_bwd_dx_kernel(const float* __restrict__ dy, const T* __restrict__ x,
                                       const float* __restrict__ rstd, const float* __restrict__ w,
                                       T* __restrict__ dx, int64_t rows, int64_t n, float offset) {
  __shared__ float scratch[32];
  RowTeam<kWarp> team(scratch);
  const bool active = team.row < rows;
  const int64_t base = active ? team.row * n : 0;
  const float rs = active ? rstd[team.row] : 0.f;
  float acc = 0.f;
  constexpr int kV = kVecOf<T>, kChunks = kRegElems<kWarp> / kV;
  // Uniform across the team: dy (fp32, kV values per chunk of x) and x held in registers.
  const RowRegs<T, kChunks> rr(x + base, n, team.tid, team.size);
  if (row_fits_regs<T, kWarp>(n, team.size) && rr.same_phase(dy + base) && rr.same_phase(dx + base)) {
    float g[kChunks + 1][kV], xv[kChunks + 1][kV];
    if (active) {
      rr.load(g, dy + base);
      rr.load(xv, x + base);
      rr.each([&](int k, int i, int64_t j) {
        g[k][i] *= w ? (w[j] + offset) : 1.f;
        acc += g[k][i] * xv[k][i] * rs;
      });
    }
    const float m = team.sum(acc) / (float)n;
    if (active) rr.store(dx + base, [&](int k, int i, int64_t) { return rs * (g[k][i] - xv[k][i] * rs * m); });
    return;  // uniform
  }
  if (active) {
    for (int64_t j = team.tid; j < n; j += team.size) {
      const float g = dy[base + j] * (w ? (w[j] + offset) : 1.f);
      acc += g * load_float(x[base + j]) * rs;
    }
  }
  const float m = team.sum(acc) / (float)n;
  if (active) {
    for (int64_t j = team.tid; j < n; j += team.size) {
      const float g = dy[base + j] * (w ? (w[j] + offset) : 1.f);
      dx[base + j] = store_float<T>(rs * (g - load_float(x[base + j]) * rs * m));
    }
  }
}

std::vector<int64_t> stat_shape(const at::Tensor& t) {
  auto s = t.sizes().vec();
  s.pop_back();
  return s;
}

// Sums weight-gradient partials: returns (dw, db) as fp32 [n].
template <typename T, typename G>
std::pair<at::Tensor, at::Tensor> column_grads(const at::Tensor& dy, const at::Tensor& x,
                                               const at::Tensor& mean, const at::Tensor& rstd,
                                               int64_t rows, int64_t n, int mode, int rmode) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(128, (rows + 63) / 64));
  const int64_t chunk = (rows + chunks - 1) / chunks;
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor pw = at::empty({chunks, n}, opts);
  at::Tensor pb = mode == 0 ? at::empty({chunks, n}, opts) : at::Tensor();
  const dim3 grid((unsigned)((n + 255) / 256), (unsigned)chunks);
  auto k = norm_bwd_dw_kernel<typename CudaType<T>::type, G>;
  PYLLM_LAUNCH(k, grid, 256, 0, PYLLM_STREAM(), reinterpret_cast<const G*>(dy.data_ptr()),
               cuda_ptr<T>(x), mode == 0 ? mean.data_ptr<float>() : nullptr,
               rstd.data_ptr<float>(), pw.data_ptr<float>(),
               mode == 0 ? pb.data_ptr<float>() : nullptr, rows, n, chunk, mode, rmode);
  return {pw.sum(0), mode == 0 ? pb.sum(0) : at::Tensor()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const at::Tensor& input_,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          double eps) {
  check_norm_input(input_);
  check_kernel_device(input_, "input");
  check_norm_param(weight, input_, "weight");
  check_norm_param(bias, input_, "bias");
  PYLLM_DEVICE_GUARD(input_);
  const at::Tensor input = input_.contiguous();
  const int64_t n = input.size(-1), rows = n ? input.numel() / n : 0;
  at::Tensor out = at::empty_like(input);
  at::Tensor mean = at::zeros(stat_shape(input), input.options().dtype(at::kFloat));
  at::Tensor rstd = at::zeros(stat_shape(input), input.options().dtype(at::kFloat));
  if (input.numel() == 0) return {out, mean, rstd};
  at::Tensor wh, bh;
  const float* w = opt_float(weight, wh);
  const float* b = opt_float(bias, bh);
  const RowLaunch L = row_launch(rows, n);
  PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_layer_norm_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    auto k = L.warp_per_row ? layer_norm_fwd_kernel<T, true, false> : layer_norm_fwd_kernel<T, false, false>;
    PYLLM_LAUNCH(k, L.grid, L.block, 0, PYLLM_STREAM(), cuda_ptr<scalar_t>(input), (const T*)nullptr,
                 (T*)nullptr, cuda_ptr<scalar_t>(out), w, b, mean.data_ptr<float>(),
                 rstd.data_ptr<float>(), rows, n, (float)eps);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm(
    const at::Tensor& input_, const at::Tensor& residual_, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_norm_input(input_);
  check_kernel_device(input_, "input");
  check_residual(residual_, input_);
  check_norm_param(weight, input_, "weight");
  check_norm_param(bias, input_, "bias");
  PYLLM_DEVICE_GUARD(input_);
  const at::Tensor input = input_.contiguous(), residual = residual_.contiguous();
  const int64_t n = input.size(-1), rows = n ? input.numel() / n : 0;
  at::Tensor out = at::empty_like(input), summed = at::empty_like(input);
  at::Tensor mean = at::zeros(stat_shape(input), input.options().dtype(at::kFloat));
  at::Tensor rstd = at::zeros(stat_shape(input), input.options().dtype(at::kFloat));
  if (input.numel() == 0) return {out, summed, mean, rstd};
  at::Tensor wh, bh;
  const float* w = opt_float(weight, wh);
  const float* b = opt_float(bias, bh);
  const RowLaunch L = row_launch(rows, n);
  PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_add_layer_norm_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    auto k = L.warp_per_row ? layer_norm_fwd_kernel<T, true, true> : layer_norm_fwd_kernel<T, false, true>;
    PYLLM_LAUNCH(k, L.grid, L.block, 0, PYLLM_STREAM(), cuda_ptr<scalar_t>(input),
                 cuda_ptr<scalar_t>(residual), cuda_ptr<scalar_t>(summed), cuda_ptr<scalar_t>(out),
                 w, b, mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, n, (float)eps);
  });
  return {out, summed, mean, rstd};
}

// In place (inference). The fused kernel's pointers are __restrict__, so it writes a fresh output
// that is copied back: correct, not the bandwidth saving (the CPU page-fault cost it removes there
// does not exist on the GPU, whose caching allocator reuses memory).
void add_layer_norm_inplace(at::Tensor& input, const at::Tensor& residual,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps) {
  input.copy_(std::get<0>(add_layer_norm(input, residual, weight, bias, eps)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& grad_out_, const at::Tensor& input_, const at::Tensor& mean_,
    const at::Tensor& rstd_, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_extra) {
  check_norm_input(input_);
  check_kernel_device(input_, "input");
  TORCH_CHECK(grad_out_.sizes() == input_.sizes(), "pyllm: grad_out must have shape ",
              input_.sizes(), ", got ", grad_out_.sizes());
  check_norm_param(weight, input_, "weight");
  PYLLM_DEVICE_GUARD(input_);
  const at::Tensor input = input_.contiguous();
  const at::Tensor dy = grad_out_.to(input.scalar_type()).contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const int64_t n = input.size(-1), rows = n ? input.numel() / n : 0;
  const bool has_w = weight.has_value() && weight->defined();
  at::Tensor dx = at::empty_like(input);
  at::Tensor extra;
  if (grad_extra.has_value() && grad_extra->defined())
    extra = grad_extra->to(input.scalar_type()).contiguous();
  at::Tensor wh;
  const float* w = opt_float(weight, wh);
  at::Tensor dw, db;
  PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_layer_norm_bwd_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    if (rows > 0) {
      const RowLaunch L = row_launch(rows, n);
      auto k = L.warp_per_row ? layer_norm_bwd_dx_kernel<T, true> : layer_norm_bwd_dx_kernel<T, false>;
      PYLLM_LAUNCH(k, L.grid, L.block, 0, PYLLM_STREAM(), cuda_ptr<scalar_t>(dy),
                   cuda_ptr<scalar_t>(input), mean.data_ptr<float>(), rstd.data_ptr<float>(), w,
                   extra.defined() ? cuda_ptr<scalar_t>(extra) : (const T*)nullptr,
                   cuda_ptr<scalar_t>(dx), rows, n);
    }
    if (has_w) {
      if (rows > 0) {
        auto g = column_grads<scalar_t, T>(dy, input, mean, rstd, rows, n, 0, kRoundNone);
        dw = g.first.to(weight->scalar_type());
        db = g.second.to(weight->scalar_type());
      } else {
        dw = at::zeros({n}, weight->options());
        db = at::zeros({n}, weight->options());
      }
    }
  });
  if (!has_w) {
    dw = at::empty({0}, input.options());
    db = at::empty({0}, input.options());
  }
  return {dx, dw, db};
}

namespace {
// rms_norm (residual undefined) and add_rms_norm: one launch path.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_impl(const at::Tensor& input_, const at::Tensor& residual_,
                                                             const std::optional<at::Tensor>& weight, double eps,
                                                             std::optional<at::ScalarType> round_dtype,
                                                             double weight_offset, at::ScalarType out_dtype) {
  check_norm_input(input_);
  check_kernel_device(input_, "input");
  if (residual_.defined()) check_residual(residual_, input_);
  check_norm_param(weight, input_, "weight");
  TORCH_CHECK(is_supported_float(out_dtype), "pyllm: out_dtype must be a float type");
  PYLLM_DEVICE_GUARD(input_);
  const at::Tensor input = input_.contiguous();
  const at::Tensor residual = residual_.defined() ? residual_.contiguous() : residual_;
  const int64_t n = input.size(-1), rows = n ? input.numel() / n : 0;
  // Kernels write the input dtype or fp32; other output dtypes are cast afterwards.
  const at::ScalarType kdt = out_dtype == input.scalar_type() ? out_dtype : at::kFloat;
  at::Tensor out = at::empty(input.sizes(), input.options().dtype(kdt));
  at::Tensor summed = residual.defined() ? at::empty_like(input) : at::Tensor();
  at::Tensor rstd = at::zeros(stat_shape(input), input.options().dtype(at::kFloat));
  if (input.numel() == 0) return {out.to(out_dtype), summed, rstd};
  at::Tensor wh;
  const float* w = opt_float(weight, wh);
  const int rmode = round_mode(round_dtype);
  const RowLaunch L = row_launch(rows, n);
  PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_rms_norm_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    const T* res = residual.defined() ? cuda_ptr<scalar_t>(residual) : nullptr;
    T* sum = summed.defined() ? cuda_ptr<scalar_t>(summed) : nullptr;
    if (kdt == input.scalar_type()) {
      auto k = L.warp_per_row ? rms_norm_fwd_kernel<T, T, true> : rms_norm_fwd_kernel<T, T, false>;
      PYLLM_LAUNCH(k, L.grid, L.block, 0, PYLLM_STREAM(), cuda_ptr<scalar_t>(input), res, sum,
                   cuda_ptr<scalar_t>(out), w, rstd.data_ptr<float>(), rows, n, (float)eps, rmode,
                   (float)weight_offset);
    } else {
      auto k = L.warp_per_row ? rms_norm_fwd_kernel<T, float, true> : rms_norm_fwd_kernel<T, float, false>;
      PYLLM_LAUNCH(k, L.grid, L.block, 0, PYLLM_STREAM(), cuda_ptr<scalar_t>(input), res, sum,
                   out.data_ptr<float>(), w, rstd.data_ptr<float>(), rows, n, (float)eps, rmode,
                   (float)weight_offset);
    }
  });
  if (kdt != out_dtype) out = out.to(out_dtype);
  return {out, summed, rstd};
}

}  // namespace

// For the performance model (pyllm/tools/gpu_model_norms.py) and its test: {warp per row, threads
// per row, row held in registers (16-byte aligned tensors)} for rows of n elements of elem_bytes.
std::vector<int64_t> norm_row_plan(int64_t n, int64_t elem_bytes) {
  const RowLaunch L = row_launch(1, n);
  const int size = L.warp_per_row ? kWarpSize : (int)L.block;
  bool regs = false;
  if (elem_bytes == 4) regs = L.warp_per_row ? row_fits_regs<float, true>(n, size) : row_fits_regs<float, false>(n, size);
  if (elem_bytes == 2) regs = L.warp_per_row ? row_fits_regs<__half, true>(n, size) : row_fits_regs<__half, false>(n, size);
  return {L.warp_per_row ? 1 : 0, size, regs ? 1 : 0};
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                            double eps, std::optional<at::ScalarType> round_dtype,
                                            double weight_offset, at::ScalarType out_dtype) {
  auto r = rms_norm_impl(input, at::Tensor(), weight, eps, round_dtype, weight_offset, out_dtype);
  return {std::get<0>(r), std::get<2>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& input, const at::Tensor& residual,
                                                            const std::optional<at::Tensor>& weight, double eps,
                                                            std::optional<at::ScalarType> round_dtype,
                                                            double weight_offset, at::ScalarType out_dtype) {
  return rms_norm_impl(input, residual, weight, eps, round_dtype, weight_offset, out_dtype);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out_,
                                                     const at::Tensor& input_,
                                                     const at::Tensor& rstd_,
                                                     const std::optional<at::Tensor>& weight,
                                                     std::optional<at::ScalarType> round_dtype,
                                                     double weight_offset) {
  check_norm_input(input_);
  check_kernel_device(input_, "input");
  TORCH_CHECK(grad_out_.sizes() == input_.sizes(), "pyllm: grad_out must have shape ",
              input_.sizes(), ", got ", grad_out_.sizes());
  check_norm_param(weight, input_, "weight");
  PYLLM_DEVICE_GUARD(input_);
  const at::Tensor input = input_.contiguous(), rstd = rstd_.contiguous();
  const at::Tensor dy = grad_out_.to(at::kFloat).contiguous();
  const int64_t n = input.size(-1), rows = n ? input.numel() / n : 0;
  const bool has_w = weight.has_value() && weight->defined();
  at::Tensor dx = at::empty_like(input);
  at::Tensor wh;
  const float* w = opt_float(weight, wh);
  const int rmode = round_mode(round_dtype);
  at::Tensor dw;
  PYLLM_DISPATCH_FLOATING(input.scalar_type(), "pyllm_rms_norm_bwd_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    if (rows > 0) {
      const RowLaunch L = row_launch(rows, n);
      auto k = L.warp_per_row ? rms_norm_bwd_dx_kernel<T, true> : rms_norm_bwd_dx_kernel<T, false>;
      PYLLM_LAUNCH(k, L.grid, L.block, 0, PYLLM_STREAM(), dy.data_ptr<float>(),
                   cuda_ptr<scalar_t>(input), rstd.data_ptr<float>(), w, cuda_ptr<scalar_t>(dx),
                   rows, n, (float)weight_offset);
    }
    if (has_w) {
      dw = rows > 0 ? column_grads<scalar_t, float>(dy, input, rstd, rstd, rows, n, 1, rmode)
                          .first.to(weight->scalar_type())
                    : at::zeros({n}, weight->options());
    }
  });
  if (!has_w) dw = at::empty({0}, input.options());
  return {dx, dw};
}

}  // namespace PYLLM_CUDA_NS
}  // namespace pyllm

// torch.ops.pyllm (CUDA key) under nvcc, torch.ops.pyllm_emu (CPU key) under the emulation.
PYLLM_CUDA_LIBRARY_IMPL(m) {
  m.impl("layer_norm", &pyllm::PYLLM_CUDA_NS::layer_norm);
  m.impl("add_layer_norm", &pyllm::PYLLM_CUDA_NS::add_layer_norm);
  m.impl("add_layer_norm_inplace", &pyllm::PYLLM_CUDA_NS::add_layer_norm_inplace);
  m.impl("layer_norm_backward", &pyllm::PYLLM_CUDA_NS::layer_norm_backward);
  m.impl("rms_norm", &pyllm::PYLLM_CUDA_NS::rms_norm);
  m.impl("add_rms_norm", &pyllm::PYLLM_CUDA_NS::add_rms_norm);
  m.impl("rms_norm_backward", &pyllm::PYLLM_CUDA_NS::rms_norm_backward);
}

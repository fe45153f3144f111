// Correct kernels must give the right results in every schedule order and with
// one or several worker threads.
#include "emu_test.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <chrono>
#include <cmath>
#include <thread>

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum_xor(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// out[4 * warp + k]: k=0 xor-sum, 1 down-sum (lane 0), 2 inclusive up-scan at lane 31,
// 3 broadcast of lane 7; per global warp.
__global__ void warp_ops_kernel(const float* __restrict__ in, float* __restrict__ out) {
  const unsigned gtid = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned lane = threadIdx.x % warpSize;
  const unsigned gwarp = gtid / warpSize;
  const float v = in[gtid];
  const float xs = warp_sum_xor(v);
  float ds = v;
  for (int o = 16; o > 0; o >>= 1) ds += __shfl_down_sync(0xffffffffu, ds, o);
  float scan = v;
  for (int o = 1; o < 32; o <<= 1) {
    const float t = __shfl_up_sync(0xffffffffu, scan, o);
    if ((int)lane >= o) scan += t;
  }
  const float b = __shfl_sync(0xffffffffu, v, 7);
  if (lane == 0) {
    out[4 * gwarp + 0] = xs;
    out[4 * gwarp + 1] = ds;
    out[4 * gwarp + 3] = b;
  }
  if (lane == 31) out[4 * gwarp + 2] = scan;
}

// Shuffles with width < 32 and per-type templates.
template <typename T>
__global__ void shfl_width_kernel(const T* in, T* out_idx, T* out_xor, T* out_up, T* out_down) {
  const unsigned t = threadIdx.x;
  const T v = in[t];
  out_idx[t] = __shfl_sync(0xffffffffu, v, 3, 8);    // lane 3 of each 8-lane segment
  out_xor[t] = __shfl_xor_sync(0xffffffffu, v, 4, 8);
  out_up[t] = __shfl_up_sync(0xffffffffu, v, 2, 16);
  out_down[t] = __shfl_down_sync(0xffffffffu, v, 5, 16);
}

__global__ void block_reduce_kernel(const float* __restrict__ in, float* __restrict__ out, int n) {
  __shared__ float s[256];
  const unsigned t = threadIdx.x;
  const unsigned i = blockIdx.x * blockDim.x + t;
  s[t] = (int)i < n ? in[i] : 0.f;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// Two-level reduction: warp shuffles + a shared scratch (like pyllm::block_sum).
__global__ void block_sum_warps_kernel(const float* in, float* out) {
  __shared__ float scratch[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int nwarps = (blockDim.x + 31) / 32;
  float v = warp_sum_xor(in[blockIdx.x * blockDim.x + threadIdx.x]);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  v = warp_sum_xor(v);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// Dynamic shared memory: must be 16-byte aligned and 0xFF-filled on entry.
__global__ void dyn_smem_kernel(const float* in, float* out, int* bad) {
  float* s = pyllm_dynamic_smem<float>();
  const unsigned t = threadIdx.x, n = blockDim.x;
  if (reinterpret_cast<uintptr_t>(s) % 16 != 0) atomicAdd(bad, 1);
  if (__float_as_uint(s[t]) != 0xffffffffu) atomicAdd(bad, 1);
  s[t] = in[blockIdx.x * n + t];
  __syncthreads();
  out[blockIdx.x * n + t] = s[n - 1 - t];  // reverse within the block
}

__global__ void atomics_kernel(int* icount, unsigned* ucount, float* fsum, double* dsum, int* imax, int* imin,
                               unsigned long long* cas_count, int* exch) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(icount, 1);
  atomicAdd(ucount, 2u);
  atomicAdd(fsum, 0.5f);
  atomicAdd(dsum, 0.25);
  atomicMax(imax, g);
  atomicMin(imin, -g);
  unsigned long long old = *cas_count, seen;
  while ((seen = atomicCAS(cas_count, old, old + 1)) != old) old = seen;
  atomicExch(exch, 7);
}

__global__ void grid3d_kernel(unsigned* out, unsigned* dims) {
  const unsigned bx = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned nt = blockDim.x * blockDim.y * blockDim.z;
  const unsigned tx = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned g = bx * nt + tx;
  out[g] = (blockIdx.z << 24) | (blockIdx.y << 16) | (blockIdx.x << 12) | (threadIdx.z << 8) | (threadIdx.y << 4) |
           threadIdx.x;
  if (g == 0) {
    dims[0] = gridDim.x, dims[1] = gridDim.y, dims[2] = gridDim.z;
    dims[3] = blockDim.x, dims[4] = blockDim.y, dims[5] = blockDim.z;
  }
}

__global__ void vote_kernel(unsigned* out) {
  const unsigned t = threadIdx.x, lane = t % 32, w = t / 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, lane % 3 == 0);
  const int any = __any_sync(0xffffffffu, lane == 17);
  const int all = __all_sync(0xffffffffu, lane < 32);
  const int none = __any_sync(0xffffffffu, 0);
  __syncwarp();
  unsigned am = 0;
  if (lane < 10) am = __activemask();  // the converged subset of the warp
  const int cnt = __syncthreads_count(t % 2 == 0);
  const int a = __syncthreads_and(t < 1000);
  const int o = __syncthreads_or(t == 5);
  if (lane == 0) {
    out[w * 8 + 0] = ballot;
    out[w * 8 + 1] = any;
    out[w * 8 + 2] = all;
    out[w * 8 + 3] = none;
    out[w * 8 + 4] = cnt;
    out[w * 8 + 5] = a;
    out[w * 8 + 6] = o;
    out[w * 8 + 7] = am;
  }
}

// Legal divergence: two half-warps use different shuffle sites with their own masks,
// then the full warp reconverges on a third site.
__global__ void split_warp_kernel(float* out) {
  const unsigned lane = threadIdx.x % 32;
  float v = (float)lane;
  if (lane < 16) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0x0000ffffu, v, o);
  } else {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_down_sync(0xffff0000u, v, o, 16);
  }
  const float other = __shfl_xor_sync(0xffffffffu, v, 16);
  out[threadIdx.x] = other;
}

// A half-warp that reads a lane outside its mask gets NaN (undefined in CUDA).
__global__ void out_of_mask_read_kernel(float* out) {
  const unsigned lane = threadIdx.x % 32;
  if (lane < 16) out[lane] = __shfl_sync(0x0000ffffu, 1.0f, 20);
}

__global__ void convert_args_kernel(int n, float* maybe_null, long long big, float* out) {
  out[0] = (float)n;
  out[1] = maybe_null == nullptr ? 1.f : 0.f;
  out[2] = (float)(big >> 32);
}

__global__ void trivial_kernel(int* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = (int)blockIdx.x;
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------
static std::vector<float> iota_floats(size_t n, float scale = 1.f) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = (float)((i * 37) % 101) * scale;
  return v;
}

template <typename F>
static void for_each_config(F f) {
  for (int threads : {1, 2, 3}) {
    pyllm_emu::set_num_threads(threads);
    for (const char* ord : emu_test::orders()) {
      pyllm_emu::set_order(ord);
      f(std::string(ord) + "/threads=" + std::to_string(threads));
    }
  }
  pyllm_emu::set_num_threads(0);
  pyllm_emu::set_order(nullptr);
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------
EMU_TEST(warp_shuffle_reductions) {
  const int blocks = 6, threads = 128, nw = blocks * threads / 32;
  const auto in = iota_floats(blocks * threads);
  for_each_config([&](const std::string& cfg) {
    std::vector<float> out(4 * nw, -1.f);
    auto k = warp_ops_kernel;
    PYLLM_LAUNCH(k, blocks, threads, 0, nullptr, in.data(), out.data());
    for (int w = 0; w < nw; ++w) {
      float s = 0;
      for (int l = 0; l < 32; ++l) s += in[w * 32 + l];
      EMU_CHECK_MSG(out[4 * w + 0] == s, cfg);
      EMU_CHECK_MSG(out[4 * w + 1] == s, cfg);
      EMU_CHECK_MSG(out[4 * w + 2] == s, cfg);
      EMU_CHECK_MSG(out[4 * w + 3] == in[w * 32 + 7], cfg);
    }
  });
}

template <typename T>
static void check_shfl_width(T (*make)(int), double (*val)(T)) {
  std::vector<T> in(32), a(32), b(32), c(32), d(32);
  for (int i = 0; i < 32; ++i) in[i] = make(i + 1);
  auto k = shfl_width_kernel<T>;
  PYLLM_LAUNCH(k, 1, 32, 0, nullptr, in.data(), a.data(), b.data(), c.data(), d.data());
  for (int i = 0; i < 32; ++i) {
    EMU_CHECK(val(a[i]) == val(in[(i & ~7) + 3]));
    EMU_CHECK(val(b[i]) == val(in[i ^ 4]));
    EMU_CHECK(val(c[i]) == val(in[(i % 16) >= 2 ? i - 2 : i]));
    EMU_CHECK(val(d[i]) == val(in[(i % 16) + 5 < 16 ? i + 5 : i]));
  }
}

EMU_TEST(shuffle_width_and_types) {
  for (const char* ord : emu_test::orders()) {
    pyllm_emu::set_order(ord);
    check_shfl_width<int>([](int i) { return -i; }, [](int v) { return (double)v; });
    check_shfl_width<unsigned>([](int i) { return (unsigned)i * 3u; }, [](unsigned v) { return (double)v; });
    check_shfl_width<float>([](int i) { return i * 0.5f; }, [](float v) { return (double)v; });
    check_shfl_width<double>([](int i) { return i * 0.25; }, [](double v) { return v; });
    check_shfl_width<long long>([](int i) { return (long long)i << 40; }, [](long long v) { return (double)v; });
    check_shfl_width<__half>([](int i) { return __float2half(i * 1.5f); },
                             [](__half v) { return (double)__half2float(v); });
    check_shfl_width<__nv_bfloat16>([](int i) { return __float2bfloat16(i * 2.0f); },
                                    [](__nv_bfloat16 v) { return (double)__bfloat162float(v); });
  }
  pyllm_emu::set_order(nullptr);
}

EMU_TEST(block_reduction_shared_memory) {
  const int n = 5000, threads = 256, blocks = (n + threads - 1) / threads;
  const auto in = iota_floats(n);
  for_each_config([&](const std::string& cfg) {
    std::vector<float> out(blocks, -1.f);
    auto k = block_reduce_kernel;
    PYLLM_LAUNCH(k, blocks, threads, 0, nullptr, in.data(), out.data(), n);
    for (int b = 0; b < blocks; ++b) {
      float s = 0;
      for (int i = b * threads; i < std::min(n, (b + 1) * threads); ++i) s += in[i];
      EMU_CHECK_MSG(std::fabs(out[b] - s) <= 1e-3f * std::fabs(s), cfg);
    }
  });
}

EMU_TEST(block_sum_two_level) {
  const int blocks = 20;
  for (int threads : {32, 96, 256, 1024}) {
    const auto in = iota_floats(blocks * threads, 0.25f);
    for_each_config([&](const std::string& cfg) {
      std::vector<float> out(blocks, -1.f);
      auto k = block_sum_warps_kernel;
      PYLLM_LAUNCH(k, blocks, threads, 0, nullptr, in.data(), out.data());
      for (int b = 0; b < blocks; ++b) {
        double s = 0;
        for (int i = 0; i < threads; ++i) s += in[b * threads + i];
        EMU_CHECK_MSG(std::fabs(out[b] - s) <= 1e-4 * s, cfg + " threads/block=" + std::to_string(threads));
      }
    });
  }
}

EMU_TEST(dynamic_shared_memory) {
  const int blocks = 7, threads = 96;
  const auto in = iota_floats(blocks * threads);
  for_each_config([&](const std::string& cfg) {
    std::vector<float> out(blocks * threads, -1.f);
    int bad = 0;
    auto k = dyn_smem_kernel;
    PYLLM_LAUNCH(k, blocks, threads, threads * sizeof(float), nullptr, in.data(), out.data(), &bad);
    EMU_CHECK_MSG(bad == 0, cfg);
    for (int b = 0; b < blocks; ++b)
      for (int t = 0; t < threads; ++t) EMU_CHECK_MSG(out[b * threads + t] == in[b * threads + threads - 1 - t], cfg);
  });
}

EMU_TEST(atomics_across_blocks) {
  const int blocks = 64, threads = 128, n = blocks * threads;
  for_each_config([&](const std::string& cfg) {
    int icount = 0, imax = -1, imin = 1, exch = 0;
    unsigned ucount = 0;
    float fsum = 0.f;
    double dsum = 0.0;
    unsigned long long cas = 0;
    auto k = atomics_kernel;
    PYLLM_LAUNCH(k, blocks, threads, 0, nullptr, &icount, &ucount, &fsum, &dsum, &imax, &imin, &cas, &exch);
    EMU_CHECK_MSG(icount == n, cfg);
    EMU_CHECK_MSG(ucount == 2u * n, cfg);
    EMU_CHECK_MSG(fsum == 0.5f * n, cfg);
    EMU_CHECK_MSG(dsum == 0.25 * n, cfg);
    EMU_CHECK_MSG(imax == n - 1, cfg);
    EMU_CHECK_MSG(imin == -(n - 1), cfg);
    EMU_CHECK_MSG(cas == (unsigned long long)n, cfg);
    EMU_CHECK_MSG(exch == 7, cfg);
  });
}

EMU_TEST(grid_3d) {
  const dim3 grid(3, 4, 5), block(4, 2, 3);
  const unsigned n = 3 * 4 * 5 * 4 * 2 * 3;
  for_each_config([&](const std::string& cfg) {
    std::vector<unsigned> out(n, 0xdeadbeefu), dims(6, 0);
    auto k = grid3d_kernel;
    PYLLM_LAUNCH(k, grid, block, 0, nullptr, out.data(), dims.data());
    unsigned g = 0;
    for (unsigned bz = 0; bz < 5; ++bz)
      for (unsigned by = 0; by < 4; ++by)
        for (unsigned bx = 0; bx < 3; ++bx)
          for (unsigned tz = 0; tz < 3; ++tz)
            for (unsigned ty = 0; ty < 2; ++ty)
              for (unsigned tx = 0; tx < 4; ++tx, ++g)
                EMU_CHECK_MSG(out[g] == ((bz << 24) | (by << 16) | (bx << 12) | (tz << 8) | (ty << 4) | tx), cfg);
    EMU_CHECK(dims[0] == 3 && dims[1] == 4 && dims[2] == 5 && dims[3] == 4 && dims[4] == 2 && dims[5] == 3);
  });
}

EMU_TEST(votes_and_barrier_reductions) {
  for_each_config([&](const std::string& cfg) {
    std::vector<unsigned> out(4 * 8, 0);
    auto k = vote_kernel;
    PYLLM_LAUNCH(k, 1, 128, 0, nullptr, out.data());
    unsigned ballot = 0;
    for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
    for (int w = 0; w < 4; ++w) {
      EMU_CHECK_MSG(out[w * 8 + 0] == ballot, cfg);
      EMU_CHECK_MSG(out[w * 8 + 1] == 1 && out[w * 8 + 2] == 1 && out[w * 8 + 3] == 0, cfg);
      EMU_CHECK_MSG(out[w * 8 + 4] == 64 && out[w * 8 + 5] == 1 && out[w * 8 + 6] == 1, cfg);
      EMU_CHECK_MSG(out[w * 8 + 7] == 0x3ffu, cfg);
    }
  });
}

EMU_TEST(split_warp_reconverges) {
  for_each_config([&](const std::string& cfg) {
    std::vector<float> out(64, -1.f);
    auto k = split_warp_kernel;
    PYLLM_LAUNCH(k, 1, 64, 0, nullptr, out.data());
    // lanes 0-15: sum 0..15 = 120 everywhere; lanes 16-31: down-scan partial sums.
    std::vector<float> v(32);
    for (int l = 0; l < 16; ++l) v[l] = 120.f;
    std::vector<float> hi(16);
    for (int l = 0; l < 16; ++l) hi[l] = 16.f + l;
    for (int o = 8; o > 0; o >>= 1) {
      std::vector<float> nx = hi;
      for (int l = 0; l < 16; ++l) nx[l] = hi[l] + (l + o < 16 ? hi[l + o] : hi[l]);
      hi = nx;
    }
    for (int l = 0; l < 16; ++l) v[16 + l] = hi[l];
    for (int t = 0; t < 64; ++t) EMU_CHECK_MSG(out[t] == v[(t % 32) ^ 16], cfg);
  });
}

EMU_TEST(out_of_mask_read_is_nan) {
  std::vector<float> out(16, 0.f);
  auto k = out_of_mask_read_kernel;
  PYLLM_LAUNCH(k, 1, 32, 0, nullptr, out.data());
  for (float f : out) EMU_CHECK(std::isnan(f));
}

EMU_TEST(argument_conversion) {
  std::vector<float> out(3, 0.f);
  auto k = convert_args_kernel;
  const long n64 = 42;  // converted to the int parameter
  PYLLM_LAUNCH(k, 1, 1, 0, nullptr, n64, nullptr, 5ll << 32, out.data());
  EMU_CHECK(out[0] == 42.f && out[1] == 1.f && out[2] == 5.f);
}

EMU_TEST(concurrent_launches_from_os_threads) {
  pyllm_emu::set_order("random:3");
  std::vector<std::thread> ths;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t)
    ths.emplace_back([t, &ok] {
      const int n = 3000 + 100 * t, threads = 256, blocks = (n + threads - 1) / threads;
      const auto in = iota_floats(n, 1.f + t);
      int good = 1;
      for (int it = 0; it < 10; ++it) {
        std::vector<float> out(blocks);
        auto k = block_reduce_kernel;
        PYLLM_LAUNCH(k, blocks, threads, 0, nullptr, in.data(), out.data(), n);
        for (int b = 0; b < blocks; ++b) {
          float s = 0;
          for (int i = b * threads; i < std::min(n, (b + 1) * threads); ++i) s += in[i];
          if (std::fabs(out[b] - s) > 1e-3f * std::fabs(s)) good = 0;
        }
      }
      ok[t] = good;
    });
  for (auto& th : ths) th.join();
  pyllm_emu::set_order(nullptr);
  for (int t = 0; t < 4; ++t) EMU_CHECK(ok[t] == 1);
}

EMU_TEST(launch_speed_64x128) {
  std::vector<int> out(64, -1);
  auto k = trivial_kernel;
  PYLLM_LAUNCH(k, 64, 128, 0, nullptr, out.data());  // warm-up (stacks, pool)
  double best = 1e9;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    PYLLM_LAUNCH(k, 64, 128, 0, nullptr, out.data());
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::printf("       64x128 trivial launch: %.2f ms\n", best);
  for (int b = 0; b < 64; ++b) EMU_CHECK(out[b] == b);
  EMU_CHECK(best < 500.0);  // generous: sanitizer builds are much slower
}

int main(int argc, char** argv) { return emu_test::run_all(argc, argv); }

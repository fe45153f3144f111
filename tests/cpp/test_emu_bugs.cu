// Planted kernel bugs that the emulator must catch. Each test checks that the
// launch throws with a message naming the problem and the offending source line
// (or, for the missing barrier, that results are wrong under some order).
#include "emu_test.h"

#include <cmath>
#include <string>

static std::string at(int line) { return std::string("test_emu_bugs.cu:") + std::to_string(line); }

// A correct kernel, launched after each failure to check the emulator recovered.
__global__ void healthy_kernel(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = (float)threadIdx.x;
  __syncthreads();
  float v = s[63 - threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = v;
}
static void check_recovered() {
  float out[2] = {0, 0};
  auto k = healthy_kernel;
  PYLLM_LAUNCH(k, 1, 64, 0, nullptr, out);
  EMU_CHECK(out[0] == (63 + 32) * 16.f && out[1] == (31 + 0) * 16.f);
}

// ---------------------------------------------------------------------------
// 1. Early return before a __syncthreads.
// ---------------------------------------------------------------------------
static const int kEarlyReturnBarrierLine = __LINE__ + 7;
__global__ void early_return_kernel(const float* in, float* out, int n) {
  __shared__ float s[128];
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  if (i >= n) return;  // BUG: the threads past n never reach the barrier
  s[t] = in[i];
  __syncthreads();
  out[i] = s[(t + 1) % blockDim.x];
}

EMU_TEST(early_return_before_barrier) {
  std::vector<float> in(200, 1.f), out(200);
  for (const char* ord : emu_test::orders()) {
    pyllm_emu::set_order(ord);
    auto k = early_return_kernel;
    EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 2, 128, 0, nullptr, in.data(), out.data(), 200), "early_return_kernel",
                     "test_emu_bugs.cu:" /* launch site */, at(kEarlyReturnBarrierLine), "block (1,0,0)",
                     "have already exited", "threads 72-127", "threads 0-71");
    check_recovered();
  }
  pyllm_emu::set_order(nullptr);
}

// ---------------------------------------------------------------------------
// 2. __syncthreads in divergent branches (two different call sites).
// ---------------------------------------------------------------------------
static const int kDivergentLineA = __LINE__ + 6;
static const int kDivergentLineB = __LINE__ + 8;
__global__ void divergent_barrier_kernel(float* out) {
  __shared__ float s[64];
  if (threadIdx.x < 16) {
    s[threadIdx.x] = 1.f;
    __syncthreads();  // BUG: two different barriers
  } else {
    s[threadIdx.x] = 2.f;
    __syncthreads();
  }
  out[threadIdx.x] = s[63 - threadIdx.x];
}

EMU_TEST(divergent_barriers) {
  std::vector<float> out(64);
  for (const char* ord : emu_test::orders()) {
    pyllm_emu::set_order(ord);
    auto k = divergent_barrier_kernel;
    EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 1, 64, 0, nullptr, out.data()), "divergent barrier", at(kDivergentLineA),
                     at(kDivergentLineB), "threads 0-15", "threads 16-63");
    check_recovered();
  }
  pyllm_emu::set_order(nullptr);
}

// ---------------------------------------------------------------------------
// 3. Half-warp shuffle with a full mask.
// ---------------------------------------------------------------------------
static const int kHalfWarpLine = __LINE__ + 6;
__global__ void half_warp_full_mask_kernel(const float* in, float* out) {
  const unsigned lane = threadIdx.x % 32;
  float v = in[threadIdx.x];
  if (lane < 16) {
    for (int o = 8; o > 0; o >>= 1)
      v += __shfl_xor_sync(0xffffffffu, v, o);  // BUG: only 16 lanes participate
    if (lane == 0) out[threadIdx.x / 32] = v;
  }
}

// Same bug, but the other half-warp is busy at a barrier instead of exiting.
static const int kHalfWarpBarrierLine = __LINE__ + 7;
__global__ void half_warp_vs_barrier_kernel(float* out) {
  const unsigned lane = threadIdx.x % 32;
  float v = 1.f;
  if (lane < 16) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  __syncthreads();
  out[threadIdx.x] = v;
}

// Lanes named in the mask sit at a different intrinsic.
__global__ void mismatched_intrinsics_kernel(float* out) {
  const unsigned lane = threadIdx.x % 32;
  float v = 1.f;
  if (lane < 16)
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  else
    v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

EMU_TEST(half_warp_shuffle_with_full_mask) {
  std::vector<float> in(64, 1.f), out(64);
  for (const char* ord : emu_test::orders()) {
    pyllm_emu::set_order(ord);
    auto k = half_warp_full_mask_kernel;
    EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 1, 64, 0, nullptr, in.data(), out.data()), "__shfl_xor_sync",
                     at(kHalfWarpLine), "0xffffffff", "lanes 0-15", "lanes 16-31 named in the mask have exited",
                     "half_warp_full_mask_kernel");
    auto k2 = half_warp_vs_barrier_kernel;
    EMU_EXPECT_THROW(PYLLM_LAUNCH(k2, 1, 32, 0, nullptr, out.data()), "lanes 16-31 named in the mask",
                     "are waiting at __syncthreads at", at(kHalfWarpBarrierLine));
    auto k3 = mismatched_intrinsics_kernel;
    EMU_EXPECT_THROW(PYLLM_LAUNCH(k3, 1, 32, 0, nullptr, out.data()), "warp rendezvous failed", "__shfl_down_sync",
                     "__shfl_xor_sync");
    check_recovered();
  }
  pyllm_emu::set_order(nullptr);
}

// A lane calling a *_sync intrinsic with a mask that does not include itself.
__global__ void own_lane_not_in_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, 1.f, 0);
}

// A full-mask shuffle in a block whose last warp is partial.
__global__ void partial_warp_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

EMU_TEST(bad_masks) {
  std::vector<float> out(64);
  auto k = own_lane_not_in_mask_kernel;
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 1, 32, 0, nullptr, out.data()), "does not include itself", "0x00000001");
  auto k2 = partial_warp_kernel;
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k2, 1, 48, 0, nullptr, out.data()), "lanes 16-31 named in the mask do not exist");
  check_recovered();
}

// ---------------------------------------------------------------------------
// 4. Missing __syncthreads between a shared-memory write and read.
// ---------------------------------------------------------------------------
__global__ void neighbour_kernel(const float* in, float* out, bool with_barrier) {
  __shared__ float s[128];
  const unsigned t = threadIdx.x;
  s[t] = in[blockIdx.x * blockDim.x + t];
  if (with_barrier) __syncthreads();  // uniform condition: fine
  out[blockIdx.x * blockDim.x + t] = s[(t + 1) % blockDim.x];
}

__global__ void tree_reduce_kernel(const float* in, float* out, bool with_barrier) {
  __shared__ float s[128];
  const unsigned t = threadIdx.x;
  s[t] = in[blockIdx.x * blockDim.x + t];
  if (with_barrier) __syncthreads();  // BUG when false: first level reads unwritten slots
  for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

EMU_TEST(missing_barrier_gives_wrong_results) {
  const int blocks = 4, threads = 128, n = blocks * threads;
  std::vector<float> in(n);
  for (int i = 0; i < n; ++i) in[i] = (float)(i % 97) + 1.f;
  auto run = [&](bool barrier, const char* ord, bool tree) {
    pyllm_emu::set_order(ord);
    std::vector<float> out(n, 0.f);
    bool right = true;
    if (tree) {
      auto k = tree_reduce_kernel;
      PYLLM_LAUNCH(k, blocks, threads, 0, nullptr, in.data(), out.data(), barrier);
      for (int b = 0; b < blocks; ++b) {
        float s = 0;
        for (int t = 0; t < threads; ++t) s += in[b * threads + t];
        right = right && out[b] == s;
      }
    } else {
      auto k = neighbour_kernel;
      PYLLM_LAUNCH(k, blocks, threads, 0, nullptr, in.data(), out.data(), barrier);
      for (int b = 0; b < blocks; ++b)
        for (int t = 0; t < threads; ++t) right = right && out[b * threads + t] == in[b * threads + (t + 1) % threads];
    }
    return right;
  };
  for (bool tree : {false, true}) {
    int wrong_orders = 0;
    for (const char* ord : emu_test::orders()) {
      EMU_CHECK_MSG(run(true, ord, tree), std::string("with barrier, order ") + ord);
      if (!run(false, ord, tree)) ++wrong_orders;
    }
    EMU_CHECK_MSG(wrong_orders >= 1, tree ? "tree reduction" : "neighbour exchange");
  }
  pyllm_emu::set_order(nullptr);
}

// 5. Missing __syncthreads before a shared tile is overwritten, where every warp reaches the
// write through warp collectives: run in step (forward / reverse order) every warp reads the
// tile before any warp writes it, which hides the bug; on a GPU a warp may run ahead to its
// write. The random order runs the warps of a block one at a time between barriers, so the
// first warp's write lands before the other warps read.
__global__ void reuse_tile_kernel(const float* in, float* out, bool with_barrier) {
  __shared__ float s[128];
  const unsigned t = threadIdx.x, lane = t % 32, w = t / 32;
  s[t] = in[blockIdx.x * blockDim.x + t];
  __syncthreads();
  float total = 0.f;
  for (int r = 0; r < 4; ++r) {  // every warp sums the whole tile, a warp reduction per 32 values
    float v = s[r * 32 + lane];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    total += v;
  }
  if (with_barrier) __syncthreads();  // BUG when false: the tile is overwritten while others read it
  s[t] = total + (float)w;
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = s[(t + 32) % 128];
}

EMU_TEST(missing_barrier_between_warps_shows_in_random_order) {
  const int blocks = 3, threads = 128, n = blocks * threads;
  std::vector<float> in(n);
  for (int i = 0; i < n; ++i) in[i] = (float)(i % 13);
  auto right = [&](bool barrier, const char* ord) {
    pyllm_emu::set_order(ord);
    std::vector<float> out(n, -1.f);
    auto k = reuse_tile_kernel;
    PYLLM_LAUNCH(k, blocks, threads, 0, nullptr, in.data(), out.data(), barrier);
    bool ok = true;
    for (int b = 0; b < blocks; ++b) {
      float total = 0.f;
      for (int t = 0; t < threads; ++t) total += in[b * threads + t];
      for (int t = 0; t < threads; ++t) ok = ok && out[b * threads + t] == total + (float)(((t + 32) % 128) / 32);
    }
    return ok;
  };
  for (const char* ord : emu_test::orders()) EMU_CHECK_MSG(right(true, ord), std::string("with barrier, order ") + ord);
  for (const char* ord : {"random:1", "random:12345"})
    EMU_CHECK_MSG(!right(false, ord), std::string("missing barrier not exposed, order ") + ord);
  pyllm_emu::set_order(nullptr);
}

// ---------------------------------------------------------------------------
// Other errors: traps, nested launches, bad configurations, bad env values.
// ---------------------------------------------------------------------------
__global__ void trap_kernel(int* p) {
  if (threadIdx.x == 5 && blockIdx.x == 1) __trap();
  p[0] = 1;
}
__global__ void nested_launch_kernel(int* p) {
  auto k = trap_kernel;
  PYLLM_LAUNCH(k, 1, 1, 0, nullptr, p);
}

EMU_TEST(trap_nested_and_config_errors) {
  int x = 0;
  auto k = trap_kernel;
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 2, 32, 0, nullptr, &x), "__trap", "block (1,0,0)", "thread 5");
  auto k2 = nested_launch_kernel;
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k2, 1, 1, 0, nullptr, &x), "launch from device code");
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 1, 2048, 0, nullptr, &x), "invalid configuration", "1024");
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 0, 32, 0, nullptr, &x), "invalid configuration");
  EMU_EXPECT_THROW(pyllm_emu::set_order("sideways"), "bad schedule order");
  check_recovered();
}

int main(int argc, char** argv) { return emu_test::run_all(argc, argv); }

// UBSan build (-fsanitize=undefined,bounds): a kernel writes past the end of a
// __shared__ array. The ctest passes only if UBSan reports it.
#include "emu_test.h"

__global__ void shared_overflow_kernel(const float* in, float* out) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t + 1] = in[t];  // BUG: thread 63 writes s[64]
  __syncthreads();
  out[t] = s[t];
}

int main() {
  std::vector<float> in(64, 1.f), out(64);
  auto k = shared_overflow_kernel;
  PYLLM_LAUNCH(k, 1, 64, 0, nullptr, in.data(), out.data());
  std::printf("no error detected (%f)\n", out[0]);
  return 0;
}

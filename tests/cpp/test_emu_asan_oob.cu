// ASan build: kernels that read past the end of a buffer.
//   (no argument)  one element past the end of a global (heap) buffer
//   dynsmem        one element past the end of the dynamic shared memory
// The ctests pass only if AddressSanitizer reports it (PASS_REGULAR_EXPRESSION).
#include "emu_test.h"

__global__ void read_past_end_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) atomicAdd(out, in[i]);  // BUG: `<=` reads in[n]
}

__global__ void dynamic_smem_overflow_kernel(float* out) {
  float* s = pyllm_dynamic_smem<float>();  // blockDim.x floats
  s[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x + 1];  // BUG: the last thread reads s[blockDim.x]
}

int main(int argc, char** argv) {
  const int n = 256;
  float* in = new float[n];
  for (int i = 0; i < n; ++i) in[i] = 1.f;
  float out[n] = {};
  if (argc > 1 && std::string(argv[1]) == "dynsmem") {
    auto k = dynamic_smem_overflow_kernel;
    PYLLM_LAUNCH(k, 1, 100, 100 * sizeof(float), nullptr, out);
  } else {
    auto k = read_past_end_kernel;
    PYLLM_LAUNCH(k, 2, 256, 0, nullptr, in, out, n);
  }
  std::printf("no error detected (%f)\n", out[0]);
  delete[] in;
  return 0;
}

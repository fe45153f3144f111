// The emulated tensor-core and async-copy instructions (csrc/include/pyllm/tensor_core.cuh ->
// csrc/emulation) held against the PTX ISA, independently of any pyllm kernel:
//  - mma.m16n8k16: every element of A and B probed one at a time (one-hot), and a dense product,
//    with the fragment layouts transcribed here from the ISA's figures ("Matrix fragments for
//    mma.m16n8k16 with floating point type"), written per register rather than as the emulator's
//    formulas, so a shared misreading would have to be made twice in two different forms;
//  - ldmatrix .x1/.x2/.x4 and .trans: which lane receives which element, rows at scattered addresses;
//  - cp.async: data lands only at a wait_group that covers its group, wait_group N leaves the N most
//    recent groups in flight, zero-fill, and the argument rules;
// and planted bugs that must be caught: a wrong fragment index, a missing wait_group, a missing
// __syncthreads between the cp.async of one tile and the reads of the previous one, an ldmatrix on
// an unaligned address.
#include "emu_test.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstring>
#include <string>

#include "pyllm/tensor_core.cuh"

using pyllm::tc::mma_m16n8k16;

// ------------------------------------------------------------------ the ISA's tables, per register
// A (16x16, .row), a0..a7 in registers {a0,a1}, {a2,a3}, {a4,a5}, {a6,a7}; groupID = lane >> 2,
// threadID_in_group = lane % 4:
//   a0, a1: (groupID,     2*tig + 0/1)      a2, a3: (groupID + 8, 2*tig + 0/1)
//   a4, a5: (groupID,     2*tig + 8 + 0/1)  a6, a7: (groupID + 8, 2*tig + 8 + 0/1)
static void isa_a(int lane, int i, int* row, int* col) {
  const int g = lane >> 2, t = lane % 4;
  switch (i) {
    case 0: *row = g; *col = 2 * t; break;
    case 1: *row = g; *col = 2 * t + 1; break;
    case 2: *row = g + 8; *col = 2 * t; break;
    case 3: *row = g + 8; *col = 2 * t + 1; break;
    case 4: *row = g; *col = 2 * t + 8; break;
    case 5: *row = g; *col = 2 * t + 9; break;
    case 6: *row = g + 8; *col = 2 * t + 8; break;
    default: *row = g + 8; *col = 2 * t + 9; break;
  }
}
// B (16x8, .col), b0..b3 in registers {b0,b1}, {b2,b3}:
//   b0, b1: (row k = 2*tig + 0/1, col n = groupID)   b2, b3: (k = 2*tig + 8 + 0/1, n = groupID)
static void isa_b(int lane, int i, int* k, int* n) {
  const int g = lane >> 2, t = lane % 4;
  *n = g;
  *k = (i == 0) ? 2 * t : (i == 1) ? 2 * t + 1 : (i == 2) ? 2 * t + 8 : 2 * t + 9;
}
// C/D (16x8, f32), c0..c3:  c0, c1: (groupID, 2*tig + 0/1)   c2, c3: (groupID + 8, 2*tig + 0/1)
static void isa_c(int lane, int i, int* row, int* col) {
  const int g = lane >> 2, t = lane % 4;
  *row = (i < 2) ? g : g + 8;
  *col = 2 * t + (i & 1);
}

// ------------------------------------------------------------------ mma kernels
// `a_bug`: planted wrong fragment index (a2/a3 taken from row groupID instead of groupID + 8).
template <typename T>
__global__ void mma_kernel(const uint16_t* A, const uint16_t* B, const float* C, float* D, int a_bug) {
  const int lane = threadIdx.x;
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int r = 0; r < 4; ++r) {
    uint32_t lo, hi;
    int row, col;
    isa_a(lane, 2 * r, &row, &col);
    if (a_bug && r == 1) row -= 8;
    lo = A[row * 16 + col];
    isa_a(lane, 2 * r + 1, &row, &col);
    if (a_bug && r == 1) row -= 8;
    hi = A[row * 16 + col];
    a[r] = lo | (hi << 16);
  }
  for (int r = 0; r < 2; ++r) {
    int k0, n0, k1, n1;
    isa_b(lane, 2 * r, &k0, &n0);
    isa_b(lane, 2 * r + 1, &k1, &n1);
    b[r] = (uint32_t)B[k0 * 8 + n0] | ((uint32_t)B[k1 * 8 + n1] << 16);
  }
  for (int i = 0; i < 4; ++i) {
    int row, col;
    isa_c(lane, i, &row, &col);
    c[i] = C[row * 8 + col];
  }
  mma_m16n8k16<T>(d, a, b, c);
  for (int i = 0; i < 4; ++i) {
    int row, col;
    isa_c(lane, i, &row, &col);
    D[row * 8 + col] = d[i];
  }
}

template <typename T>
static uint16_t bits_of(float v) {
  T h = T(v);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

template <typename T>
static std::vector<float> run_mma(const std::vector<float>& A, const std::vector<float>& B,
                                  const std::vector<float>& C, int a_bug = 0) {
  std::vector<uint16_t> a(256), b(128);
  for (int i = 0; i < 256; ++i) a[i] = bits_of<T>(A[i]);
  for (int i = 0; i < 128; ++i) b[i] = bits_of<T>(B[i]);
  std::vector<float> d(128, -1.f);
  auto k = mma_kernel<T>;
  PYLLM_LAUNCH(k, 1, 32, 0, nullptr, a.data(), b.data(), C.data(), d.data(), a_bug);
  return d;
}

static std::vector<float> matmul(const std::vector<float>& A, const std::vector<float>& B, const std::vector<float>& C) {
  std::vector<float> D(128);
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n) {
      double acc = C[r * 8 + n];
      for (int k = 0; k < 16; ++k) acc += (double)A[r * 16 + k] * B[k * 8 + n];
      D[r * 8 + n] = (float)acc;
    }
  return D;
}

template <typename T>
static void mma_one_hot_probes() {
  // A = e(r, c), B[k][n] = 1 + k * 8 + n: D row r is B's row c, every other row 0.
  std::vector<float> B(128), C(128, 0.f);
  for (int i = 0; i < 128; ++i) B[i] = (float)(1 + i);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      std::vector<float> A(256, 0.f);
      A[r * 16 + c] = 1.f;
      const auto D = run_mma<T>(A, B, C);
      for (int rr = 0; rr < 16; ++rr)
        for (int n = 0; n < 8; ++n)
          EMU_CHECK_MSG(D[rr * 8 + n] == (rr == r ? B[c * 8 + n] : 0.f),
                        "A element (" + std::to_string(r) + "," + std::to_string(c) + "): D(" + std::to_string(rr) +
                            "," + std::to_string(n) + ") = " + std::to_string(D[rr * 8 + n]));
    }
  // B = e(k, n), A[r][c] = 1 + r * 16 + c: D column n is A's column k.
  std::vector<float> A(256);
  for (int i = 0; i < 256; ++i) A[i] = (float)(1 + i % 200);  // exact in bf16 too (< 256)
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 8; ++n) {
      std::vector<float> Bk(128, 0.f);
      Bk[k * 8 + n] = 1.f;
      const auto D = run_mma<T>(A, Bk, C);
      for (int r = 0; r < 16; ++r)
        for (int nn = 0; nn < 8; ++nn)
          EMU_CHECK_MSG(D[r * 8 + nn] == (nn == n ? A[r * 16 + k] : 0.f),
                        "B element (" + std::to_string(k) + "," + std::to_string(n) + ")");
    }
  // C passes through each D position: C[r][n] = r * 8 + n with A = 0.
  std::vector<float> Cr(128), Z(256, 0.f);
  for (int i = 0; i < 128; ++i) Cr[i] = (float)i;
  const auto D = run_mma<T>(Z, B, Cr);
  for (int i = 0; i < 128; ++i) EMU_CHECK(D[i] == Cr[i]);
}

EMU_TEST(mma_f16_fragments_match_isa_element_by_element) { mma_one_hot_probes<__half>(); }
EMU_TEST(mma_bf16_fragments_match_isa_element_by_element) { mma_one_hot_probes<__nv_bfloat16>(); }

static void dense_operands(std::vector<float>& A, std::vector<float>& B, std::vector<float>& C) {
  A.resize(256);
  B.resize(128);
  C.resize(128);
  for (int i = 0; i < 256; ++i) A[i] = (float)((i * 7) % 17 - 8);
  for (int i = 0; i < 128; ++i) B[i] = (float)((i * 5) % 13 - 6);
  for (int i = 0; i < 128; ++i) C[i] = 0.25f * (float)(i % 11);
}

EMU_TEST(mma_dense_product_is_exact_and_a_wrong_fragment_index_is_caught) {
  std::vector<float> A, B, C;
  dense_operands(A, B, C);
  const auto want = matmul(A, B, C);
  EMU_CHECK(run_mma<__half>(A, B, C) == want);
  EMU_CHECK(run_mma<__nv_bfloat16>(A, B, C) == want);
  // Planted: a2/a3 loaded from the wrong row. The product must come out wrong.
  EMU_CHECK(run_mma<__half>(A, B, C, /*a_bug=*/1) != want);
}

EMU_TEST(mma_rounds_the_exact_sum_once) {
  // 1 + 2^-24 * 16 terms: fp32 sequential accumulation from C = 1 would lose every term (each is
  // half an ulp of 1); the exact sum rounds to 1 + 2^-20.
  std::vector<float> A(256, 0.f), B(128, 0.f), C(128, 1.f);
  for (int c = 0; c < 16; ++c) A[c] = std::ldexp(1.f, -12);
  for (int k = 0; k < 16; ++k) B[k * 8] = std::ldexp(1.f, -12);
  const auto D = run_mma<__half>(A, B, C);
  EMU_CHECK(D[0] == 1.f + std::ldexp(1.f, -20));
}

// A lane that skips the mma: the warp-collective can never complete.
static const int kMmaDivergentLine = __LINE__ + 5;
__global__ void mma_divergent_kernel(float* out) {
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0, 0, 0, 0}, d[4] = {0, 0, 0, 0};
  if (threadIdx.x != 5) {
    mma_m16n8k16<__half>(d, a, b, c);
  }
  out[threadIdx.x] = d[0];
}

EMU_TEST(mma_needs_every_lane) {
  std::vector<float> out(32);
  auto k = mma_divergent_kernel;
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 1, 32, 0, nullptr, out.data()), "mma.sync",
                   "test_emu_tensorcore.cu:" + std::to_string(kMmaDivergentLine));
}

// ------------------------------------------------------------------ ldmatrix
// Shared memory: matrix m's row r lives at 16-byte slot perm(m * 8 + r) (scattered), element c of
// it holds the value m * 64 + r * 8 + c.
static int slot_of(int mr) { return (mr * 13 + 5) % 32; }

template <int NUM, bool TRANS>
__global__ void ldmatrix_kernel(uint32_t* out) {
  uint16_t* sm = pyllm_dynamic_smem<uint16_t>();
  const int lane = threadIdx.x;
  for (int c = 0; c < 8; ++c) sm[slot_of(lane) * 8 + c] = (uint16_t)((lane / 8) * 64 + (lane % 8) * 8 + c);
  __syncthreads();
  uint32_t r[NUM];
  const void* p = sm + slot_of(lane % (8 * NUM)) * 8;  // lanes 8i..8i+7: rows of matrix i
  if constexpr (NUM == 1) {
    if constexpr (TRANS) pyllm::tc::ldmatrix_x1_trans(r, p);
    else pyllm::tc::ldmatrix_x1(r, p);
  } else if constexpr (NUM == 2) {
    if constexpr (TRANS) pyllm::tc::ldmatrix_x2_trans(r, p);
    else pyllm::tc::ldmatrix_x2(r, p);
  } else {
    if constexpr (TRANS) pyllm::tc::ldmatrix_x4_trans(r, p);
    else pyllm::tc::ldmatrix_x4(r, p);
  }
  for (int i = 0; i < NUM; ++i) out[lane * 4 + i] = r[i];
}

template <int NUM, bool TRANS>
static void check_ldmatrix() {
  std::vector<uint32_t> out(128, 0xdeadbeefu);
  auto k = ldmatrix_kernel<NUM, TRANS>;
  PYLLM_LAUNCH(k, 1, 32, 32 * 16, nullptr, out.data());
  // ISA: without .trans, lane l holds (row l/4, cols 2(l%4), 2(l%4)+1) of each matrix; with .trans
  // it holds (rows 2(l%4), 2(l%4)+1, col l/4): the element pair of the transposed matrix.
  for (int l = 0; l < 32; ++l)
    for (int m = 0; m < NUM; ++m) {
      uint32_t lo, hi;
      if (!TRANS) {
        lo = m * 64 + (l / 4) * 8 + 2 * (l % 4);
        hi = lo + 1;
      } else {
        lo = m * 64 + (2 * (l % 4)) * 8 + l / 4;
        hi = lo + 8;
      }
      EMU_CHECK_MSG(out[l * 4 + m] == (lo | (hi << 16)),
                    "x" + std::to_string(NUM) + (TRANS ? ".trans" : "") + " lane " + std::to_string(l) +
                        " reg " + std::to_string(m));
    }
}

EMU_TEST(ldmatrix_x1_layout) { check_ldmatrix<1, false>(); }
EMU_TEST(ldmatrix_x2_layout) { check_ldmatrix<2, false>(); }
EMU_TEST(ldmatrix_x4_layout) { check_ldmatrix<4, false>(); }
EMU_TEST(ldmatrix_x1_trans_layout) { check_ldmatrix<1, true>(); }
EMU_TEST(ldmatrix_x2_trans_layout) { check_ldmatrix<2, true>(); }
EMU_TEST(ldmatrix_x4_trans_layout) { check_ldmatrix<4, true>(); }

static const int kLdmatrixUnalignedLine = __LINE__ + 5;
__global__ void ldmatrix_unaligned_kernel(uint32_t* out, int offset_bytes) {
  unsigned char* sm = pyllm_dynamic_smem<unsigned char>();
  uint32_t r[4];
  const unsigned char* p = sm + (threadIdx.x % 32) * 16 + (threadIdx.x == 9 ? offset_bytes : 0);
  pyllm::tc::ldmatrix_x4(r, p);
  out[threadIdx.x] = r[0];
}

EMU_TEST(ldmatrix_unaligned_or_outside_shared_is_an_error) {
  std::vector<uint32_t> out(32);
  auto k = ldmatrix_unaligned_kernel;
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 1, 32, 32 * 16 + 64, nullptr, out.data(), 4), "ldmatrix",
                   "test_emu_tensorcore.cu:" + std::to_string(kLdmatrixUnalignedLine), "lane 9",
                   "not 16-byte aligned");
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 1, 32, 32 * 16, nullptr, out.data(), 4096), "ldmatrix", "lane 9",
                   "not inside the block's dynamic shared memory");
  PYLLM_LAUNCH(k, 1, 32, 32 * 16, nullptr, out.data(), 0);  // the aligned control runs
}

// ------------------------------------------------------------------ cp.async
__global__ void cp_async_lands_at_wait_kernel(const float* g, float* before, float* after, int* pending) {
  float* sm = pyllm_dynamic_smem<float>();
  const int t = threadIdx.x;
  for (int i = 0; i < 4; ++i) sm[t * 4 + i] = -1.f;
  pyllm::tc::cp_async_cg16(sm + t * 4, g + t * 4);
  pyllm::tc::cp_async_commit();
  before[t] = sm[t * 4 + 1];  // issued and committed, not waited for: the old contents
  pending[t] = pyllm_emu::cp_async_pending_groups();
  pyllm::tc::cp_async_wait<0>();
  after[t] = sm[t * 4 + 1];
}

EMU_TEST(cp_async_data_lands_only_at_wait_group) {
  std::vector<float> g(64), before(16), after(16);
  std::vector<int> pending(16);
  for (int i = 0; i < 64; ++i) g[i] = (float)i;
  for (const char* ord : emu_test::orders()) {
    pyllm_emu::set_order(ord);
    auto k = cp_async_lands_at_wait_kernel;
    PYLLM_LAUNCH(k, 1, 16, 64 * 4, nullptr, g.data(), before.data(), after.data(), pending.data());
    for (int t = 0; t < 16; ++t) {
      EMU_CHECK(before[t] == -1.f);
      EMU_CHECK(pending[t] == 1);
      EMU_CHECK(after[t] == (float)(t * 4 + 1));
    }
  }
  pyllm_emu::set_order(nullptr);
}

__global__ void cp_async_groups_kernel(const int* g, int* seen) {
  int* sm = pyllm_dynamic_smem<int>();
  for (int i = 0; i < 12; ++i) sm[i] = -1;
  for (int grp = 0; grp < 3; ++grp) {
    pyllm::tc::cp_async_ca<16>(sm + grp * 4, g + grp * 4);
    pyllm::tc::cp_async_commit();
  }
  pyllm::tc::cp_async_ca<4>(sm + 12, g + 12);  // issued, never committed: no wait_group covers it
  pyllm::tc::cp_async_wait<1>();                 // all but the most recent committed group
  for (int i = 0; i < 13; ++i) seen[i] = sm[i];
  pyllm::tc::cp_async_wait<0>();
  for (int i = 0; i < 13; ++i) seen[13 + i] = sm[i];
  pyllm::tc::cp_async_wait_all();  // commit + wait 0: lands the open copy too
  seen[26] = sm[12];
}

EMU_TEST(cp_async_wait_group_n_leaves_the_n_most_recent_groups) {
  std::vector<int> g(16), seen(27);
  for (int i = 0; i < 16; ++i) g[i] = 100 + i;
  auto k = cp_async_groups_kernel;
  PYLLM_LAUNCH(k, 1, 1, 16 * 4, nullptr, g.data(), seen.data());
  for (int i = 0; i < 8; ++i) EMU_CHECK(seen[i] == 100 + i);   // groups 0 and 1 landed
  for (int i = 8; i < 13; ++i) EMU_CHECK(seen[i] == -1);       // group 2 and the open copy did not
  for (int i = 0; i < 12; ++i) EMU_CHECK(seen[13 + i] == 100 + i);
  EMU_CHECK(seen[25] == -1);                                   // wait_group does not cover uncommitted copies
  EMU_CHECK(seen[26] == 112);
}

__global__ void cp_async_zero_fill_kernel(const unsigned char* g, unsigned char* out) {
  unsigned char* sm = pyllm_dynamic_smem<unsigned char>();
  for (int i = 0; i < 48; ++i) sm[i] = 0xAA;
  pyllm::tc::cp_async_cg16(sm, g, 16);
  pyllm::tc::cp_async_cg16(sm + 16, g + 16, 4);     // 4 bytes then 12 zeros
  pyllm::tc::cp_async_ca<8>(sm + 32, nullptr, 0);   // src-size 0: all zeros, nothing read
  pyllm::tc::cp_async_wait_all();
  for (int i = 0; i < 48; ++i) out[i] = sm[i];
}

EMU_TEST(cp_async_zero_fill) {
  std::vector<unsigned char> g(32), out(48);
  for (int i = 0; i < 32; ++i) g[i] = (unsigned char)(i + 1);
  auto k = cp_async_zero_fill_kernel;
  PYLLM_LAUNCH(k, 1, 1, 48, nullptr, g.data(), out.data());
  for (int i = 0; i < 16; ++i) EMU_CHECK(out[i] == i + 1);
  for (int i = 16; i < 20; ++i) EMU_CHECK(out[i] == i + 1);
  for (int i = 20; i < 40; ++i) EMU_CHECK(out[i] == 0);
  for (int i = 40; i < 48; ++i) EMU_CHECK(out[i] == 0xAA);
}

__global__ void cp_async_bad_kernel(const float* g, int which) {
  unsigned char* sm = pyllm_dynamic_smem<unsigned char>();
  if (which == 0) pyllm::tc::cp_async_cg16(sm + 8, g);                   // dst not 16-aligned
  if (which == 1) pyllm_emu::cp_async(sm, g, 8, 8, true, __FILE__, __LINE__, 0);  // .cg copies 16 only
  if (which == 2) pyllm::tc::cp_async_ca<16>(sm + 64, g);                // past the dynamic smem
  if (which == 3) pyllm::tc::cp_async_ca<4>(sm, g, 5);                   // src-size > cp-size
}

EMU_TEST(cp_async_argument_rules) {
  std::vector<float> g(16);
  auto k = cp_async_bad_kernel;
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 1, 1, 64, nullptr, g.data(), 0), "cp.async.cg", "aligned to cp-size 16");
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 1, 1, 64, nullptr, g.data(), 1), "cp.async.cg", "cp-size must be 16");
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 1, 1, 64, nullptr, g.data(), 2), "cp.async.ca",
                   "not inside the block's dynamic shared memory");
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 1, 1, 64, nullptr, g.data(), 3), "src-size 5");
}

// ------------------------------------------------------------------ planted pipeline bugs
// Sums tiles of 64 floats: each of 64 threads copies one element of tile t into one shared
// buffer, then reads its mirror element (63 - t): a cross-thread read through shared memory.
template <bool kWait, bool kTrailingSync>
__global__ void tiled_sum_kernel(const float* g, int tiles, float* out) {
  float* buf = pyllm_dynamic_smem<float>();
  const int t = threadIdx.x;
  float acc = 0.f;
  for (int i = 0; i < tiles; ++i) {
    pyllm::tc::cp_async_ca<4>(buf + t, g + i * 64 + t);
    pyllm::tc::cp_async_commit();
    if (kWait) pyllm::tc::cp_async_wait<0>();  // planted bug when false: no wait_group
    __syncthreads();
    acc += buf[63 - t];
    if (kTrailingSync) __syncthreads();  // planted bug when false: the next tile's copy overwrites
  }                                      // the buffer while other threads still read this one
  pyllm::tc::cp_async_wait<0>();
  out[t] = acc;
}

template <bool kWait, bool kTrailingSync>
static bool tiled_sum_correct(const char* order) {
  const int tiles = 5;
  std::vector<float> g(64 * tiles), out(64);
  for (int i = 0; i < 64 * tiles; ++i) g[i] = (float)(i % 97) + 1.f;
  pyllm_emu::set_order(order);
  auto k = tiled_sum_kernel<kWait, kTrailingSync>;
  PYLLM_LAUNCH(k, 1, 64, 64 * 4, nullptr, g.data(), tiles, out.data());
  pyllm_emu::set_order(nullptr);
  for (int t = 0; t < 64; ++t) {
    float want = 0.f;
    for (int i = 0; i < tiles; ++i) want += g[i * 64 + 63 - t];
    if (out[t] != want) return false;
  }
  return true;
}

EMU_TEST(planted_missing_wait_group_reads_stale_data) {
  for (const char* ord : emu_test::orders()) {
    EMU_CHECK_MSG((tiled_sum_correct<true, true>(ord)), ord);
    EMU_CHECK_MSG((!tiled_sum_correct<false, true>(ord)), ord);  // wrong under every order
  }
}

EMU_TEST(planted_missing_syncthreads_before_next_tile_copy_is_caught) {
  int wrong = 0;
  for (const char* ord : emu_test::orders()) wrong += !tiled_sum_correct<true, false>(ord);
  EMU_CHECK_MSG(wrong > 0, "the race went unnoticed under every schedule order");
}

// ------------------------------------------------------------------ shared memory limits and banks
__global__ void big_smem_kernel(int* out) {
  unsigned char* sm = pyllm_dynamic_smem<unsigned char>();
  sm[threadIdx.x] = (unsigned char)threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = sm[threadIdx.x];
}

// As on the GPU (CUDA C Programming Guide, "Shared Memory"): more than 48 KiB of dynamic shared
// memory needs cudaFuncAttributeMaxDynamicSharedMemorySize raised for that kernel first.
EMU_TEST(dynamic_smem_above_48k_needs_the_opt_in_attribute) {
  std::vector<int> out(32);
  auto k = big_smem_kernel;
  EMU_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 48 * 1024) == cudaSuccess);
  PYLLM_LAUNCH(k, 1, 32, 48 * 1024, nullptr, out.data());  // the default limit itself is fine
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 1, 32, 48 * 1024 + 16, nullptr, out.data()), "above the 48 KiB default",
                   "cudaFuncSetAttribute");
  EMU_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024) == cudaSuccess);
  PYLLM_LAUNCH(k, 1, 32, 96 * 1024, nullptr, out.data());
  EMU_CHECK(out[31] == 31);
  EMU_EXPECT_THROW(PYLLM_LAUNCH(k, 1, 32, 96 * 1024 + 16, nullptr, out.data()), "above the 48 KiB default");
  EMU_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024) ==
            cudaErrorInvalidValue);  // above the largest per-block maximum (227 KiB, sm_90)
}

// ldmatrix.x1 with lane r (r < 8) addressing row r at `pitch` bytes, 16-byte chunk (r ^ xr) * xor_on.
__global__ void ldmatrix_pitch_kernel(int pitch, int xor_on, uint32_t* out) {
  unsigned char* sm = pyllm_dynamic_smem<unsigned char>();
  const int lane = threadIdx.x % 32, r = lane % 8;
  uint32_t v[1];
  pyllm::tc::ldmatrix_x1(v, sm + r * pitch + 16 * (xor_on ? r : 0));
  out[lane] = v[0];
}

// 8 rows of 16 bytes in one phase: rows 128 bytes apart hit the same 4 banks (8 wavefronts, 7 extra);
// 144 bytes apart (odd chunk pitch) or XOR-swizzled they are conflict-free; 64 bytes apart, rows
// 0/2/4/6 share banks 0-3 and rows 1/3/5/7 banks 16-19: 4-way (3 extra).
EMU_TEST(ldmatrix_bank_conflicts_are_counted) {
  std::vector<uint32_t> out(32);
  auto k = ldmatrix_pitch_kernel;
  const struct {
    int pitch, xor_on;
    uint64_t extra;
  } cases[] = {{128, 0, 7}, {144, 0, 0}, {128, 1, 0}, {64, 0, 3}, {16, 0, 0}};
  for (const auto& c : cases) {
    uint64_t phases = 0, extra = 0;
    pyllm_emu::ldmatrix_bank_stats(nullptr, nullptr, true);
    PYLLM_LAUNCH(k, 1, 32, 8 * 256, nullptr, c.pitch, c.xor_on, out.data());
    pyllm_emu::ldmatrix_bank_stats(&phases, &extra, true);
    EMU_CHECK_MSG(phases == 1 && extra == c.extra, "pitch " + std::to_string(c.pitch) + " xor " +
                  std::to_string(c.xor_on) + ": " + std::to_string(phases) + " phases, " + std::to_string(extra) +
                  " extra wavefronts, expected " + std::to_string(c.extra));
  }
}

int main(int argc, char** argv) { return emu_test::run_all(argc, argv); }

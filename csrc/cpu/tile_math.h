// Small dense building blocks for the CPU attention kernels: a register-blocked matrix product on
// cache-sized tiles and an exp the compiler can vectorise.
//
// Instruction sets. The kernels are templates over an ISA description (IsaDefault, IsaAvx2,
// IsaAvx512 below) that fixes the width of the GCC/Clang vector-extension type the matrix product
// works in and its register blocking. block_attention.cpp instantiates each template once per
// ISA inside an entry function compiled for that ISA (RK_TARGET_AVX2 / RK_TARGET_AVX512; the
// default entry is compiled for the baseline target, SSE2 on x86-64, NEON on AArch64) and picks
// one entry at run time (cpu_isa()). Everything here is force-inlined, so it is compiled with
// the instruction set of the entry that uses it.
//
// The vector width must be native to the ISA: a 64-byte vector on AVX2 is lowered by GCC into
// piecewise operations through the stack (10-40x slower), and the register blocking must fit the
// register file (AVX2 and SSE: 16 vector registers, AVX-512: 32).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#define RK_INLINE inline __attribute__((always_inline))

// x86-64 with GCC: AVX2 and AVX-512 entries besides the default one. "arch=x86-64-v3" is AVX2 +
// FMA + F16C + BMI1/2, "arch=x86-64-v4" adds AVX-512 F/BW/CD/DQ/VL (the psABI levels).
// -DRK_X86_ISAS=0 builds the default entry only (what other compilers and CPUs get).
#ifndef RK_X86_ISAS
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RK_X86_ISAS 1
#else
#define RK_X86_ISAS 0
#endif
#endif
#if RK_X86_ISAS
#define RK_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define RK_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#endif

namespace retro_kernels::cpu {

// kVecBytes: width of the vector type; kRows x kCols: the micro-kernel's block of C, kRows rows
// by kCols vectors, held in kRows * kCols accumulator registers next to kCols loaded rows of B
// and one broadcast element of A.
struct IsaDefault {  // SSE2 / NEON: 16 registers of 16 bytes; 8 accumulators + 3 (+ 1 without FMA)
  static constexpr int kVecBytes = 16, kRows = 4, kCols = 2;
};
struct IsaAvx2 {  // AVX2 + FMA: 16 ymm registers; 12 accumulators + 3 (6x2 measured ~15% faster
                  // than 4x2 on Zen 3: 8 accumulators barely cover 2 FMA/cycle x 4 cycles latency)
  static constexpr int kVecBytes = 32, kRows = 6, kCols = 2;
};
struct IsaAvx512 {  // AVX-512: 32 zmm registers; 8 accumulators + 3
  static constexpr int kVecBytes = 64, kRows = 4, kCols = 2;
};

template <typename T, int Bytes>
struct VecOf {
  typedef T type __attribute__((vector_size(Bytes)));
};
template <typename Isa, typename T>
using vec_t = typename VecOf<T, Isa::kVecBytes>::type;
template <typename Isa, typename T>
constexpr int kLanes = Isa::kVecBytes / sizeof(T);

template <typename V, typename T>
RK_INLINE V load_vec(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V, typename T>
RK_INLINE void store_vec(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(v));
}

// C[MB x NV*lanes] (+)= op(A)[MB x K] * B[K x NV*lanes], accumulators in registers.
// op(A) = A stored MB x K (kTransA = false) or A^T with A stored K x MB (kTransA = true).
template <typename Isa, typename T, int MB, int NV, bool kTransA>
RK_INLINE void gemm_block(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                          int64_t ldc, bool accumulate) {
  using V = vec_t<Isa, T>;
  constexpr int W = kLanes<Isa, T>;
  V acc[MB][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load_vec<V>(C + r * ldc + v * W) : V{};
  for (int64_t p = 0; p < K; ++p) {
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load_vec<V>(B + p * ldb + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) {
      const T a = kTransA ? A[p * lda + r] : A[r * lda + p];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store_vec(C + r * ldc + v * W, acc[r][v]);
}

// One row of C over columns [0, n), n < one vector (scalar loop).
template <typename T, bool kTransA>
RK_INLINE void gemm_row_tail(int64_t K, int64_t n, const T* A, int64_t lda, const T* B,
                             int64_t ldb, T* C, bool accumulate) {
  if (!accumulate) std::fill(C, C + n, T(0));
  for (int64_t p = 0; p < K; ++p) {
    const T a = kTransA ? A[p * lda] : A[p];
    const T* b = B + p * ldb;
    for (int64_t c = 0; c < n; ++c) C[c] += a * b[c];
  }
}

// Rows [i, i + MB) of C: kCols-vector column blocks, then one vector, then a scalar tail.
template <typename Isa, typename T, int MB, bool kTransA>
RK_INLINE void gemm_rows(int64_t i, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                         int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int W = kLanes<Isa, T>;
  constexpr int NV = Isa::kCols;
  const T* a = kTransA ? A + i : A + i * lda;
  T* c = C + i * ldc;
  int64_t j = 0;
  for (; j + NV * W <= N; j += NV * W)
    gemm_block<Isa, T, MB, NV, kTransA>(K, a, lda, B + j, ldb, c + j, ldc, accumulate);
  for (; j + W <= N; j += W)
    gemm_block<Isa, T, MB, 1, kTransA>(K, a, lda, B + j, ldb, c + j, ldc, accumulate);
  if (j < N)
    for (int r = 0; r < MB; ++r)
      gemm_row_tail<T, kTransA>(K, N - j, kTransA ? a + r : a + r * lda, lda, B + j, ldb,
                                c + r * ldc + j, accumulate);
}

// C[M x N] = (accumulate ? C : 0) + op(A)[M x K] * B[K x N], row-major, leading dimensions given.
// Rows in blocks of kRows; the remainder in blocks of 4 and 2 when kRows > 4 (64 = 6 * 10 + 4,
// 128 = 6 * 21 + 2: one-row blocks have too few accumulators to hide the FMA latency), then 1.
template <typename Isa, typename T, bool kTransA>
RK_INLINE void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int MB = Isa::kRows;
  int64_t i = 0;
  for (; i + MB <= M; i += MB)
    gemm_rows<Isa, T, MB, kTransA>(i, N, K, A, lda, B, ldb, C, ldc, accumulate);
  if constexpr (MB > 4) {
    for (; i + 4 <= M; i += 4)
      gemm_rows<Isa, T, 4, kTransA>(i, N, K, A, lda, B, ldb, C, ldc, accumulate);
    for (; i + 2 <= M; i += 2)
      gemm_rows<Isa, T, 2, kTransA>(i, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
  for (; i < M; ++i) gemm_rows<Isa, T, 1, kTransA>(i, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// exp(x) for float, vectorisable on any SSE level (Cephes expf: range reduction by ln 2 with the
// round-to-nearest done by the 1.5 * 2^23 trick, degree-6 polynomial; relative error < 1e-7).
// Inputs below -87.3 give ~1e-38 rather than 0: callers multiply masked terms by 0.
// Vectorises only with -fno-trapping-math -fno-math-errno (set in setup.py).
RK_INLINE float exp_vec(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float t = x * 1.44269504088896341f + 12582912.0f;  // n + 1.5 * 2^23, n = round(x / ln 2)
  const float n = t - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (__builtin_bit_cast(int32_t, t) - 0x4B400000 + 127) << 23;  // 2^n
  return y * __builtin_bit_cast(float, bits);
}

RK_INLINE double exp_vec(double x) { return std::exp(x); }

}  // namespace retro_kernels::cpu

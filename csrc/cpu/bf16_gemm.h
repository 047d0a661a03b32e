// bfloat16 products with float32 accumulation for the Llip CPU kernel (its bf16 path, docs/design.md section 8).
//
// torch's bf16 matmul on the CPU rounds its output to bf16, and the MKL bf16 GEMM it links runs at float32 speed
// on AMD CPUs, so the kernel calls oneDNN's batch-reduce GEMM micro-kernel through ATen
// (at::native::cpublas::brgemm): C (float32) = A (bf16, row-major) x B (bf16, "VNNI" layout) with float32
// accumulation, on the AVX512-BF16 (or AMX) units. The VNNI layout stores B[K, N] as [K/2, N, 2]: rows 2p and
// 2p + 1 interleaved, so that one 32-bit lane holds the two bf16 values the dot-product instruction pairs. K is
// therefore even: the packers below write the odd row (or column) that pads it as zeros, and operands that are
// read up to a padded K have zero pad columns.
//
// Rounding float32 -> bf16 is to nearest even (NaN stays NaN), as torch's own conversion.

#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace llip_cpu {

using bf16 = c10::BFloat16;

inline int64_t round_up2(int64_t n) { return (n + 1) & ~int64_t{1}; }

// float32 -> bf16, round to nearest even; branch-free so that the loops calling it vectorise.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? 0x7fc0u : rounded);
}

// dst[r, c] = src[r, c] for a [rows, cols] block, and dst[r, cols] = 0 when cols is odd (the K padding of an A
// operand whose columns are the reduction).
inline void to_bf16_rows(const float* src, int64_t ld_src, int64_t rows, int64_t cols, bf16* dst, int64_t ld_dst) {
  auto* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld_src;
    uint16_t* o = out + r * ld_dst;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) o[c] = bf16_bits(s[c]);
    if (cols & 1) o[cols] = 0;
  }
}

// VNNI packing of B = src [rows (the reduction), cols]: dst[p, c, e] = src[2p + e, c], ld_dst >= cols columns per
// row pair; an odd last row is paired with zeros.
inline void pack_vnni(const float* src, int64_t ld_src, int64_t rows, int64_t cols, bf16* dst, int64_t ld_dst) {
  auto* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t p = 0; p < (rows + 1) / 2; ++p) {
    const float* s0 = src + (2 * p) * ld_src;
    const float* s1 = 2 * p + 1 < rows ? s0 + ld_src : nullptr;
    uint16_t* o = out + p * ld_dst * 2;
    if (s1) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        o[2 * c] = bf16_bits(s0[c]);
        o[2 * c + 1] = bf16_bits(s1[c]);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        o[2 * c] = bf16_bits(s0[c]);
        o[2 * c + 1] = 0;
      }
    }
  }
}

// VNNI packing of B = src^T for src [rows, cols] (so B is [cols (the reduction), rows]):
// dst[p, r, e] = src[r, 2p + e], ld_dst >= rows; an odd last column is paired with zeros. The reads walk down
// src's columns in pairs, so a [rows, 2] strip of lines stays in L1 across the r loop.
inline void pack_vnni_transposed(const float* src, int64_t ld_src, int64_t rows, int64_t cols, bf16* dst,
                                 int64_t ld_dst) {
  auto* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t p = 0; p < (cols + 1) / 2; ++p) {
    const int64_t c = 2 * p;
    uint16_t* o = out + p * ld_dst * 2;
    if (c + 1 < cols) {
      for (int64_t r = 0; r < rows; ++r) {
        o[2 * r] = bf16_bits(src[r * ld_src + c]);
        o[2 * r + 1] = bf16_bits(src[r * ld_src + c + 1]);
      }
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        o[2 * r] = bf16_bits(src[r * ld_src + c]);
        o[2 * r + 1] = 0;
      }
    }
  }
}

// pack_vnni from a bf16 copy of B (row-major, ld_src elements per row): the two rows of a pair side by side in one
// 32-bit word (x86 is little-endian: the even row in the low half); an odd last row is paired with zeros. Cheaper
// than interleaving float32 rows as they are rounded.
inline void pack_vnni_bf16(const bf16* src, int64_t ld_src, int64_t rows, int64_t cols, bf16* dst, int64_t ld_dst) {
  const auto* in = reinterpret_cast<const uint16_t*>(src);
  auto* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t p = 0; p < (rows + 1) / 2; ++p) {
    const uint16_t* s0 = in + (2 * p) * ld_src;
    const uint16_t* s1 = 2 * p + 1 < rows ? s0 + ld_src : nullptr;
    uint32_t* o = out + p * ld_dst;
    if (s1) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) o[c] = static_cast<uint32_t>(s0[c]) | (static_cast<uint32_t>(s1[c]) << 16);
    } else {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) o[c] = s0[c];
    }
  }
}

// out[c, r] = in[r, c] for a [rows, cols] block of 32-bit elements (ld_in / ld_out elements per row): 8 x 8 blocks
// transposed in AVX2 registers where the build has AVX2, the edges (and other builds) element by element.
inline void transpose32(const uint32_t* in, int64_t ld_in, int64_t rows, int64_t cols, uint32_t* out, int64_t ld_out) {
  int64_t r8 = 0, c8 = 0;
#ifdef __AVX2__
  r8 = rows & ~int64_t{7}, c8 = cols & ~int64_t{7};
  for (int64_t r0 = 0; r0 < r8; r0 += 8) {
    for (int64_t c0 = 0; c0 < c8; c0 += 8) {
      __m256 x[8], y[8];
      for (int k = 0; k < 8; ++k) x[k] = _mm256_loadu_ps(reinterpret_cast<const float*>(in + (r0 + k) * ld_in + c0));
      for (int k = 0; k < 8; k += 2) {  // rows a, b -> (a0 b0 a1 b1 | a4 b4 a5 b5), (a2 b2 a3 b3 | a6 b6 a7 b7)
        y[k] = _mm256_unpacklo_ps(x[k], x[k + 1]);
        y[k + 1] = _mm256_unpackhi_ps(x[k], x[k + 1]);
      }
      for (int k = 0; k < 8; k += 4) {  // -> (a0 b0 c0 d0 | a4 b4 c4 d4), columns 1, 2, 3 likewise
        x[k] = _mm256_shuffle_ps(y[k], y[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
        x[k + 1] = _mm256_shuffle_ps(y[k], y[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
        x[k + 2] = _mm256_shuffle_ps(y[k + 1], y[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
        x[k + 3] = _mm256_shuffle_ps(y[k + 1], y[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int k = 0; k < 4; ++k) {  // the 128-bit halves of rows 0-3 and 4-7 joined: output rows k and k + 4
        _mm256_storeu_ps(reinterpret_cast<float*>(out + (c0 + k) * ld_out + r0),
                         _mm256_permute2f128_ps(x[k], x[k + 4], 0x20));
        _mm256_storeu_ps(reinterpret_cast<float*>(out + (c0 + k + 4) * ld_out + r0),
                         _mm256_permute2f128_ps(x[k], x[k + 4], 0x31));
      }
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t c_begin = r < r8 ? c8 : 0;  // rows of whole 8 x 8 blocks: only their ragged columns are left
    // memcpy, not a uint32_t load: callers pass float or bf16 storage, which the compiler may not alias with it.
    for (int64_t c = c_begin; c < cols; ++c) std::memcpy(out + c * ld_out + r, in + r * ld_in + c, sizeof(uint32_t));
  }
}

// pack_vnni_transposed from a bf16 copy of src [rows, cols] (row-major, ld_src even, cols padded to even with a
// zero column): the VNNI pair (src[r, 2p], src[r, 2p + 1]) is already one 32-bit word of src, so the packing is a
// transpose of 32-bit words.
inline void transpose_pairs(const bf16* src, int64_t ld_src, int64_t rows, int64_t cols, bf16* dst, int64_t ld_dst) {
  transpose32(reinterpret_cast<const uint32_t*>(src), ld_src / 2, rows, (cols + 1) / 2,
              reinterpret_cast<uint32_t*>(dst), ld_dst);
}

// C[M, N] (+)= A[M, K] B[K, N]: A bf16 row-major (lda elements per row), B bf16 VNNI (ldb column pairs per row
// pair), C float32 (ldc); K even. `accumulate`: add to C instead of overwriting it.
inline void gemm_bf16(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B, int64_t ldb,
                      float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/true);
}

// Whether this machine and this torch build run gemm_bf16 (oneDNN's micro-kernel needs AVX512-BF16 or AMX, and a
// torch built with it), checked once on a small product against a float32 one.
inline bool bf16_gemm_available() {
  static const bool ok = [] {
    try {
      constexpr int64_t M = 3, N = 16, K = 4;
      float a[M * K], b[K * N], want[M * N] = {}, got[M * N];
      for (int64_t i = 0; i < M * K; ++i) a[i] = static_cast<float>(i % 5) - 2.0f;
      for (int64_t i = 0; i < K * N; ++i) b[i] = static_cast<float>(i % 7) - 3.0f;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t k = 0; k < K; ++k) want[m * N + n] += a[m * K + k] * b[k * N + n];
      bf16 a16[M * K], b16[K * N];
      to_bf16_rows(a, K, M, K, a16, K);
      pack_vnni(b, N, K, N, b16, N);
      gemm_bf16(M, N, K, a16, K, b16, N, got, N, false);
      at::native::cpublas::brgemm_release(true);
      return std::memcmp(want, got, sizeof want) == 0;  // small integers: exact in bf16 and in the sums
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

}  // namespace llip_cpu

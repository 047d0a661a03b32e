// Vectorisable scalar helpers for the Llip CPU kernel.
//
// The per-pair softmax over the K mixture tokens costs H*K exponentials per (image, text) pair, as many as the
// GEMM FLOPs divided by ~4d, so exp() is a co-bottleneck (docs/design.md section 4). glibc only exposes vector expf under
// -ffast-math, which we do not want for the rest of the file, so we use our own branch-free exp2: the compiler
// turns the loops that call it into AVX2 / AVX-512 / SSE code depending on the flags the build chose.
#pragma once

#include <algorithm>
#include <cstdint>
#include <bit>

namespace llip_cpu {

// 2^x for x <= 0 (the softmax argument after subtracting the running maximum). Relative error < 1e-7 on
// [-126, 0]; arguments below -126 return 2^-126 (about 1e-38), which is 0 for every sum it enters.
inline float exp2_nonpos(float x) {
  x = std::max(x, -126.0f);
  // Round to nearest for x <= 0: truncation of (x - 0.5) toward zero is ceil(x - 0.5), so f lies in (-0.5, 0.5].
  const int32_t xi = static_cast<int32_t>(x - 0.5f);
  const float f = x - static_cast<float>(xi);
  // 2^f = e^(f ln 2); degree-7 Taylor in t = f ln 2, |t| <= 0.347, truncation error < 6e-9 relative.
  const float t = f * 0.6931471805599453f;
  float p = 1.0f / 5040.0f;
  p = p * t + 1.0f / 720.0f;
  p = p * t + 1.0f / 120.0f;
  p = p * t + 1.0f / 24.0f;
  p = p * t + 1.0f / 6.0f;
  p = p * t + 0.5f;
  p = p * t + 1.0f;
  p = p * t + 1.0f;
  // Scale by 2^xi through the exponent bits (xi >= -126, so the result is a normal float).
  const int32_t bits = (xi + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

}  // namespace llip_cpu

// Llip CUDA kernels: all-pairs cosine and the SigLIP loss (forward and backward), form 3 of docs/design.md section 4.
//
// Why form 3: its per-pair cost 4KD + 2(HK)^2 is the lowest of the three forms for every paper config but B/32
// (where it is 11% above form 2), its per-pair work lives entirely in the HK-dimensional "mixture" space (no D-wide
// accumulator per pair, so a tile of 64 texts fits in shared memory), and docs/design.md section 7 gives its gradients.
// Per image i and text j (d = head dim, Kp/dp = K/d padded to 16):
//   s[h,k]  = <K_i[h,k], Q_j[h]> / tau          a = softmax_k(s) per head         (tensor cores: Ks @ Qs^T)
//   c[h,k]  = <V_i[h,k], U_j[h]>,  U_j = W_out @ normalize(y_j)                     (tensor cores: Vs @ Us^T)
//   dot     = sum a*c,   n2 = a^T G_i a,  G_i = V'_i V'_i^T (per-head zero-padded)  (tensor cores: G_i @ A)
//   cos     = dot / sqrt(max(n2, 1e-24))
// U and G are computed by torch outside (O(Bt) and O(Bi) work) and passed in the input dtype; G is divided by its
// per-image max |G| (gscale) first so that float16 cannot overflow. Every matrix product runs through wmma
// m16n16k16 fragments (mma.sync) with float32 accumulation; softmax, norms and the loss are float32.
//
// Memory: a block owns one image and a tile of BT texts; nothing of size Bi*Bt*K or Bi*Bt*D exists anywhere, and the
// loss kernels only write per-block partial sums (never Bi*Bt).
//
// This file includes CUDA headers only (no torch), so nvcc compiles it in seconds; the torch binding is
// llip_binding.cpp.

#ifdef LLIP_HOST_EMULATION
// Tests only: run this file's kernels on host threads (see emu/cuda_host_emu.h).
#include "emu/cuda_host_emu.h"
#define LLIP_LAUNCH(kernel, grid, block, smem, stream, ...) llip_emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#define LLIP_DYNAMIC_SMEM(name) unsigned char* name = llip_emu::dynamic_smem()
#define LLIP_SHARED_ARRAY(type, name, n) type* name = llip_emu::static_smem<type>(n, __LINE__)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define LLIP_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define LLIP_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define LLIP_SHARED_ARRAY(type, name, n) __shared__ type name[n]
#endif

#include "llip_cuda.h"

namespace {

using namespace nvcuda;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kPad16 = 8;  // extra elements per 16-bit shared row: breaks bank conflicts, keeps 32-byte alignment
constexpr int kPadF = 4;   // extra floats per float32 shared row, same reason
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kEps2 = 1e-24f;  // F.normalize's eps (1e-12), squared
constexpr int kVecFloats = 7;    // per-text float vectors: dot, n2, ddot, dn2, dn2s, red (2 wide)

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__host__ __device__ inline size_t align128(size_t x) { return (x + 127) & ~size_t(127); }

// Shared memory map of one block (byte offsets). Forward uses Ks..As, scratch, vec; backward adds R, AsD, DS, PA.
struct Layout {
  int ld_d;  // row stride (elements) of the 16-bit [rows, dp] tiles Ks, Vs (Kp rows), Qs, Us (BT rows)
  int ld_t;  // row stride of the 16-bit [rows, BT] tiles As, AsD (HKp rows), DS, PA (Kp rows)
  int ld_f;  // row stride of the float32 [Kp, BT] tiles S, C, R
  size_t ks, vs, qs, us, s, c, r, as, asd, ds, pa, scratch, vec, total;
};

__host__ __device__ inline Layout make_layout(const LlipDims& p, bool backward) {
  Layout L;
  L.ld_d = p.dp + kPad16;
  L.ld_t = p.BT + kPad16;
  L.ld_f = p.BT + kPadF;
  const size_t img16 = size_t(p.Kp) * L.ld_d * 2, txt16 = size_t(p.BT) * L.ld_d * 2;
  const size_t tile_f = size_t(p.Kp) * L.ld_f * 4, mix16 = size_t(p.HKp) * L.ld_t * 2;
  const size_t kt16 = size_t(p.Kp) * L.ld_t * 2;
  size_t off = 0;
  L.ks = off; off = align128(off + img16);
  L.vs = off; off = align128(off + img16);
  L.qs = off; off = align128(off + txt16);
  L.us = off; off = align128(off + txt16);
  L.s = off; off = align128(off + tile_f);
  L.c = off; off = align128(off + tile_f);
  L.as = off; off = align128(off + mix16);
  L.r = L.asd = L.ds = L.pa = 0;
  if (backward) {
    L.r = off; off = align128(off + tile_f);
    L.asd = off; off = align128(off + mix16);
    L.ds = off; off = align128(off + kt16);
    L.pa = off; off = align128(off + kt16);
  }
  L.scratch = off; off = align128(off + size_t(kWarps) * 256 * 4);
  L.vec = off; off = align128(off + (size_t(kVecFloats + kWarps) * p.BT) * 4);
  L.total = off;
  return L;
}

// 2^-e with m * 2^-e in [0.5, 1): rescales a tile of gradients into float16's normal range before rounding.
__device__ __forceinline__ float pow2_scale(float m) {
  if (!(m > 0.f) || !isfinite(m)) return 1.f;
  int e;
  frexpf(m, &e);
  e = max(-120, min(120, e));
  return ldexpf(1.f, -e);
}

__device__ __forceinline__ float softplus(float z) { return fmaxf(z, 0.f) + log1pf(expf(-fabsf(z))); }

template <typename L>
__device__ __forceinline__ int frag_off(int row, int col, int ld);
template <>
__device__ __forceinline__ int frag_off<wmma::row_major>(int row, int col, int ld) { return row * ld + col; }
template <>
__device__ __forceinline__ int frag_off<wmma::col_major>(int row, int col, int ld) { return col * ld + row; }

// C[M, N] = A[M, Kd] @ B[Kd, N] with M, N, Kd multiples of 16. LA / LB say how A and B are stored (row_major:
// element (r, c) at r * ld + c; col_major: at c * ld + r). Warps take 16x16 output tiles round-robin; each
// finished tile goes through the warp's 16x16 float32 scratch to `sink(scratch, m0, n0)`, which every lane of the
// warp calls (so the sink decides where the tile goes: shared memory, a global read-modify-write, atomics).
template <typename T, typename LA, typename LB, typename Sink>
__device__ void warp_gemm(const T* A, int lda, const T* B, int ldb, int M, int N, int Kd, float* scratch_all,
                          Sink&& sink) {
  const int warp = threadIdx.x >> 5;
  float* scratch = scratch_all + warp * 256;
  const int tiles_n = N >> 4, tiles = (M >> 4) * tiles_n;
  for (int tile = warp; tile < tiles; tile += kWarps) {
    const int m0 = (tile / tiles_n) << 4, n0 = (tile % tiles_n) << 4;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int k0 = 0; k0 < Kd; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
      wmma::load_matrix_sync(fa, A + frag_off<LA>(m0, k0, lda), lda);
      wmma::load_matrix_sync(fb, B + frag_off<LB>(k0, n0, ldb), ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(scratch, acc, 16, wmma::mem_row_major);
    __syncwarp();
    sink(static_cast<const float*>(scratch), m0, n0);
    __syncwarp();
  }
}

// dst[r, c] = src[r, c] for r < rows, c < cols; zero in the padding up to [rows_pad, cols_pad].
template <typename T>
__device__ void load_tile(T* dst, int ld_dst, const T* src, size_t src_stride, int rows, int cols, int rows_pad,
                          int cols_pad) {
  const T zero = from_f<T>(0.f);
  for (int e = threadIdx.x; e < rows_pad * cols_pad; e += kThreads) {
    const int r = e / cols_pad, c = e % cols_pad;
    dst[r * ld_dst + c] = (r < rows && c < cols) ? src[r * src_stride + c] : zero;
  }
}

// One block's state: image i against a tile of texts.
template <typename T>
struct Block {
  LlipDims p;
  Layout L;
  LlipInputsPtr in;
  int i;
  float gscale;  // G_i = gscale * g[i]
  T *Ks, *Vs, *Qs, *Us, *As, *AsD, *DS, *PA;
  float *S, *C, *R, *scratch, *dot, *n2, *ddot, *dn2, *dn2s, *red, *n2part;

  __device__ Block(const LlipDims& p_, const LlipInputsPtr& in_, unsigned char* smem, bool backward, int image)
      : p(p_), L(make_layout(p_, backward)), in(in_) {
    set_image(image);
    Ks = reinterpret_cast<T*>(smem + L.ks);
    Vs = reinterpret_cast<T*>(smem + L.vs);
    Qs = reinterpret_cast<T*>(smem + L.qs);
    Us = reinterpret_cast<T*>(smem + L.us);
    As = reinterpret_cast<T*>(smem + L.as);
    AsD = reinterpret_cast<T*>(smem + L.asd);
    DS = reinterpret_cast<T*>(smem + L.ds);
    PA = reinterpret_cast<T*>(smem + L.pa);
    S = reinterpret_cast<float*>(smem + L.s);
    C = reinterpret_cast<float*>(smem + L.c);
    R = reinterpret_cast<float*>(smem + L.r);
    scratch = reinterpret_cast<float*>(smem + L.scratch);
    float* vec = reinterpret_cast<float*>(smem + L.vec);
    dot = vec;
    n2 = vec + p.BT;
    ddot = vec + 2 * p.BT;
    dn2 = vec + 3 * p.BT;
    dn2s = vec + 4 * p.BT;
    red = vec + 5 * p.BT;  // 2 * BT floats
    n2part = vec + kVecFloats * p.BT;  // [kWarps, BT]
  }

  // Every thread holds its own Block, so switching images needs no barrier.
  __device__ void set_image(int image) {
    i = image;
    gscale = in.gscale[i];
  }

  __device__ const T* gram() const { return static_cast<const T*>(in.g) + size_t(i) * p.HKp * p.HKp; }

  // Zero a 16-bit [rows, BT] tile once, so its padding rows stay zero for the whole kernel.
  __device__ void zero16(T* x, int rows) {
    const T zero = from_f<T>(0.f);
    for (int e = threadIdx.x; e < rows * L.ld_t; e += kThreads) x[e] = zero;
  }

  // Head h of image i (Ks, Vs: [Kp, dp]) and of texts j0 .. j0 + nb - 1 (Qs, Us: [BT, dp]), zero padded.
  __device__ void load_head(int h, int j0, int nb) {
    const size_t img = (size_t(i) * p.H + h) * p.K * p.d, txt = (size_t(j0) * p.H + h) * p.d;
    const size_t txt_stride = size_t(p.H) * p.d;
    load_tile(Ks, L.ld_d, static_cast<const T*>(in.k) + img, p.d, p.K, p.d, p.Kp, p.dp);
    load_tile(Vs, L.ld_d, static_cast<const T*>(in.v) + img, p.d, p.K, p.d, p.Kp, p.dp);
    load_tile(Qs, L.ld_d, static_cast<const T*>(in.q) + txt, txt_stride, nb, p.d, p.BT, p.dp);
    load_tile(Us, L.ld_d, static_cast<const T*>(in.u) + txt, txt_stride, nb, p.d, p.BT, p.dp);
  }

  // S = Ks @ Qs^T and C = Vs @ Us^T, both [Kp, BT] float32 (raw scores, before 1/tau).
  __device__ void scores_and_values() {
    const int lane = threadIdx.x & 31;
    float* s = S;
    float* c = C;
    const int ld = L.ld_f;
    warp_gemm<T, wmma::row_major, wmma::col_major>(Ks, L.ld_d, Qs, L.ld_d, p.Kp, p.BT, p.dp, scratch,
        [&](const float* sc, int m0, int n0) {
          for (int e = lane; e < 256; e += 32) s[(m0 + (e >> 4)) * ld + n0 + (e & 15)] = sc[e];
        });
    warp_gemm<T, wmma::row_major, wmma::col_major>(Vs, L.ld_d, Us, L.ld_d, p.Kp, p.BT, p.dp, scratch,
        [&](const float* sc, int m0, int n0) {
          for (int e = lane; e < 256; e += 32) c[(m0 + (e >> 4)) * ld + n0 + (e & 15)] = sc[e];
        });
  }

  // For the tile of texts j0 .. j0 + nb - 1: As[h*Kp + k, t] = a (all heads), dot[t], n2[t] (n2 of the scaled G).
  // Columns t >= nb hold finite values that callers ignore. Ends with a barrier.
  __device__ void tile_forward(int j0, int nb) {
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const float scale2 = kLog2e / p.tau;  // exp(x / tau) = exp2(x * log2(e) / tau)
    if (t < p.BT) dot[t] = 0.f;
    for (int h = 0; h < p.H; ++h) {
      __syncthreads();  // previous readers of Ks..Us, S, C are done
      load_head(h, j0, nb);
      __syncthreads();
      scores_and_values();
      __syncthreads();
      if (t < p.BT) {  // softmax over the K tokens of head h, one text per thread
        float m = -INFINITY;
        for (int k = 0; k < p.K; ++k) m = fmaxf(m, S[k * L.ld_f + t]);
        float sum = 0.f;
        for (int k = 0; k < p.K; ++k) sum += exp2f((S[k * L.ld_f + t] - m) * scale2);
        const float inv = 1.f / sum;
        float acc = 0.f;
        for (int k = 0; k < p.K; ++k) {
          const float a = exp2f((S[k * L.ld_f + t] - m) * scale2) * inv;
          As[(h * p.Kp + k) * L.ld_t + t] = from_f<T>(a);
          acc += a * C[k * L.ld_f + t];
        }
        dot[t] += acc;
      }
    }
    for (int e = t; e < kWarps * p.BT; e += kThreads) n2part[e] = 0.f;
    __syncthreads();
    // n2[t] = sum_r As[r, t] * (G @ As)[r, t]: each warp reduces its own output tiles into its own n2part row.
    const T* as = As;
    float* part = n2part + warp * p.BT;
    const int ld_t = L.ld_t;
    warp_gemm<T, wmma::row_major, wmma::row_major>(gram(), p.HKp, As, L.ld_t, p.HKp, p.BT, p.HKp, scratch,
        [&](const float* sc, int m0, int n0) {
          if (lane < 16) {
            float acc = 0.f;
            for (int r = 0; r < 16; ++r) acc += to_f(as[(m0 + r) * ld_t + n0 + lane]) * sc[r * 16 + lane];
            part[n0 + lane] += acc;
          }
        });
    __syncthreads();
    if (t < p.BT) {
      float s = 0.f;
      for (int w = 0; w < kWarps; ++w) s += n2part[w * p.BT + t];
      n2[t] = s;
    }
    __syncthreads();
  }
};

// kLoss = false: out[i, j] = cos. kLoss = true: out[i, blockIdx.x] = this block's sum of -log sigmoid(l * logit).
template <typename T, bool kLoss>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(LlipInputsPtr in, LlipDims p, int pos_offset, int has_pos,
                                                           float* out) {
  LLIP_DYNAMIC_SMEM(smem);
  Block<T> blk(p, in, smem, false, blockIdx.y);
  blk.zero16(blk.As, p.HKp);
  const int i = blockIdx.y, t = threadIdx.x;
  const float tv = kLoss ? *in.t : 0.f, bv = kLoss ? *in.b : 0.f;
  const int ntiles = (p.Bt + p.BT - 1) / p.BT;
  double loss = 0.0;  // thread 0's running sum over the block's texts, in float64 (a long sum)
  for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int j0 = tile * p.BT, nb = min(p.BT, p.Bt - j0);
    blk.tile_forward(j0, nb);
    if (t < nb) {
      const float cosv = blk.dot[t] / sqrtf(fmaxf(blk.n2[t] * blk.gscale, kEps2));
      if (!kLoss) {
        out[size_t(i) * p.Bt + j0 + t] = cosv;
      } else {
        const float l = (has_pos && j0 + t == i + pos_offset) ? 1.f : -1.f;
        blk.red[t] = softplus(-l * (tv * cosv + bv));  // -log sigmoid(x) = softplus(-x)
      }
    }
    if (kLoss) {
      __syncthreads();
      if (t == 0)
        for (int e = 0; e < nb; ++e) loss += double(blk.red[e]);  // fixed order: deterministic
    }
  }
  if (kLoss && t == 0) out[size_t(i) * gridDim.x + blockIdx.x] = loss;
}

// Which gradients a backward launch computes, and how it walks the pairs.
enum BwdMode {
  kBwdAll = 0,        // one block per image, every text tile; dQ/dU with float atomics (fast, not bitwise repeatable)
  kBwdImageSide = 1,  // one block per image, every text tile; dK, dV, dG, dt, db only
  kBwdTextSide = 2,   // one block per text tile, every image; dQ, dU only, plain read-modify-write
};

// dQ / dU accumulation, in float64 (a long sum over images): atomics when several image blocks add to one text row at
// once, else the row's owner adds.
template <int kMode>
__device__ __forceinline__ void add_text_side(double* p, float v) {
  if (kMode == kBwdAll) {
    atomicAdd(p, double(v));
  } else {
    *p += double(v);
  }
}

// Backward of the SigLIP loss (docs/design.md section 7), per pair (image i, text j):
//   g = -l sigmoid(-l logit) * gout,  ddot = g t / n,  dn2 = -g t dot / (2 n^3)  (0 where the norm is clamped)
//   da = ddot c + 2 dn2 (G a),  ds = a (da - sum_k a da) / tau
//   dK_i += ds Q_j, dV_i += ddot a U_j (image side: the block owning image i does a plain read-modify-write)
//   dQ_j += ds K_i, dU_j += ddot a V_i (text side: atomics in kBwdAll, owned rows in kBwdTextSide)
//   dG_i += dn2 a a^T (read-modify-write, one tile of texts at a time: As diag(dn2) As^T)
// G a is needed per element here, so it is recomputed per head (G rows of head h times As) rather than stored.
// Deterministic mode runs kBwdImageSide then kBwdTextSide: every output has one owner, summing in a fixed order,
// at the price of computing the pair work twice.
template <typename T, int kMode>
__global__ void __launch_bounds__(kThreads, 1) sigmoid_bwd_kernel(LlipInputsPtr in, LlipDims p, int pos_offset,
                                                               int has_pos, const float* gout, LlipGradsPtr gr) {
  LLIP_DYNAMIC_SMEM(smem);
  constexpr bool kImageSide = kMode != kBwdTextSide, kTextSide = kMode != kBwdImageSide;
  const int t = threadIdx.x, lane = t & 31;
  Block<T> blk(p, in, smem, true, kMode == kBwdTextSide ? 0 : blockIdx.x);
  blk.zero16(blk.As, p.HKp);
  blk.zero16(blk.DS, p.Kp);
  blk.zero16(blk.PA, p.Kp);
  const float tv = *in.t, bv = *in.b, go = *gout, inv_tau = 1.f / p.tau, scale2 = kLog2e / p.tau;
  const int ntiles = (p.Bt + p.BT - 1) / p.BT;
  const int ld_f = blk.L.ld_f, ld_t = blk.L.ld_t;
  LLIP_SHARED_ARRAY(float, tile_scale, 2);  // power-of-two scales of (ds, ddot a) and of dn2 for this tile
  double dt_acc = 0.0, db_acc = 0.0;  // sums over every text: float64

  const int steps = kMode == kBwdTextSide ? p.Bi : ntiles;
  for (int step = 0; step < steps; ++step) {
    const int i = kMode == kBwdTextSide ? step : blockIdx.x, tile = kMode == kBwdTextSide ? blockIdx.x : step;
    const int j0 = tile * p.BT, nb = min(p.BT, p.Bt - j0);
    blk.set_image(i);
    blk.tile_forward(j0, nb);
    if (t < p.BT) {
      float g = 0.f, gc = 0.f, ddot = 0.f, dn2 = 0.f;
      if (t < nb) {
        const float n2t = blk.n2[t] * blk.gscale, nsq = fmaxf(n2t, kEps2), n = sqrtf(nsq);
        const float dotv = blk.dot[t], cosv = dotv / n;
        const float l = (has_pos && j0 + t == i + pos_offset) ? 1.f : -1.f;
        const float x = l * (tv * cosv + bv);
        g = -l * go / (1.f + expf(x));  // d softplus(-x) / d logit = -l sigmoid(-x)
        gc = g * cosv;
        const float dcos = g * tv;
        ddot = dcos / n;
        dn2 = n2t > kEps2 ? -dcos * dotv / (2.f * nsq * n) : 0.f;
      }
      blk.ddot[t] = ddot;
      blk.dn2[t] = dn2;
      blk.dn2s[t] = dn2 * blk.gscale;  // derivative w.r.t. the scaled quadratic form (G = gscale * g)
      blk.red[t] = g;
      blk.red[p.BT + t] = gc;
    }
    __syncthreads();
    if (t == 0) {
      float m_a = 0.f, m_g = 0.f;
      for (int e = 0; e < nb; ++e) {
        db_acc += blk.red[e];
        dt_acc += blk.red[p.BT + e];
        m_a = fmaxf(m_a, fmaxf(fabsf(blk.ddot[e]), fabsf(blk.dn2s[e])));
        m_g = fmaxf(m_g, fabsf(blk.dn2[e]));
      }
      tile_scale[0] = pow2_scale(m_a);
      tile_scale[1] = pow2_scale(m_g);
    }
    for (int h = 0; h < p.H; ++h) {
      __syncthreads();  // tile_scale visible; previous head's GEMM readers done
      blk.load_head(h, j0, nb);
      __syncthreads();
      blk.scores_and_values();
      float* rr = blk.R;
      warp_gemm<T, wmma::row_major, wmma::row_major>(blk.gram() + size_t(h) * p.Kp * p.HKp, p.HKp, blk.As, ld_t,
          p.Kp, p.BT, p.HKp, blk.scratch, [&](const float* sc, int m0, int n0) {
            for (int e = lane; e < 256; e += 32) rr[(m0 + (e >> 4)) * ld_f + n0 + (e & 15)] = sc[e];
          });
      __syncthreads();
      const float sa = tile_scale[0];
      if (t < p.BT) {  // softmax backward for text t, head h; S <- a, R <- da in place (column t is this thread's)
        const float ddot = blk.ddot[t], two_dn2s = 2.f * blk.dn2s[t];
        float m = -INFINITY;
        for (int k = 0; k < p.K; ++k) m = fmaxf(m, blk.S[k * ld_f + t]);
        float sum = 0.f;
        for (int k = 0; k < p.K; ++k) sum += exp2f((blk.S[k * ld_f + t] - m) * scale2);
        const float inv = 1.f / sum;
        float sad = 0.f;
        for (int k = 0; k < p.K; ++k) {
          const float a = exp2f((blk.S[k * ld_f + t] - m) * scale2) * inv;
          const float da = ddot * blk.C[k * ld_f + t] + two_dn2s * blk.R[k * ld_f + t];
          blk.S[k * ld_f + t] = a;
          blk.R[k * ld_f + t] = da;
          sad += a * da;
        }
        for (int k = 0; k < p.K; ++k) {
          const float a = blk.S[k * ld_f + t];
          blk.DS[k * ld_t + t] = from_f<T>(sa * a * (blk.R[k * ld_f + t] - sad) * inv_tau);
          blk.PA[k * ld_t + t] = from_f<T>(sa * ddot * a);
        }
      }
      __syncthreads();
      const float unscale = 1.f / sa;
      const size_t img = (size_t(i) * p.H + h) * p.K * p.d;
      const size_t txt = (size_t(j0) * p.H + h) * p.d, txt_stride = size_t(p.H) * p.d;
      const int K = p.K, d = p.d;
      double* dk = gr.dk + img;  // float64 sums over the text tiles (and, for dq / du, over the images)
      double* dv = gr.dv + img;
      double* dq = gr.dq + txt;
      double* du = gr.du + txt;
      // dK_i[h] += DS @ Qs, dV_i[h] += PA @ Us: [Kp, BT] @ [BT, dp]
      if (kImageSide) {
        warp_gemm<T, wmma::row_major, wmma::row_major>(blk.DS, ld_t, blk.Qs, blk.L.ld_d, p.Kp, p.dp, p.BT, blk.scratch,
            [&](const float* sc, int m0, int n0) {
              for (int e = lane; e < 256; e += 32) {
                const int r = m0 + (e >> 4), c = n0 + (e & 15);
                if (r < K && c < d) dk[r * d + c] += double(sc[e] * unscale);
              }
            });
        warp_gemm<T, wmma::row_major, wmma::row_major>(blk.PA, ld_t, blk.Us, blk.L.ld_d, p.Kp, p.dp, p.BT, blk.scratch,
            [&](const float* sc, int m0, int n0) {
              for (int e = lane; e < 256; e += 32) {
                const int r = m0 + (e >> 4), c = n0 + (e & 15);
                if (r < K && c < d) dv[r * d + c] += double(sc[e] * unscale);
              }
            });
      }
      // dQ[j0 + t, h] += DS^T @ Ks, dU[j0 + t, h] += PA^T @ Vs: [BT, Kp] @ [Kp, dp]; DS^T is DS read column-major.
      if (kTextSide) {
        warp_gemm<T, wmma::col_major, wmma::row_major>(blk.DS, ld_t, blk.Ks, blk.L.ld_d, p.BT, p.dp, p.Kp, blk.scratch,
            [&](const float* sc, int m0, int n0) {
              for (int e = lane; e < 256; e += 32) {
                const int r = m0 + (e >> 4), c = n0 + (e & 15);
                if (r < nb && c < d) add_text_side<kMode>(dq + r * txt_stride + c, sc[e] * unscale);
              }
            });
        warp_gemm<T, wmma::col_major, wmma::row_major>(blk.PA, ld_t, blk.Vs, blk.L.ld_d, p.BT, p.dp, p.Kp, blk.scratch,
            [&](const float* sc, int m0, int n0) {
              for (int e = lane; e < 256; e += 32) {
                const int r = m0 + (e >> 4), c = n0 + (e & 15);
                if (r < nb && c < d) add_text_side<kMode>(du + r * txt_stride + c, sc[e] * unscale);
              }
            });
      }
    }
    if (!kImageSide) continue;  // the next tile_forward starts with a barrier
    __syncthreads();
    // dG_i += As diag(dn2) As^T: [HKp, BT] @ [BT, HKp]; As^T is As read column-major.
    const float sg = tile_scale[1], unscale_g = 1.f / sg;
    for (int e = t; e < p.HKp * p.BT; e += kThreads) {
      const int r = e / p.BT, c = e % p.BT;
      blk.AsD[r * ld_t + c] = from_f<T>(to_f(blk.As[r * ld_t + c]) * blk.dn2[c] * sg);
    }
    __syncthreads();
    double* dg = gr.dg + size_t(i) * p.HKp * p.HKp;
    const int HKp = p.HKp;
    warp_gemm<T, wmma::row_major, wmma::col_major>(blk.AsD, ld_t, blk.As, ld_t, p.HKp, p.HKp, p.BT, blk.scratch,
        [&](const float* sc, int m0, int n0) {
          for (int e = lane; e < 256; e += 32) dg[(m0 + (e >> 4)) * HKp + n0 + (e & 15)] += double(sc[e] * unscale_g);
        });
    // the next tile_forward starts with a barrier before it overwrites As
  }
  if (kImageSide && t == 0) {
    gr.dt_part[blockIdx.x] = dt_acc;
    gr.db_part[blockIdx.x] = db_acc;
  }
}

int round16(int x) { return (x + 15) / 16 * 16; }

// Fills the padded sizes and picks BT; returns an error message or nullptr.
const char* plan(LlipDims* dims, int backward, size_t* smem) {
  LlipDims& p = *dims;
  if (p.Bi < 1 || p.Bt < 1 || p.H < 1 || p.K < 1 || p.d < 1) return "llip cuda: every size must be >= 1";
  if (!(p.tau > 0.f)) return "llip cuda: tau must be > 0";
  if (p.Bi > 65535) return "llip cuda: at most 65535 images per call (grid y limit); split the batch";
  p.Kp = round16(p.K);
  p.dp = round16(p.d);
  p.HKp = p.H * p.Kp;
  int dev = 0, max_smem = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return "llip cuda: no current CUDA device";
  if (cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return "llip cuda: cannot query the shared memory limit";
  // Leave 1 KiB for the kernels' static shared memory (a few floats) on top of the dynamic part.
  p.BT = llip_cuda_pick_bt(p, backward, size_t(max_smem) - 1024);
  if (p.BT == 0) return "llip cuda: H * K or d too large for shared memory even with 16 texts per tile";
  *smem = llip_cuda_smem_bytes(p, backward);
  return nullptr;
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T, bool kLoss>
const char* launch_forward(LlipInputsPtr in, LlipDims p, int pos_offset, int has_pos, float* out, int grid_x,
                           cudaStream_t stream) {
  size_t smem = 0;
  if (const char* err = plan(&p, 0, &smem)) return err;
  auto kernel = forward_kernel<T, kLoss>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) != cudaSuccess)
    return last_error();
  const int ntiles = (p.Bt + p.BT - 1) / p.BT;
  const dim3 grid(kLoss ? max(1, min(grid_x, ntiles)) : ntiles, p.Bi);
  LLIP_LAUNCH(kernel, grid, kThreads, smem, stream, in, p, pos_offset, has_pos, out);
  return last_error();
}

template <typename T, int kMode>
const char* launch_backward_mode(const LlipInputsPtr& in, const LlipDims& p, size_t smem, int pos_offset, int has_pos,
                                 const float* gout, const LlipGradsPtr& grads, cudaStream_t stream) {
  auto kernel = sigmoid_bwd_kernel<T, kMode>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) != cudaSuccess)
    return last_error();
  const dim3 grid(kMode == kBwdTextSide ? (p.Bt + p.BT - 1) / p.BT : p.Bi);
  LLIP_LAUNCH(kernel, grid, kThreads, smem, stream, in, p, pos_offset, has_pos, gout, grads);
  return last_error();
}

template <typename T>
const char* launch_backward(LlipInputsPtr in, LlipDims p, int pos_offset, int has_pos, const float* gout,
                            LlipGradsPtr grads, int deterministic, cudaStream_t stream) {
  size_t smem = 0;
  if (const char* err = plan(&p, 1, &smem)) return err;
  if (!deterministic) return launch_backward_mode<T, kBwdAll>(in, p, smem, pos_offset, has_pos, gout, grads, stream);
  if (const char* err = launch_backward_mode<T, kBwdImageSide>(in, p, smem, pos_offset, has_pos, gout, grads, stream))
    return err;
  return launch_backward_mode<T, kBwdTextSide>(in, p, smem, pos_offset, has_pos, gout, grads, stream);
}

}  // namespace

size_t llip_cuda_smem_bytes(LlipDims dims, int backward) { return make_layout(dims, backward != 0).total; }

int llip_cuda_pick_bt(LlipDims dims, int backward, size_t max_smem) {
  for (int bt = 64; bt >= 16; bt /= 2) {
    dims.BT = bt;
    if (llip_cuda_smem_bytes(dims, backward) <= max_smem) return bt;
  }
  return 0;
}

const char* llip_cuda_cosine(LlipDtype dtype, LlipInputsPtr in, LlipDims dims, float* out, cudaStream_t stream) {
  if (dtype == LLIP_BF16) return launch_forward<__nv_bfloat16, false>(in, dims, 0, 0, out, 0, stream);
  return launch_forward<__half, false>(in, dims, 0, 0, out, 0, stream);
}

const char* llip_cuda_sigmoid_fwd(LlipDtype dtype, LlipInputsPtr in, LlipDims dims, int pos_offset, int has_pos,
                                  float* out, int grid_x, cudaStream_t stream) {
  if (dtype == LLIP_BF16)
    return launch_forward<__nv_bfloat16, true>(in, dims, pos_offset, has_pos, out, grid_x, stream);
  return launch_forward<__half, true>(in, dims, pos_offset, has_pos, out, grid_x, stream);
}

const char* llip_cuda_sigmoid_bwd(LlipDtype dtype, LlipInputsPtr in, LlipDims dims, int pos_offset, int has_pos,
                                  const float* gout, LlipGradsPtr grads, int deterministic, cudaStream_t stream) {
  if (dtype == LLIP_BF16)
    return launch_backward<__nv_bfloat16>(in, dims, pos_offset, has_pos, gout, grads, deterministic, stream);
  return launch_backward<__half>(in, dims, pos_offset, has_pos, gout, grads, deterministic, stream);
}

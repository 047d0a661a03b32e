// The data of the Llip CPU kernel's tiled sweeps, shared by its two translation units: llip_cpu.cpp (the sweeps,
// the float32 products, the Python bindings) and bf16_products.cpp (the products with bf16 operands).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace llip_cpu {

// Read-only inputs in the layouts the tile GEMMs want.
struct Inputs {
  int64_t Bi, Bt, H, K, d, D, HK, Ti, Tj;
  float tau;
  at::Tensor k, v;    // [Bi, H, K, d]
  at::Tensor qh, uh;  // [H, Bt, d]
  at::Tensor mh;      // [H, d, D]: rows of M = W_out W_out^T grouped by head
  // bf16 products (bf16_gemm.h): padded sizes (even reductions) and operands packed once per call.
  bool lowp = false;
  int64_t dp = 0, Btp = 0;  // d and Bt rounded up to even
  at::Tensor qT16, uT16;    // [H, dp/2, Btp, 2]: VNNI of Q_h^T / U_h^T [d, Bt] (scores: K_i Q^T)
  at::Tensor q16, u16;      // [H, Btp/2, d, 2]: VNNI of Q_h / U_h [Bt, d] (dK = dS Q, dV = dC U)
  at::Tensor m16;           // [H, dp/2, D, 2]: VNNI of M's rows of head h [d, D] (T_i = V_i M_h)
};

// Per-thread bf16 operands of the products (bf16 products only), plain row-major or VNNI (bf16_gemm.h). Flat:
// the shapes are those of the current block (ti images) and tile (tj texts); "p" marks a size rounded up to even.
struct Bf16Scratch {
  at::Tensor kb16, vb16;      // [H, ti*K, dp]: the block's keys / values (A of the scores)
  at::Tensor kbT16, vbT16;    // [H, d, (ti*K)p]: their transposes (A of dQ^T, dU^T and dM)
  at::Tensor G16;             // [ti, HK, HKp]: the block's Gram matrices (A of G_i a)
  at::Tensor T16;             // [HK, H, dp]: one image's T_i, each head's d columns padded to dp (A of G_i)
  at::Tensor Vt16v;           // [dp/2, K, 2]: VNNI of one head's values transposed, V_i[g]^T (B of G_i)
  at::Tensor transposed;      // float32 [d, ti*K]: one head's keys or values transposed, before rounding
  at::Tensor A16v;            // [ti, HKp/2, tj, 2]: attention a, VNNI (B of G_i a)
  at::Tensor S16, C16;        // [H, ti*K, tjp]: dS and ddot * a (A of dK, dV), written by pair_backward's loop
  at::Tensor S16v, C16v;      // [H, (ti*K)p/2, tj, 2]: the same, VNNI (B of dQ^T, dU^T)
  at::Tensor A16;             // [ti, HK, tjp]: a (A of dG^T), written by compute_tile's softmax loop
  at::Tensor P16, PT16v;      // [ti, HK, tjp]: dn2 * a (pair_backward's loop); [ti, tjp/2, HK, 2]: VNNI of its ^T
  // Backward of the Gram matrices (E_i = dG_i^T, as the tiles sum it).
  at::Tensor E16;             // [HK, HKp] (+ 2 zeros): E_i
  at::Tensor T16v;            // [ti, HKp/2, H * dp, 2]: VNNI of the block's T16
  at::Tensor V16v;            // [Kp/2, d, 2]: VNNI of one head's values V_i[g]
  at::Tensor Z, Zb, Zb16v;    // float32 [HK, D]: E_i blockdiag(V_i); [H, ti*K, D]: its rows per head; VNNI of one
  at::Tensor part;            // float32 output of one product before it joins a float64 sum
  at::Tensor dk32, dv32;      // float32 [H, ti*K, d]: the block's dK, dV summed over its text tiles
};

// Per-thread scratch.
struct Scratch {
  at::Tensor S, C;            // [H, Ti*K, Tj]: scores s (later ds), value scores c (later ddot * a; bf16 products:
  at::Tensor A, P;            // [Ti, HK, Tj]: attention a, G_i a (later dn2 * a)      those go to b16's S16, C16, P16)
  at::Tensor dot, n2;         // [Ti * Tj]
  at::Tensor ddot, dn2;       // [Ti * Tj] (backward)
  at::Tensor G, dG;           // [Ti, HK, HK]
  at::Tensor T;               // [Ti, HK, D]: rows V_i[h,k] M_h (M's rows of head h), shared by G and its backward
                              // (bf16 products: one image's, float32, before b16.T16 and b16.T16v)
  // float32 products only: dG, gs, Y, Ybuf, tile_out, dm_tile (bf16 products: b16)
  at::Tensor gs, Y, Ybuf;     // backward of G: [HK, HK], [D, HK] per image, [H, D, Ti*K] per block
  at::Tensor kbuf, vbuf;      // the block's keys / values, head-major [H, ti*K, d] (one row range per head)
  at::Tensor dkbuf, dvbuf;    // their gradients, summed over the text tiles of the block in float64
  at::Tensor kb, vb, dkb, dvb;  // views of the above for the current block
  at::Tensor tile_out;        // float32 result of one gradient GEMM of a tile, before it joins a float64 sum
  at::Tensor dGtile;          // [Ti, HK, HK] float32: one tile's dG (bf16 products: the block's dG^T), lower blocks
  at::Tensor dm_tile;         // [D, d] float32: one head's block of dM, before it joins the float64 dM
  std::vector<float> mx, sm;  // [Tj]
  Bf16Scratch b16;
};

struct Tile {
  int64_t i0, ti, j0, tj;
};

// A product's float32 partial joins its float64 sum: dst[e] += scale * src[e] for n elements. (ATen's add_ with
// the float -> double promotion is a generic strided loop, several times slower at these sizes.)
inline void add_partial(double* dst, const float* src, int64_t n, double scale = 1.0) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) dst[e] += scale * src[e];
}

// dG_i = sum_j dn2_ij a_ij a_ij^T is symmetric, so the tiles compute it by row blocks of kGramRows, each only up
// to the end of its diagonal block: the lower block triangle, 62.5% of the full product at HK = 256.
// mirror_lower_blocks then fills in the rest before dG is used.
constexpr int64_t kGramRows = 64;

// x [n, n], valid on and below its diagonal blocks of kGramRows rows: the blocks above copied from their mirrors.
template <typename T>
void mirror_lower_blocks(T* x, int64_t n) {
  for (int64_t r0 = 0; r0 < n; r0 += kGramRows)
    for (int64_t r = r0; r < std::min(n, r0 + kGramRows); ++r)
      for (int64_t c = r0 + kGramRows; c < n; ++c) x[r * n + c] = x[c * n + r];
}

// bf16_products.cpp: the bf16 products (Inputs::lowp). The float32 inputs are rounded to bf16 operands as they are
// packed; every product accumulates in float32 and leaves float32 for the same softmax and norms as the float32
// path, whose backward loop writes the gradient products' operands in bf16 directly.
void prepare_bf16(Inputs& in);                                         // the per-call packs (texts, M)
void make_bf16_scratch(const Inputs& in, bool backward, Bf16Scratch& s);
void gram_block_bf16(const Inputs& in, int64_t ti, Scratch& sc);      // G (and the block's packs), after kb / vb
void tile_scores_bf16(const Inputs& in, Scratch& sc, const Tile& t);  // S and C of a tile
void tile_gram_a_bf16(const Inputs& in, Scratch& sc, const Tile& t);  // P = G_i a, once A holds a
void tile_gradients_bf16(const Inputs& in, Scratch& sc, const Tile& t, float* dq, float* du, int64_t pass_len,
                         int64_t jp);
void gram_block_backward_bf16(const Inputs& in, int64_t ti, Scratch& sc, float* dm32);

}  // namespace llip_cpu

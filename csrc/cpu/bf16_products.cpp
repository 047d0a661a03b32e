// The Llip CPU kernel's products with bf16 operands and float32 accumulation (bf16 inputs; docs/design.md section 8).
//
// The sweeps, the softmax, norms, losses and every reduction are those of llip_cpu.cpp, in float32 / float64; only
// the GEMM-shaped products change: each operand is rounded to bf16 once, as it is packed (exact for values that came
// from bf16 inputs), and the products run on oneDNN's bf16 micro-kernel (bf16_gemm.h). B operands are packed in the
// VNNI layout, so the products are arranged to make the packs cheap:
//   - per call:  Q^T, U^T (scores) and Q, U (dK, dV), M's rows per head (T_i = V_i M_h);
//   - per block: K, V (scores), K^T, V^T (dQ^T, dU^T, dM), G_i;
//   - per tile:  a (G_i a), dS and ddot a in both layouts, (dn2 a)^T.
// dQ and dU come out transposed (dQ^T = K^T dS), the tiles sum dG^T = a (dn2 a)^T rather than dG, and the backward
// of the Gram matrices runs on dG^T, which makes dM^T; pair_backward transposes it back. The gradient products
// accumulate in float32 in the micro-kernel across at most a pass's tiles of one block (dK, dV, dG) or 16 blocks
// (dQ, dU, dM) before pair_backward adds them into float64: 2^-24 per partial, far below the 2^-9 of the bf16
// gradients.

#include <cstring>

#include "bf16_gemm.h"
#include "tiles.h"

namespace llip_cpu {

namespace {

// dst [cols, ld_dst] = src [rows, cols]^T in bf16, with a zero pad column when rows is odd; tmp: rows * cols floats.
void transpose_to_bf16(const float* src, int64_t rows, int64_t cols, float* tmp, bf16* dst, int64_t ld_dst) {
  transpose32(reinterpret_cast<const uint32_t*>(src), cols, rows, cols, reinterpret_cast<uint32_t*>(tmp), rows);
  to_bf16_rows(tmp, rows, cols, rows, dst, ld_dst);
}

template <typename T>
T* ptr(const at::Tensor& x) {
  return x.data_ptr<T>();
}

}  // namespace

void prepare_bf16(Inputs& in) {
  const int64_t H = in.H, d = in.d, D = in.D, Bt = in.Bt;
  in.dp = round_up2(d), in.Btp = round_up2(Bt);
  auto b16 = in.qh.options().dtype(at::kBFloat16);
  in.qT16 = at::zeros({H, in.dp / 2, in.Btp, 2}, b16), in.uT16 = at::zeros({H, in.dp / 2, in.Btp, 2}, b16);
  in.q16 = at::empty({H, in.Btp / 2, d, 2}, b16), in.u16 = at::empty({H, in.Btp / 2, d, 2}, b16);
  in.m16 = at::empty({H, in.dp / 2, D, 2}, b16);
  for (int64_t h = 0; h < H; ++h) {
    const float* q = ptr<float>(in.qh[h]);
    const float* u = ptr<float>(in.uh[h]);
    pack_vnni_transposed(q, d, Bt, d, ptr<bf16>(in.qT16[h]), in.Btp);
    pack_vnni_transposed(u, d, Bt, d, ptr<bf16>(in.uT16[h]), in.Btp);
    pack_vnni(q, d, Bt, d, ptr<bf16>(in.q16[h]), d);
    pack_vnni(u, d, Bt, d, ptr<bf16>(in.u16[h]), d);
    pack_vnni(ptr<float>(in.mh[h]), D, d, D, ptr<bf16>(in.m16[h]), D);
  }
}

void make_bf16_scratch(const Inputs& in, bool backward, Bf16Scratch& s) {
  auto b16 = in.v.options().dtype(at::kBFloat16);
  auto f32 = in.v.options().dtype(at::kFloat);
  const int64_t H = in.H, K = in.K, d = in.d, D = in.D, HK = in.HK, HKp = round_up2(HK);
  const int64_t tiK = in.Ti * K, tiKp = round_up2(tiK), Tjp = round_up2(in.Tj);
  s.kb16 = at::empty({H * tiK * in.dp}, b16), s.vb16 = at::empty({H * tiK * in.dp}, b16);
  s.G16 = at::empty({in.Ti * HK * HKp}, b16);
  s.T16 = at::empty({HK * H * in.dp}, b16);
  s.Vt16v = at::empty({in.dp * K}, b16);
  s.A16v = at::empty({in.Ti * HKp * in.Tj}, b16);
  s.A16 = at::empty({in.Ti * HK * Tjp}, b16);
  if (!backward) return;
  s.kbT16 = at::empty({H * d * tiKp}, b16), s.vbT16 = at::empty({H * d * tiKp}, b16);
  s.transposed = at::empty({d * tiK}, f32);
  s.T16v = at::empty({in.Ti * HKp * H * in.dp}, b16);
  s.S16 = at::empty({H * tiK * Tjp}, b16), s.C16 = at::empty({H * tiK * Tjp}, b16);
  s.S16v = at::empty({H * tiKp * in.Tj}, b16), s.C16v = at::empty({H * tiKp * in.Tj}, b16);
  s.P16 = at::empty({in.Ti * HK * Tjp}, b16), s.PT16v = at::empty({in.Ti * Tjp * HK}, b16);
  // E16's products read K rounded up to even columns from each head's first: with K odd, the last head's read
  // runs one element past the matrix, onto these zeros.
  s.E16 = at::zeros({HK * HKp + 2}, b16);
  s.V16v = at::empty({round_up2(K) * d}, b16);
  s.Z = at::empty({HK * D}, f32), s.Zb = at::empty({H * tiK * D}, f32), s.Zb16v = at::empty({tiKp * D}, b16);
  s.part = at::empty({K * d}, f32);
  s.dk32 = at::empty({H * tiK * d}, f32), s.dv32 = at::empty({H * tiK * d}, f32);
}

// The block's operands: keys and values (and their transposes for the backward pass), then per image
// T_i[h] = V_i[h] M_h ([K, dp] x [dp, D], float32, rounded to bf16 with each head's d columns padded to dp: T16)
// and G_i by column blocks, G_i[:, g-block] = T_i[:, g-block] V_i[g]^T ([HK, dp] x [dp, K]): G is symmetric, so
// these are llip_cpu.cpp's row blocks, transposed. G is rounded to bf16 once more as the A of G_i a; the backward
// pass keeps T_i's VNNI pack (T16v) for the block's end.
void gram_block_bf16(const Inputs& in, int64_t ti, Scratch& sc) {
  Bf16Scratch& b = sc.b16;
  const int64_t H = in.H, K = in.K, d = in.d, dp = in.dp, D = in.D, HK = in.HK, HKp = round_up2(HK);
  const int64_t tiK = ti * K, tiKp = round_up2(tiK), ld_t = H * dp;
  const float* kb = ptr<float>(sc.kb);
  const float* vb = ptr<float>(sc.vb);
  to_bf16_rows(kb, d, H * tiK, d, ptr<bf16>(b.kb16), dp);
  to_bf16_rows(vb, d, H * tiK, d, ptr<bf16>(b.vb16), dp);
  const bool backward = b.kbT16.defined();
  if (backward) {
    for (int64_t h = 0; h < H; ++h) {
      float* tmp = ptr<float>(b.transposed);
      transpose_to_bf16(kb + h * tiK * d, tiK, d, tmp, ptr<bf16>(b.kbT16) + h * d * tiKp, tiKp);
      transpose_to_bf16(vb + h * tiK * d, tiK, d, tmp, ptr<bf16>(b.vbT16) + h * d * tiKp, tiKp);
    }
  }
  const bf16* v16 = ptr<bf16>(b.vb16);
  bf16* t16 = ptr<bf16>(b.T16);
  bf16* vt16v = ptr<bf16>(b.Vt16v);
  float* Ti = ptr<float>(sc.T);  // one image at a time
  for (int64_t i = 0; i < ti; ++i) {
    float* Gi = ptr<float>(sc.G) + i * HK * HK;
    for (int64_t h = 0; h < H; ++h)
      gemm_bf16(K, D, dp, v16 + (h * tiK + i * K) * dp, dp, ptr<bf16>(in.m16) + h * dp * D, D, Ti + h * K * D, D,
                false);
    for (int64_t h = 0; h < H; ++h) to_bf16_rows(Ti + h * d, D, HK, d, t16 + h * dp, ld_t);
    if (backward) pack_vnni_bf16(t16, ld_t, HK, ld_t, ptr<bf16>(b.T16v) + i * HKp * ld_t, ld_t);
    for (int64_t g = 0; g < H; ++g) {
      transpose_pairs(v16 + (g * tiK + i * K) * dp, dp, K, d, vt16v, K);  // VNNI of V_i[g]^T [dp, K]
      gemm_bf16(HK, K, dp, t16 + g * dp, ld_t, vt16v, K, Gi + g * K, HK, false);
    }
    to_bf16_rows(Gi, HK, HK, HK, ptr<bf16>(b.G16) + i * HK * HKp, HKp);
  }
}

// S_h = K_h Q_h^T and C_h = V_h U_h^T for the tile's texts: [ti*K, dp] x [dp, tj] from the VNNI columns j0.. of
// the packed Q^T / U^T.
void tile_scores_bf16(const Inputs& in, Scratch& sc, const Tile& t) {
  const int64_t tiK = t.ti * in.K, dp = in.dp, tj = t.tj, per_head = dp * in.Btp;
  for (int64_t h = 0; h < in.H; ++h) {
    gemm_bf16(tiK, tj, dp, ptr<bf16>(sc.b16.kb16) + h * tiK * dp, dp, ptr<bf16>(in.qT16) + h * per_head + 2 * t.j0,
              in.Btp, ptr<float>(sc.S) + h * tiK * tj, tj, false);
    gemm_bf16(tiK, tj, dp, ptr<bf16>(sc.b16.vb16) + h * tiK * dp, dp, ptr<bf16>(in.uT16) + h * per_head + 2 * t.j0,
              in.Btp, ptr<float>(sc.C) + h * tiK * tj, tj, false);
  }
}

// P_i = G_i a_i for every text of the tile: [HK, HKp] x VNNI of a_i [HKp, tj], per image, packed from a_i's plain
// bf16 copy (A16, written by the softmax loop of compute_tile).
void tile_gram_a_bf16(const Inputs& in, Scratch& sc, const Tile& t) {
  const int64_t HK = in.HK, HKp = round_up2(HK), tj = t.tj, tjp = round_up2(tj);
  for (int64_t i = 0; i < t.ti; ++i) {
    bf16* a16 = ptr<bf16>(sc.b16.A16) + i * HK * tjp;
    bf16* av = ptr<bf16>(sc.b16.A16v) + i * HKp * tj;
    pack_vnni_bf16(a16, tjp, HK, tj, av, tj);
    gemm_bf16(HK, tj, HKp, ptr<bf16>(sc.b16.G16) + i * HK * HKp, HKp, av, tj, ptr<float>(sc.P) + i * HK * tj, tj,
              false);
  }
}

// The gradient products of one tile. On entry the bf16 operands hold dS and ddot * a (S16, C16: [H, ti*K, tjp]),
// dn2 * a and a (P16, A16: [ti, HK, tjp]), as pair_backward's elementwise loop and compute_tile wrote them. The
// products accumulate in float32 (the micro-kernel adds into its output): the block's dK, dV in b.dk32 / b.dv32
// and dG_i^T += a_i (dn2 a_i)^T, lower block triangle only (tiles.h), in sc.dGtile (all zeroed when the block
// starts), the pass's dQ^T, dU^T in dq, du ([H, d, pass_len], this tile's texts from column jp). pair_backward
// moves dK, dV into float64 sums after every block and dQ, dU (and dM) every few blocks (docs/design.md section
// 6), so none has more than a few float32 terms; dG^T is used once per block, mirrored and rounded to bf16.
void tile_gradients_bf16(const Inputs& in, Scratch& sc, const Tile& t, float* dq, float* du, int64_t pass_len,
                         int64_t jp) {
  Bf16Scratch& b = sc.b16;
  const int64_t H = in.H, d = in.d, HK = in.HK, ti = t.ti, tj = t.tj;
  const int64_t tiK = ti * in.K, tiKp = round_up2(tiK), tjp = round_up2(tj);
  const int64_t per_head = in.Btp * d;  // elements per head of q16 / u16
  for (int64_t h = 0; h < H; ++h) {
    bf16* ds16 = ptr<bf16>(b.S16) + h * tiK * tjp;
    bf16* dc16 = ptr<bf16>(b.C16) + h * tiK * tjp;
    bf16* ds16v = ptr<bf16>(b.S16v) + h * tiKp * tj;
    bf16* dc16v = ptr<bf16>(b.C16v) + h * tiKp * tj;
    pack_vnni_bf16(ds16, tjp, tiK, tj, ds16v, tj);
    pack_vnni_bf16(dc16, tjp, tiK, tj, dc16v, tj);
    // dK_h += dS_h Q_h[j0:]: [tiK, tjp] x [tjp, d] (the texts' VNNI rows from j0, which is even); dV_h alike.
    gemm_bf16(tiK, d, tjp, ds16, tjp, ptr<bf16>(in.q16) + h * per_head + t.j0 * d, d,
              ptr<float>(b.dk32) + h * tiK * d, d, true);
    gemm_bf16(tiK, d, tjp, dc16, tjp, ptr<bf16>(in.u16) + h * per_head + t.j0 * d, d,
              ptr<float>(b.dv32) + h * tiK * d, d, true);
    // dQ_h^T += K_h^T dS_h: [d, tiKp] x [tiKp, tj], in place in the pass's dQ^T (columns jp..); dU_h^T alike.
    gemm_bf16(d, tj, tiKp, ptr<bf16>(b.kbT16) + h * d * tiKp, tiKp, ds16v, tj, dq + h * d * pass_len + jp, pass_len,
              true);
    gemm_bf16(d, tj, tiKp, ptr<bf16>(b.vbT16) + h * d * tiKp, tiKp, dc16v, tj, du + h * d * pass_len + jp, pass_len,
              true);
  }
  for (int64_t i = 0; i < ti; ++i) {  // dG_i^T += a_i (dn2 a_i)^T: [HK, tjp] x [tjp, HK]
    bf16* a16 = ptr<bf16>(b.A16) + i * HK * tjp;
    bf16* pt16v = ptr<bf16>(b.PT16v) + i * tjp * HK;
    transpose_pairs(ptr<bf16>(b.P16) + i * HK * tjp, tjp, HK, tj, pt16v, HK);
    float* dg = ptr<float>(sc.dGtile) + i * HK * HK;
    for (int64_t r0 = 0; r0 < HK; r0 += kGramRows) {  // the lower block triangle (tiles.h)
      const int64_t rows = std::min(kGramRows, HK - r0);
      gemm_bf16(rows, r0 + rows, tjp, a16 + r0 * tjp, tjp, pt16v, HK, dg + r0 * HK, HK, true);
    }
  }
}

// llip_cpu.cpp's gram_block_backward on E_i = dG_i^T (what the tiles summed), per image:
//   dV_i[h] += 2 E_i[h rows] T_i[:, h-block]                       ([K, HKp] x [HKp, d])
//   Z_i[:, g-block] = E_i[:, g cols] V_i[g]                          ([HK, Kp] x [Kp, d])
// and per block dM'[h-block, :] += sum_i V_i[h]^T Z_i[h rows]        ([d, (ti K)p] x [(ti K)p, D]),
// where dM' = sum_i blockdiag(V_i)^T E_i blockdiag(V_i) = dM^T. E_i = sum_j dn2_ij a_ij a_ij^T is symmetric, so
// the (dG + dG^T) of the float32 path is 2 E_i here (the two differ by the bf16 rounding of its factors). dV goes
// into the block's float64 sums (sc.dvb, [H, ti*K, d]); dM^T is added into dm32 (float32 [D, D]), which
// pair_backward moves into float64 every few blocks as it does dQ and dU.
void gram_block_backward_bf16(const Inputs& in, int64_t ti, Scratch& sc, float* dm32) {
  Bf16Scratch& b = sc.b16;
  const int64_t H = in.H, K = in.K, Kp = round_up2(K), d = in.d, dp = in.dp, D = in.D, HK = in.HK;
  const int64_t HKp = round_up2(HK), tiK = ti * K, tiKp = round_up2(tiK), ld_t = H * dp;
  float* part = ptr<float>(b.part);
  float* Z = ptr<float>(b.Z);
  float* Zb = ptr<float>(b.Zb);
  double* dvb = ptr<double>(sc.dvb);
  for (int64_t i = 0; i < ti; ++i) {
    float* E = ptr<float>(sc.dGtile) + i * HK * HK;
    mirror_lower_blocks(E, HK);
    to_bf16_rows(E, HK, HK, HK, ptr<bf16>(b.E16), HKp);
    const bf16* t16v = ptr<bf16>(b.T16v) + i * HKp * ld_t;
    for (int64_t h = 0; h < H; ++h) {
      gemm_bf16(K, d, HKp, ptr<bf16>(b.E16) + h * K * HKp, HKp, t16v + 2 * h * dp, ld_t, part, d, false);
      add_partial(dvb + (h * tiK + i * K) * d, part, K * d, 2.0);
    }
    for (int64_t g = 0; g < H; ++g) {
      pack_vnni_bf16(ptr<bf16>(b.vb16) + (g * tiK + i * K) * dp, dp, K, d, ptr<bf16>(b.V16v), d);
      gemm_bf16(HK, d, Kp, ptr<bf16>(b.E16) + g * K, HKp, ptr<bf16>(b.V16v), d, Z + g * d, D, false);
    }
    for (int64_t h = 0; h < H; ++h) std::memcpy(Zb + (h * tiK + i * K) * D, Z + h * K * D, K * D * sizeof(float));
  }
  for (int64_t h = 0; h < H; ++h) {
    pack_vnni(Zb + h * tiK * D, D, tiK, D, ptr<bf16>(b.Zb16v), D);
    gemm_bf16(d, D, tiKp, ptr<bf16>(b.vbT16) + h * d * tiKp, tiKp, ptr<bf16>(b.Zb16v), D, dm32 + h * d * D, D,
              true);
  }
}

}  // namespace llip_cpu

// Fused Llip scores and losses on the CPU (backend "cpu"), algebraic form 3 of docs/design.md section 4.
//
// Per (image i, text j) pair, with s[h,k] = <K_i[h,k], Q_j[h]>, a = softmax_k(s / tau) per head,
// c[h,k] = <V_i[h,k], U_j[h]> (U_j = W_out @ y_hat_j, computed once per text by the caller) and the per-image
// Gram matrix G_i = V'_i V'_i^T of the projected values V'_i[h,k] = V_i[h,k] @ W_out[h*d:(h+1)*d, :]:
//
//     dot = sum_hk a c,   n2 = a^T G_i a,   cos(z_ij, y_j) = dot / max(sqrt(n2), 1e-12)
//
// at 4KD + 2(HK)^2 FLOPs per pair instead of the as-written 4KD + 2D^2.
//
// Parallelism: images are cut into blocks of Ti; OpenMP threads (at::parallel_for) take contiguous runs of
// blocks, and each thread walks its blocks against all texts in tiles of Tj with its own scratch. One fork-join
// per call keeps 2 busy cores from stalling at a barrier per tile, and single-threaded ATen GEMMs (MKL inside a
// parallel region) on [Ti*K, d] x [d, Tj] and [HK, HK] x [HK, Tj] tiles carry the heavy products. Our own loops
// (softmax over K, reductions, the backward's elementwise algebra) run along texts, contiguous, with omp simd.
//
// Memory: scratch per thread is 4 tiles of HK*Ti*Tj floats plus the block's G (Ti*(HK)^2), V M (Ti*HK*D) and
// head-major keys / values (and their gradients); never Bi*Bt*K or Bi*Bt*D, and the losses keep only per-row / per-column statistics (nothing Bi*Bt).
// G is recomputed per image block (forward and backward) instead of being stored for all Bi images, and its
// gradient is folded into dV and dM per block. The backward pass recomputes tiles (FlashAttention recipe).
//
// Determinism: every reduction has a fixed order for a given thread count (text tiles in order within a block;
// per-thread partial sums of dQ, dU, dM and of the losses added in thread order), so repeated calls are bitwise
// identical.
//
// Tensors are float32 (the Python wrapper upcasts fp16 inputs, and bf16 ones on CPUs without bf16 products, once:
// O(Bi + Bt) work). With bf16_products (bf16
// inputs, on CPUs that have bf16 dot products: bf16_gemm.h), k, v and q may stay bf16 (each image block is widened
// as it is made head-major; their gradients come back in bf16), and every product (the Gram matrices, scores,
// value scores, G_i a and the gradient products) takes bf16 operands with float32 accumulation
// (bf16_products.cpp); the softmax, norms, losses and reductions are the same code, in float32 / float64, and the
// elementwise loops write the products' bf16 operands directly.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "bf16_gemm.h"
#include "fast_math.h"
#include "tiles.h"

// torch's MKL (when torch has one) turns MKL's dynamic threading off, so a GEMM called inside our OpenMP region
// would open a nested team per call and the threads thrash (20x slower measured on 2 cores). Each of our threads
// asks MKL for one thread instead. Weak, so a torch built without MKL still loads this extension.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace {

using llip_cpu::Inputs;
using llip_cpu::Scratch;
using llip_cpu::Tile;

// llip_cpu::add_partial on tensors: a contiguous float64 sum += a contiguous float32 partial of the same size.
void add_partial(const at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous() && dst.numel() == src.numel(), "llip cpu kernel: add_partial");
  llip_cpu::add_partial(dst.data_ptr<double>(), src.data_ptr<float>(), dst.numel());
}

// Single-threaded MKL on this thread for the life of the guard (no-op without MKL).
struct SerialBlasGuard {
  int previous = 0;
  SerialBlasGuard() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlasGuard() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

constexpr float kEps = 1e-12f;  // F.normalize's clamp on the norm of z
constexpr double kLog2e = 1.4426950408889634;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// The op family; the values are llip_kernels.algebra.Op codes (exported below as OP_*, and checked by the tests).
// kLogits computes cos(z_ij, y_j); the caller applies t and b.
enum Op : int64_t { kLogits = 0, kSigmoidLoss = 1, kSoftmaxLoss = 2 };

void check_input(const at::Tensor& x, const char* name, int64_t ndim, bool bf16_ok = false) {
  TORCH_CHECK(x.device().is_cpu(), "llip cpu kernel: ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || (bf16_ok && x.scalar_type() == at::kBFloat16), "llip cpu kernel: ",
              name, " must be float32", bf16_ok ? " or bfloat16" : "", ", got ", x.scalar_type());
  TORCH_CHECK(x.dim() == ndim, "llip cpu kernel: ", name, " must have ", ndim, " dims, got ", x.sizes());
}

Inputs make_inputs(const at::Tensor& k, const at::Tensor& v, const at::Tensor& q, const at::Tensor& u,
                   const at::Tensor& m, double tau, int64_t Ti, int64_t Tj, bool bf16_products) {
  // With bf16 products, k, v and q may come as bf16 (no float32 copies of the inputs in the caller): the blocks are
  // converted as they are made head-major, and their gradients come back in bf16.
  check_input(k, "k", 4, bf16_products);
  check_input(v, "v", 4, bf16_products);
  check_input(q, "q", 3, bf16_products);
  check_input(u, "u", 3);
  check_input(m, "m", 2);
  Inputs in;
  in.Bi = k.size(0), in.H = k.size(1), in.K = k.size(2), in.d = k.size(3), in.Bt = q.size(0);
  in.D = in.H * in.d, in.HK = in.H * in.K;
  TORCH_CHECK(v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(), "llip cpu kernel: v must be like k");
  TORCH_CHECK(q.size(1) == in.H && q.size(2) == in.d && u.sizes() == q.sizes(), "llip cpu kernel: q/u shape mismatch");
  TORCH_CHECK(m.size(0) == in.D && m.size(1) == in.D, "llip cpu kernel: m must be [D, D]");
  TORCH_CHECK(tau > 0, "llip cpu kernel: tau must be > 0");
  in.tau = static_cast<float>(tau);
  // Smaller image blocks when there are few images, so that every thread gets some.
  const int64_t per_thread = (in.Bi + at::get_num_threads() - 1) / at::get_num_threads();
  in.Ti = std::max<int64_t>(1, std::min({Ti, in.Bi, per_thread}));
  in.Tj = std::max<int64_t>(1, std::min(Tj, in.Bt));
  in.k = k.contiguous();
  in.v = v.contiguous();
  in.qh = q.permute({1, 0, 2}).to(at::kFloat).contiguous();
  in.uh = u.permute({1, 0, 2}).contiguous();
  in.mh = m.contiguous().view({in.H, in.d, in.D});
  if (bf16_products) {
    TORCH_CHECK(llip_cpu::bf16_gemm_available(), "llip cpu kernel: bf16 products asked for, but this CPU / torch "
                "build has no bf16 GEMM micro-kernel (check bf16_products_available() first)");
    in.lowp = true;
    // Every tile but the last starts at an even text, where a row pair of the VNNI-packed Q and U begins.
    if (in.Tj < in.Bt && (in.Tj & 1)) in.Tj += 1;
    llip_cpu::prepare_bf16(in);
  }
  return in;
}

std::vector<Scratch> make_scratch(const Inputs& in, int64_t n, bool backward) {
  std::vector<Scratch> out(n);
  auto opts = in.v.options().dtype(at::kFloat);
  const int64_t tile = in.HK * in.Ti * in.Tj, pairs = in.Ti * in.Tj;
  for (auto& s : out) {
    s.S = at::empty({tile}, opts), s.C = at::empty({tile}, opts);
    s.A = at::empty({tile}, opts), s.P = at::empty({tile}, opts);
    s.dot = at::empty({pairs}, opts), s.n2 = at::empty({pairs}, opts);
    if (backward) {
      s.ddot = at::empty({pairs}, opts), s.dn2 = at::empty({pairs}, opts);
      s.dGtile = at::zeros({in.Ti, in.HK, in.HK}, opts);  // the blocks above the lower triangle stay zero
    }
    if (backward && !in.lowp) {  // the float32 products' gradient buffers (bf16 products: Scratch::b16)
      s.dG = at::empty({in.Ti, in.HK, in.HK}, opts.dtype(at::kDouble));
      s.tile_out = at::empty({std::max(in.Ti * in.K, in.Tj) * in.d}, opts);
      s.dm_tile = at::empty({in.D, in.d}, opts);
      s.gs = at::empty({in.HK, in.HK}, opts), s.Y = at::empty({in.D, in.HK}, opts);
      s.Ybuf = at::empty({in.H, in.D, in.Ti * in.K}, opts);
    }
    s.G = at::empty({in.Ti, in.HK, in.HK}, opts);
    s.T = at::empty({in.lowp ? 1 : in.Ti, in.HK, in.D}, opts);
    s.kbuf = at::empty({in.Ti * in.HK * in.d}, opts), s.vbuf = at::empty({in.Ti * in.HK * in.d}, opts);
    if (backward) {
      s.dkbuf = at::empty({in.Ti * in.HK * in.d}, opts.dtype(at::kDouble));
      s.dvbuf = at::empty({in.Ti * in.HK * in.d}, opts.dtype(at::kDouble));
    }
    s.mx.resize(in.Tj), s.sm.resize(in.Tj);
    if (in.lowp) llip_cpu::make_bf16_scratch(in, backward, s.b16);
  }
  return out;
}

at::Tensor head_view(const at::Tensor& buf, const Inputs& in, const Tile& t) {
  return buf.narrow(0, 0, in.HK * t.ti * t.tj).view({in.H, t.ti * in.K, t.tj});
}
at::Tensor image_view(const at::Tensor& buf, const Inputs& in, const Tile& t) {
  return buf.narrow(0, 0, in.HK * t.ti * t.tj).view({t.ti, in.HK, t.tj});
}

// G_i for the images [i0, i0 + ti): G_i[(h,k),(g,m)] = V_i[h,k] M_hg V_i[g,m]^T with M = W_out W_out^T, i.e.
// T_i = V_i M per head (rows (h,k): V_i[h,k] M_h, 2 HK d D per image), then T_i against V_i (2 (HK)^2 d), cheaper
// than forming V' (2 (HK)^2 D). Per image, two batched GEMMs over heads that read and write the buffers in place
// (strided operands, no permute copies). G is symmetric, so it is filled by row blocks:
// G_i[(g,m), :] = V_i[g,m] . T_i[:, g-th d-block]^T.
void gram_block(const Inputs& in, int64_t i0, int64_t ti, Scratch& sc) {
  const int64_t H = in.H, K = in.K, d = in.d, D = in.D, HK = in.HK;
  // buf [H, ti*K, d] float32 = the block's images of src [Bi, H, K, d] (float32, or bf16 widened exactly): one
  // contiguous run of K*d per (image, head).
  auto head_major = [&](const at::Tensor& buf, const at::Tensor& src) {
    float* dst = buf.data_ptr<float>();
    const int64_t run = K * d;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < ti; ++i) {
        float* out = dst + (h * ti + i) * run;
        const int64_t from = ((i0 + i) * H + h) * run;
        if (src.scalar_type() == at::kFloat) {
          std::memcpy(out, src.data_ptr<float>() + from, run * sizeof(float));
        } else {
          const llip_cpu::bf16* in = src.data_ptr<llip_cpu::bf16>() + from;
#pragma omp simd
          for (int64_t e = 0; e < run; ++e) out[e] = static_cast<float>(in[e]);
        }
      }
    return buf.narrow(0, 0, ti * HK * d).view({H, ti * K, d});
  };
  sc.kb = head_major(sc.kbuf, in.k);
  sc.vb = head_major(sc.vbuf, in.v);
  if (in.lowp) return llip_cpu::gram_block_bf16(in, ti, sc);
  for (int64_t i = 0; i < ti; ++i) {
    at::Tensor vi = in.v[i0 + i];                                   // [H, K, d]
    at::Tensor Ti = sc.T[i];                                         // [HK, D]
    at::Tensor Ti_heads = Ti.view({H, K, D});
    at::bmm_out(Ti_heads, vi, in.mh);                                // V_i[h] M_h
    at::Tensor Ti_blocks = Ti.view({HK, H, d}).permute({1, 2, 0});  // [H(g), d, HK]: T_i[:, g-block]^T
    at::Tensor Gi_rows = sc.G[i].view({H, K, HK});
    at::bmm_out(Gi_rows, vi, Ti_blocks);
  }
}

// Pull dG of the block back to dV (both factors of G; M is symmetric) and to dM (accumulated per thread):
//   dV_i[h] += (dG_i + dG_i^T)[h rows] T_i[:, h-block],        dM[:, g-block] += sum_i Y_i[:, g cols] V_i[g]
// with Y_i = blockdiag(V_i)^T dG_i ([D, HK], per head h: V_i[h]^T dG_i[h rows]). The Y_i of the block are
// gathered per g so that dM takes one GEMM per head over all ti*K rows (the head-major values vb[g]).
void gram_block_backward(const Inputs& in, int64_t i0, int64_t ti, Scratch& sc, at::Tensor& dm) {
  const int64_t H = in.H, K = in.K, d = in.d, D = in.D, HK = in.HK;
  at::Tensor ybuf = sc.Ybuf.narrow(2, 0, ti * K).view({H, D, ti, K});
  for (int64_t i = 0; i < ti; ++i) {
    at::Tensor vi = in.v[i0 + i];  // [H, K, d]
    llip_cpu::mirror_lower_blocks(sc.dG[i].data_ptr<double>(), HK);  // the tiles summed the lower blocks only
    sc.gs.copy_(sc.dG[i] + sc.dG[i].t());  // dG + dG^T, summed in float64, back to float32 for the GEMMs
    at::Tensor dGi = sc.gs;
    at::Tensor Ti_blocks = sc.T[i].view({HK, H, d}).permute({1, 0, 2});  // [H(h), HK, d]: T_i[:, h-block]
    at::Tensor dvi = sc.tile_out.narrow(0, 0, K * d).view({K, d});
    for (int64_t h = 0; h < H; ++h) {  // dV_i[h] += (dG + dG^T)[h rows] T_i[:, h-block], into the block's dV
      at::mm_out(dvi, dGi.view({H, K, HK})[h], Ti_blocks[h]);
      add_partial(sc.dvb[h].narrow(0, i * K, K), dvi);
    }
    at::Tensor Y_heads = sc.Y.view({H, d, HK});
    at::Tensor dG_half = sc.gs;  // free again once dV has it
    dG_half.copy_(sc.dG[i]);  // dG alone (float32) for dM
    at::bmm_out(Y_heads, vi.transpose(1, 2), dG_half.view({H, K, HK}));
    ybuf.select(2, i).copy_(sc.Y.view({D, H, K}).permute({1, 0, 2}));  // [H(g), D, K]
  }
  at::Tensor dm_blocks = dm.view({D, H, d});  // float64, per thread
  at::Tensor dm_g = sc.dm_tile;  // [D, d] float32
  for (int64_t g = 0; g < H; ++g) {
    at::mm_out(dm_g, sc.Ybuf[g].narrow(1, 0, ti * K), sc.vb[g]);  // [D, ti*K] x [ti*K, d]
    dm_blocks.select(1, g).add_(dm_g);
  }
}

// Forward of one tile: fills A (attention), C (value scores), P (G_i a), dot and n2 for the ti x tj pairs.
void compute_tile(const Inputs& in, Scratch& sc, const Tile& t) {
  const int64_t H = in.H, K = in.K, HK = in.HK, ti = t.ti, tj = t.tj;
  if (in.lowp) {
    llip_cpu::tile_scores_bf16(in, sc, t);
  } else {
    at::Tensor S = head_view(sc.S, in, t), C = head_view(sc.C, in, t);
    for (int64_t h = 0; h < H; ++h) {
      at::Tensor Sh = S[h], Ch = C[h];
      at::mm_out(Sh, sc.kb[h], in.qh[h].narrow(0, t.j0, tj).t());  // [ti*K, tj]
      at::mm_out(Ch, sc.vb[h], in.uh[h].narrow(0, t.j0, tj).t());  // [ti*K, tj]
    }
  }
  const float* Sp = sc.S.data_ptr<float>();
  const float* Cp = sc.C.data_ptr<float>();
  float* Ap = sc.A.data_ptr<float>();
  float* mx = sc.mx.data();
  float* sm = sc.sm.data();
  const float scale = static_cast<float>(kLog2e / in.tau);  // exp(s / tau) = 2^(s * log2(e) / tau)
  const int64_t tjp = llip_cpu::round_up2(tj);
  llip_cpu::bf16* a16 = in.lowp ? sc.b16.A16.data_ptr<llip_cpu::bf16>() : nullptr;  // [ti, HK, tjp]
  for (int64_t i = 0; i < ti; ++i) {
    float* dr = sc.dot.data_ptr<float>() + i * tj;
    std::fill(dr, dr + tj, 0.0f);
    for (int64_t h = 0; h < H; ++h) {
      // Softmax over k for all texts at once: rows are text-contiguous, so the j loops vectorise.
      std::fill(mx, mx + tj, -std::numeric_limits<float>::infinity());
      for (int64_t k = 0; k < K; ++k) {
        const float* s = Sp + ((h * ti + i) * K + k) * tj;
#pragma omp simd
        for (int64_t j = 0; j < tj; ++j) mx[j] = std::max(mx[j], s[j]);
      }
      std::fill(sm, sm + tj, 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const float* s = Sp + ((h * ti + i) * K + k) * tj;
        float* a = Ap + ((i * H + h) * K + k) * tj;
#pragma omp simd
        for (int64_t j = 0; j < tj; ++j) {
          const float e = llip_cpu::exp2_nonpos((s[j] - mx[j]) * scale);
          a[j] = e;
          sm[j] += e;
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < tj; ++j) sm[j] = 1.0f / sm[j];
      for (int64_t k = 0; k < K; ++k) {
        const float* cr = Cp + ((h * ti + i) * K + k) * tj;
        float* a = Ap + ((i * H + h) * K + k) * tj;
#pragma omp simd
        for (int64_t j = 0; j < tj; ++j) {
          a[j] *= sm[j];
          dr[j] += a[j] * cr[j];
        }
        // bf16 products: a's bf16 copy (an operand of G_i a and of dG), made while the row is in L1.
        if (in.lowp) llip_cpu::to_bf16_rows(a, tj, 1, tj, a16 + ((i * H + h) * K + k) * tjp, tjp);
      }
    }
  }
  if (in.lowp) {
    llip_cpu::tile_gram_a_bf16(in, sc, t);
  } else {
    at::Tensor A = image_view(sc.A, in, t), P = image_view(sc.P, in, t);
    at::bmm_out(P, sc.G.narrow(0, 0, ti), A);  // [ti, HK, tj]: G_i a for every text
  }
  const float* Pp = sc.P.data_ptr<float>();
  for (int64_t i = 0; i < ti; ++i) {
    float* nr = sc.n2.data_ptr<float>() + i * tj;
    std::fill(nr, nr + tj, 0.0f);
    for (int64_t r = 0; r < HK; ++r) {
      const float* a = Ap + (i * HK + r) * tj;
      const float* p = Pp + (i * HK + r) * tj;
#pragma omp simd
      for (int64_t j = 0; j < tj; ++j) nr[j] += a[j] * p[j];
    }
  }
}

uint16_t* bf16_bits_of(const at::Tensor& x) { return reinterpret_cast<uint16_t*>(x.data_ptr<llip_cpu::bf16>()); }

inline float norm_of(float n2) { return std::max(std::sqrt(std::max(n2, 0.0f)), kEps); }

inline double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::abs(x))); }

inline double sigmoid(double x) {
  if (x >= 0) return 1.0 / (1.0 + std::exp(-x));
  const double e = std::exp(x);
  return e / (1.0 + e);
}

// Image blocks of Ti images (the last one ragged): the unit of work handed to threads.
int64_t num_blocks(const Inputs& in) { return (in.Bi + in.Ti - 1) / in.Ti; }

// Runs fn(tile, scratch, thread) over every tile of the texts [j_begin, j_end): image blocks split across threads,
// texts in order. before_block / after_block run once per image block on the owning thread.
template <typename Before, typename Fn, typename After>
void for_each_tile(const Inputs& in, std::vector<Scratch>& scr, int64_t j_begin, int64_t j_end, Before&& before_block,
                   Fn&& fn, After&& after_block) {
  auto body = [&](int64_t b0, int64_t b1) {
    // OpenMP workers do not inherit the caller's dispatch state: without this, ATen calls on worker threads go
    // through autograd (and refuse out= arguments when an input requires grad).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const SerialBlasGuard serial_blas;
    const int tid = at::get_thread_num();
    // One scratch per thread that can get work; a second OpenMP runtime in the process would break this.
    TORCH_CHECK(tid >= 0 && tid < static_cast<int>(scr.size()), "llip cpu kernel: thread id ", tid,
                " outside the ", scr.size(), " scratch buffers (two OpenMP runtimes loaded?)");
    Scratch& sc = scr[tid];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * in.Ti, ti = std::min(in.Ti, in.Bi - i0);
      before_block(i0, ti, sc, tid);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += in.Tj) {
        const Tile t{i0, ti, j0, std::min(in.Tj, j_end - j0)};
        compute_tile(in, sc, t);
        fn(t, sc, tid);
      }
      after_block(i0, ti, sc, tid);
    }
    if (in.lowp) at::native::cpublas::brgemm_release(true);  // the micro-kernel's per-thread state (AMX tiles)
  };
  at::parallel_for(0, num_blocks(in), 1, body);
}

// Threads that can get work in for_each_tile: at::parallel_for with grain 1 hands out at most one range of
// image blocks per thread, and never more ranges than blocks. Per-thread buffers are sized by this, so a call
// with few images on a many-core machine does not allocate one set per idle core.
int working_threads(const Inputs& in) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_blocks(in))));
}

double ordered_sum(const std::vector<double>& x) {
  double s = 0.0;
  for (double v : x) s += v;
  return s;
}

}  // namespace

// The scalar of an optional 0-dim tensor (the logit scale t or bias b), or `absent` when the op takes none.
double scalar_or(const std::optional<at::Tensor>& x, double absent) { return x ? x->item<float>() : absent; }

// Forward. op kLogits: returns {cos [Bi, Bt]}. kSigmoidLoss: {loss []}, with image i's positive text
// i + pos_offset (none when pos_offset is None). kSoftmaxLoss (Bi == Bt): {loss [], lse_row [Bi], lse_col [Bt]}
// (the log-sum-exps are saved for the backward pass). t and b: the losses' logit scale and bias (b: sigmoid only).
std::vector<at::Tensor> pair_forward(int64_t op, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q,
                                     const at::Tensor& u, const at::Tensor& m, const std::optional<at::Tensor>& t,
                                     const std::optional<at::Tensor>& b, double tau,
                                     std::optional<int64_t> pos_offset, int64_t Ti, int64_t Tj, bool bf16_products) {
  Inputs in = make_inputs(k, v, q, u, m, tau, Ti, Tj, bf16_products);
  TORCH_CHECK(op == kLogits || op == kSigmoidLoss || op == kSoftmaxLoss, "llip cpu kernel: unknown op ", op);
  TORCH_CHECK(op != kSoftmaxLoss || in.Bi == in.Bt, "llip cpu kernel: the softmax loss needs Bi == Bt");
  const double tv = scalar_or(t, 1.0), bv = scalar_or(b, 0.0);
  const int64_t Bi = in.Bi, Bt = in.Bt;
  const int nth = working_threads(in);
  auto scr = make_scratch(in, nth, false);
  auto f32 = k.options().dtype(at::kFloat);
  at::Tensor cos_out = op == kLogits ? at::empty({Bi, Bt}, f32) : at::Tensor();
  float* outp = op == kLogits ? cos_out.data_ptr<float>() : nullptr;
  std::vector<double> row_loss(Bi, 0.0), diag(Bi, 0.0);
  // Online log-sum-exp of the logits per row (owned by one thread) and per column (partial per thread).
  std::vector<double> row_m(Bi, kNegInf), row_s(Bi, 0.0);
  std::vector<std::vector<double>> col_m(op == kSoftmaxLoss ? nth : 0, std::vector<double>(Bt, kNegInf));
  std::vector<std::vector<double>> col_s(op == kSoftmaxLoss ? nth : 0, std::vector<double>(Bt, 0.0));
  auto nothing = [](int64_t, int64_t, Scratch&, int) {};
  auto gram = [&](int64_t i0, int64_t ti, Scratch& sc, int) { gram_block(in, i0, ti, sc); };
  for_each_tile(in, scr, 0, Bt, gram, [&](const Tile& t, Scratch& sc, int tid) {
    const float* dotp = sc.dot.data_ptr<float>();
    const float* n2p = sc.n2.data_ptr<float>();
    for (int64_t i = 0; i < t.ti; ++i) {
      const int64_t gi = t.i0 + i;
      if (op == kLogits) {
        for (int64_t j = 0; j < t.tj; ++j) outp[gi * Bt + t.j0 + j] = dotp[i * t.tj + j] / norm_of(n2p[i * t.tj + j]);
      } else if (op == kSigmoidLoss) {
        const int64_t pos = pos_offset ? gi + *pos_offset : -1;
        double s = 0.0;
        for (int64_t j = 0; j < t.tj; ++j) {
          const double logit = tv * (dotp[i * t.tj + j] / norm_of(n2p[i * t.tj + j])) + bv;
          s += softplus(t.j0 + j == pos ? -logit : logit);
        }
        row_loss[gi] += s;
      } else {
        double mt = row_m[gi];
        for (int64_t j = 0; j < t.tj; ++j) mt = std::max(mt, tv * (dotp[i * t.tj + j] / norm_of(n2p[i * t.tj + j])));
        double s = row_s[gi] * std::exp(row_m[gi] - mt);
        for (int64_t j = 0; j < t.tj; ++j) {
          const double logit = tv * (dotp[i * t.tj + j] / norm_of(n2p[i * t.tj + j]));
          s += std::exp(logit - mt);
          if (t.j0 + j == gi) diag[gi] = logit;
          double& cm = col_m[tid][t.j0 + j];
          double& cs = col_s[tid][t.j0 + j];
          if (logit > cm) {
            cs = cs * std::exp(cm - logit) + 1.0;
            cm = logit;
          } else {
            cs += std::exp(logit - cm);
          }
        }
        row_m[gi] = mt, row_s[gi] = s;
      }
    }
  }, nothing);
  if (op == kLogits) return {cos_out};
  if (op == kSigmoidLoss) return {at::scalar_tensor(ordered_sum(row_loss) / double(Bi), f32)};
  at::Tensor lse_row = at::empty({Bi}, f32), lse_col = at::empty({Bt}, f32);
  double sum_row = 0.0, sum_col = 0.0;
  for (int64_t i = 0; i < Bi; ++i) {
    const double lse = row_m[i] + std::log(row_s[i]);
    lse_row.data_ptr<float>()[i] = static_cast<float>(lse);
    sum_row += lse;
  }
  for (int64_t j = 0; j < Bt; ++j) {
    double mj = kNegInf, sj = 0.0;
    for (int th = 0; th < nth; ++th) mj = std::max(mj, col_m[th][j]);
    for (int th = 0; th < nth; ++th)
      if (col_m[th][j] != kNegInf) sj += col_s[th][j] * std::exp(col_m[th][j] - mj);
    const double lse = mj + std::log(sj);
    lse_col.data_ptr<float>()[j] = static_cast<float>(lse);
    sum_col += lse;
  }
  const double sum_diag = ordered_sum(diag);
  const double total = 0.5 * ((sum_row - sum_diag) / double(Bi) + (sum_col - sum_diag) / double(Bt));
  return {at::scalar_tensor(total, f32), lse_row, lse_col};
}

// Backward (docs/design.md section 7). `grad` is dcos [Bi, Bt] for kLogits and the loss's 0-dim cotangent
// otherwise; lse_row / lse_col are the softmax loss's saved log-sum-exps (None for the other ops).
// Returns {dk, dv, dq, du, dm, dt, db, loss}; dt and db are zero for kLogits (the caller applies t and b itself).
//
// with_loss (sigmoid loss only): also sum the loss in the same sweep and return it as `loss` (else 0). Each
// pair's dLoss/dlogit depends on that pair's logit alone, so forward and backward can share one pass over the
// tiles instead of recomputing them: the fused training path (cpu_sigmoid_loss_fused in llip_kernels/backends/cpu.py) calls this with
// grad = 1 and scales the gradients by the real cotangent later.
//
// Texts are taken in passes of Tp (a multiple of Tj): the per-thread partial sums of dQ and dU cover one pass,
// so their memory is nth * 2 * Tp * D floats however large Bt is. Each pass recomputes the blocks' Gram matrices
// (O(Bi) work per pass against O(Bi * Tp) pair work).
std::vector<at::Tensor> pair_backward(int64_t op, const at::Tensor& grad, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& q, const at::Tensor& u, const at::Tensor& m,
                                      const std::optional<at::Tensor>& t, const std::optional<at::Tensor>& b,
                                      const std::optional<at::Tensor>& lse_row,
                                      const std::optional<at::Tensor>& lse_col, double tau,
                                      std::optional<int64_t> pos_offset, int64_t Ti, int64_t Tj, bool with_loss,
                                      int64_t Tp, bool bf16_products) {
  TORCH_CHECK(!with_loss || op == kSigmoidLoss, "llip cpu kernel: with_loss needs the sigmoid loss");
  TORCH_CHECK(op != kSoftmaxLoss || (lse_row && lse_col), "llip cpu kernel: the softmax loss needs lse_row, lse_col");
  Inputs in = make_inputs(k, v, q, u, m, tau, Ti, Tj, bf16_products);
  // Whole tiles per pass, so that the tiling of the texts does not depend on the pass length.
  Tp = std::max<int64_t>(1, (std::max(Tp, in.Tj) / in.Tj)) * in.Tj;
  const int64_t Bi = in.Bi, Bt = in.Bt, H = in.H, K = in.K, d = in.d;
  const double tv = scalar_or(t, 1.0), bv = scalar_or(b, 0.0);
  at::Tensor dcos_in;
  const float* dcp = nullptr;
  double go = 0.0;
  if (op == kLogits) {
    dcos_in = grad.to(at::kFloat).contiguous();
    TORCH_CHECK(dcos_in.dim() == 2 && dcos_in.size(0) == Bi && dcos_in.size(1) == Bt, "llip cpu kernel: bad dcos");
    dcp = dcos_in.data_ptr<float>();
  } else {
    go = grad.item<float>();
  }
  const float* lrow = op == kSoftmaxLoss ? lse_row->data_ptr<float>() : nullptr;
  const float* lcol = op == kSoftmaxLoss ? lse_col->data_ptr<float>() : nullptr;
  const int nth = working_threads(in);
  auto scr = make_scratch(in, nth, true);
  auto f32 = k.options().dtype(at::kFloat);
  // Every gradient is a long sum (over texts for the image side, over images for the text side and dM): each
  // tile's GEMM gives a float32 partial over its own block, and the partials are summed in float64, so the error
  // stays that of one tile's sum however many tiles there are (docs/design.md section 6).
  auto f64 = k.options().dtype(at::kDouble);
  // One pass over the texts (Bt <= Tp, the usual case): a block's dK, dV are final when the block ends, and go
  // from its float64 sums straight into the outputs, in the inputs' dtype. Several passes: float64 sums for the
  // whole batch, converted at the end.
  const bool one_pass = Bt > 0 && Bt <= Tp;  // (no texts: no block runs, and the zeroed float64 sums are the answer)
  at::Tensor dk_out = at::empty({Bi, H, K, d}, k.options()), dv_out = at::empty({Bi, H, K, d}, k.options());
  at::Tensor dk64 = one_pass ? at::Tensor() : at::zeros({Bi, H, K, d}, f64);
  at::Tensor dv64 = one_pass ? at::Tensor() : at::zeros({Bi, H, K, d}, f64);
  at::Tensor dq_all = at::zeros({H, Bt, d}, f64), du_all = at::zeros({H, Bt, d}, f64);
  // Text-side and M gradients sum over images, so over threads: one partial each (dQ, dU: for the texts of the
  // current pass), added in thread order.
  const int64_t pass_len = std::min(Tp, std::max<int64_t>(Bt, 1));
  // (bf16 products: dQ^T and dU^T, [H, d, pass_len], the layout their products leave.)
  std::vector<at::Tensor> dqh(nth), duh(nth), dm(nth);
  for (int th = 0; th < nth; ++th) {
    const auto shape = in.lowp ? std::vector<int64_t>{H, d, pass_len} : std::vector<int64_t>{H, pass_len, d};
    dqh[th] = at::empty(shape, f64), duh[th] = at::empty(shape, f64);
    dm[th] = at::zeros({H, d, H, d}, f64);
  }
  // bf16 products: their products accumulate dQ^T, dU^T and dM^T in float32 (dq32, du32, dm32), added into the
  // float64 sums every kFlushBlocks image blocks and at the end of a pass, so each float32 sum has at most
  // kFlushBlocks terms.
  constexpr int kFlushBlocks = 16;
  std::vector<at::Tensor> dq32(in.lowp ? nth : 0), du32(in.lowp ? nth : 0), dm32(in.lowp ? nth : 0);
  std::vector<int> blocks_since_flush(nth, 0);
  for (int th = 0; th < static_cast<int>(dq32.size()); ++th) {
    dq32[th] = at::zeros({H, d, pass_len}, f32), du32[th] = at::zeros({H, d, pass_len}, f32);
    dm32[th] = at::zeros({H, d, H, d}, f32);
  }
  auto flush = [&](int tid) {
    add_partial(dqh[tid], dq32[tid]), add_partial(duh[tid], du32[tid]), add_partial(dm[tid], dm32[tid]);
    dq32[tid].zero_(), du32[tid].zero_(), dm32[tid].zero_();
    blocks_since_flush[tid] = 0;
  };
  int64_t p0 = 0;  // first text of the current pass
  std::vector<double> row_dt(Bi, 0.0), row_db(Bi, 0.0), row_loss(with_loss ? Bi : 0, 0.0);
  const float inv_tau = 1.0f / in.tau;
  auto before = [&](int64_t i0, int64_t ti, Scratch& sc, int) {
    gram_block(in, i0, ti, sc);
    // The tiles write dG's lower block triangle only (tiles.h): the float32 products overwrite it in dGtile per tile
    // and sum it in dG; the bf16 products sum dG^T in dGtile itself (bf16_products.cpp).
    (in.lowp ? sc.dGtile : sc.dG).zero_();
    if (in.lowp) sc.b16.dk32.zero_(), sc.b16.dv32.zero_();
    sc.dkb = sc.dkbuf.narrow(0, 0, ti * in.HK * d).view({H, ti * K, d}).zero_();
    sc.dvb = sc.dvbuf.narrow(0, 0, ti * in.HK * d).view({H, ti * K, d}).zero_();
  };
  auto after = [&](int64_t i0, int64_t ti, Scratch& sc, int tid) {
    if (in.lowp) {  // the block's float32 dK, dV sums over its text tiles (at most a pass's worth)
      add_partial(sc.dkb, sc.b16.dk32.narrow(0, 0, sc.dkb.numel()));
      add_partial(sc.dvb, sc.b16.dv32.narrow(0, 0, sc.dvb.numel()));
      llip_cpu::gram_block_backward_bf16(in, ti, sc, dm32[tid].data_ptr<float>());
      if (++blocks_since_flush[tid] == kFlushBlocks) flush(tid);
    } else {
      gram_block_backward(in, i0, ti, sc, dm[tid]);
    }
    auto store = [&](const at::Tensor& block, at::Tensor& out, at::Tensor& sum) {
      const at::Tensor per_image = block.view({H, ti, K, d}).permute({1, 0, 2, 3});
      one_pass ? out.narrow(0, i0, ti).copy_(per_image) : sum.narrow(0, i0, ti).add_(per_image);
    };
    store(sc.dkb, dk_out, dk64);
    store(sc.dvb, dv_out, dv64);
  };
  auto tile_backward = [&](const Tile& t, Scratch& sc, int tid) {
    const int64_t ti = t.ti, tj = t.tj;
    const float* dotp = sc.dot.data_ptr<float>();
    const float* n2p = sc.n2.data_ptr<float>();
    float* ddp = sc.ddot.data_ptr<float>();
    float* dnp = sc.dn2.data_ptr<float>();
    // Per pair: dLoss/dlogit (recomputed from the saved statistics), then the cotangents of dot and n2.
    for (int64_t i = 0; i < ti; ++i) {
      const int64_t gi = t.i0 + i;
      double st = 0.0, sb = 0.0, sl = 0.0;
      for (int64_t j = 0; j < tj; ++j) {
        const int64_t gj = t.j0 + j, p = i * tj + j;
        const float raw = std::sqrt(std::max(n2p[p], 0.0f)), nrm = std::max(raw, kEps);
        const float cosv = dotp[p] / nrm;
        float dc;
        if (op == kLogits) {
          dc = dcp[gi * Bt + gj];
        } else if (op == kSigmoidLoss) {
          const double l = (pos_offset && gj == gi + *pos_offset) ? 1.0 : -1.0;
          const double logit = tv * cosv + bv;
          if (with_loss) sl += softplus(-l * logit);
          const double gl = -l * sigmoid(-l * logit) * go / double(Bi);
          st += gl * cosv, sb += gl;
          dc = static_cast<float>(gl * tv);
        } else {
          const double logit = tv * cosv, delta = gi == gj ? 1.0 : 0.0;
          const double gl = go * ((std::exp(logit - lrow[gi]) - delta) / (2.0 * Bi) +
                                  (std::exp(logit - lcol[gj]) - delta) / (2.0 * Bt));
          st += gl * cosv;
          dc = static_cast<float>(gl * tv);
        }
        ddp[p] = dc / nrm;
        // n = max(sqrt(n2), eps) has zero gradient where the clamp is active.
        dnp[p] = raw > kEps ? -dc * dotp[p] / (2.0f * nrm * nrm * nrm) : 0.0f;
      }
      row_dt[gi] += st, row_db[gi] += sb;
      if (with_loss) row_loss[gi] += sl;
    }
    // Per (image, head, text): da = ddot c + 2 dn2 (G a); ds = a (da - sum_k a da) / tau. In place:
    // S <- ds, C <- ddot * a (the cotangent of c), P <- dn2 * a (so that dG_i += P_i A_i^T); with bf16 products
    // into their bf16 copies S16, C16, P16 instead.
    const int64_t tjp = llip_cpu::round_up2(tj);
    uint16_t* S16 = in.lowp ? bf16_bits_of(sc.b16.S16) : nullptr;
    uint16_t* C16 = in.lowp ? bf16_bits_of(sc.b16.C16) : nullptr;
    uint16_t* P16 = in.lowp ? bf16_bits_of(sc.b16.P16) : nullptr;
    float* Sp = sc.S.data_ptr<float>();
    float* Cp = sc.C.data_ptr<float>();
    float* Pp = sc.P.data_ptr<float>();
    const float* Ap = sc.A.data_ptr<float>();
    float* sm = sc.sm.data();
    for (int64_t i = 0; i < ti; ++i) {
      const float* dd = ddp + i * tj;
      const float* dn = dnp + i * tj;
      for (int64_t h = 0; h < H; ++h) {
        std::fill(sm, sm + tj, 0.0f);
        for (int64_t kk = 0; kk < K; ++kk) {
          const float* a = Ap + ((i * H + h) * K + kk) * tj;
          const float* cr = Cp + ((h * ti + i) * K + kk) * tj;
          const float* p = Pp + ((i * H + h) * K + kk) * tj;
#pragma omp simd
          for (int64_t j = 0; j < tj; ++j) sm[j] += a[j] * (dd[j] * cr[j] + 2.0f * dn[j] * p[j]);
        }
        for (int64_t kk = 0; kk < K; ++kk) {
          const int64_t head_row = (h * ti + i) * K + kk, image_row = (i * H + h) * K + kk;
          const float* a = Ap + image_row * tj;
          float* s = Sp + head_row * tj;
          float* cr = Cp + head_row * tj;
          float* p = Pp + image_row * tj;
          if (in.lowp) {  // straight into the products' bf16 operands (the float32 rows are not read again)
            uint16_t* s16 = S16 + head_row * tjp;
            uint16_t* c16 = C16 + head_row * tjp;
            uint16_t* p16 = P16 + image_row * tjp;
#pragma omp simd
            for (int64_t j = 0; j < tj; ++j) {
              const float da = dd[j] * cr[j] + 2.0f * dn[j] * p[j];
              s16[j] = llip_cpu::bf16_bits(a[j] * (da - sm[j]) * inv_tau);
              c16[j] = llip_cpu::bf16_bits(dd[j] * a[j]);
              p16[j] = llip_cpu::bf16_bits(dn[j] * a[j]);
            }
            if (tj & 1) s16[tj] = c16[tj] = p16[tj] = 0;  // the products' even reduction
            continue;
          }
#pragma omp simd
          for (int64_t j = 0; j < tj; ++j) {
            const float da = dd[j] * cr[j] + 2.0f * dn[j] * p[j];
            s[j] = a[j] * (da - sm[j]) * inv_tau;
            cr[j] = dd[j] * a[j];
            p[j] = dn[j] * a[j];
          }
        }
      }
    }
    // Gradient GEMMs: image side (dK, dV and dG of the block, per thread) and text side (dQ, dU). With float32
    // products each GEMM writes the tile's float32 partial into tile_out, which joins its float64 sum.
    if (in.lowp) {
      llip_cpu::tile_gradients_bf16(in, sc, t, dq32[tid].data_ptr<float>(), du32[tid].data_ptr<float>(), pass_len,
                                    t.j0 - p0);
      return;
    }
    at::Tensor S = head_view(sc.S, in, t), C = head_view(sc.C, in, t);
    at::Tensor img_part = sc.tile_out.narrow(0, 0, ti * K * d).view({ti * K, d});
    at::Tensor txt_part = sc.tile_out.narrow(0, 0, tj * d).view({tj, d});
    for (int64_t h = 0; h < H; ++h) {
      at::Tensor qb = in.qh[h].narrow(0, t.j0, tj), ub = in.uh[h].narrow(0, t.j0, tj);
      at::Tensor dk_h = sc.dkb[h], dv_h = sc.dvb[h];
      at::Tensor dq_h = dqh[tid][h].narrow(0, t.j0 - p0, tj), du_h = duh[tid][h].narrow(0, t.j0 - p0, tj);
      add_partial(dk_h, at::mm_out(img_part, S[h], qb));
      add_partial(dv_h, at::mm_out(img_part, C[h], ub));
      add_partial(dq_h, at::mm_out(txt_part, S[h].t(), sc.kb[h]));
      add_partial(du_h, at::mm_out(txt_part, C[h].t(), sc.vb[h]));
    }
    at::Tensor A = image_view(sc.A, in, t), P = image_view(sc.P, in, t);
    for (int64_t i = 0; i < ti; ++i)  // dG_i = P_i A_i^T on and below its diagonal blocks (tiles.h)
      for (int64_t r0 = 0; r0 < in.HK; r0 += llip_cpu::kGramRows) {
        const int64_t rows = std::min(llip_cpu::kGramRows, in.HK - r0);
        at::Tensor out = sc.dGtile[i].narrow(0, r0, rows).narrow(1, 0, r0 + rows);
        at::mm_out(out, P[i].narrow(0, r0, rows), A[i].narrow(0, 0, r0 + rows).t());
      }
    add_partial(sc.dG.narrow(0, 0, ti), sc.dGtile.narrow(0, 0, ti));
  };
  for (p0 = 0; p0 < Bt; p0 += Tp) {
    const int64_t p1 = std::min(Bt, p0 + Tp);
    for (int th = 0; th < nth; ++th) dqh[th].zero_(), duh[th].zero_();
    for_each_tile(in, scr, p0, p1, before, tile_backward, after);
    for (int th = 0; th < static_cast<int>(dq32.size()); ++th) flush(th);
    for (int th = 0; th < nth; ++th) {
      auto pass = [&](const at::Tensor& x) {  // [H, n, d] of this pass (bf16 products: stored transposed)
        return in.lowp ? x.narrow(2, 0, p1 - p0).transpose(1, 2) : x.narrow(1, 0, p1 - p0);
      };
      dq_all.narrow(1, p0, p1 - p0).add_(pass(dqh[th]));
      du_all.narrow(1, p0, p1 - p0).add_(pass(duh[th]));
    }
  }
  for (int th = 1; th < nth; ++th) dm[0].add_(dm[th]);
  at::Tensor dm_out = dm[0].view({in.D, in.D});
  if (in.lowp) dm_out = dm_out.t();  // gram_block_backward_bf16 sums dM^T
  auto unhead3 = [&](const at::Tensor& x) { return x.permute({1, 0, 2}).to(at::kFloat).contiguous(); };
  if (!one_pass) dk_out.copy_(dk64), dv_out.copy_(dv64);
  return {dk_out, dv_out, unhead3(dq_all).to(q.scalar_type()), unhead3(du_all), dm_out.to(at::kFloat).contiguous(),
          at::scalar_tensor(ordered_sum(row_dt), f32), at::scalar_tensor(ordered_sum(row_db), f32),
          at::scalar_tensor(with_loss ? ordered_sum(row_loss) / double(Bi) : 0.0, f32)};
}

// How many threads one of our parallel regions really runs on, for n work items. A regression check: built
// without -fopenmp, at::parallel_for (a header template) compiles to a serial loop and this returns 1.
int64_t parallel_width(int64_t n) {
  std::vector<int64_t> seen(std::max<int64_t>(n, 1), 0);
  at::parallel_for(0, n, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) seen[b] = at::get_thread_num();
  });
  return *std::max_element(seen.begin(), seen.end()) + 1;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  namespace py = pybind11;
  mod.doc() = "Fused Llip (form 3) scores and losses on the CPU; see llip_kernels/backends/cpu.py";
  mod.attr("OP_LOGITS") = static_cast<int64_t>(kLogits);
  mod.attr("OP_SIGMOID_LOSS") = static_cast<int64_t>(kSigmoidLoss);
  mod.attr("OP_SOFTMAX_LOSS") = static_cast<int64_t>(kSoftmaxLoss);
  mod.def("pair_forward", &pair_forward, "tiled forward: cos, sigmoid loss or softmax loss (+ log-sum-exps)",
          py::arg("op"), py::arg("k"), py::arg("v"), py::arg("q"), py::arg("u"), py::arg("m"), py::arg("t"),
          py::arg("b"), py::arg("tau"), py::arg("pos_offset"), py::arg("images_per_tile"),
          py::arg("texts_per_tile"), py::arg("bf16_products"));
  mod.def("pair_backward", &pair_backward, "tiled backward: dk, dv, dq, du, dm, dt, db (+ the sigmoid loss)",
          py::arg("op"), py::arg("grad"), py::arg("k"), py::arg("v"), py::arg("q"), py::arg("u"), py::arg("m"),
          py::arg("t"), py::arg("b"), py::arg("lse_row"), py::arg("lse_col"), py::arg("tau"), py::arg("pos_offset"),
          py::arg("images_per_tile"), py::arg("texts_per_tile"), py::arg("with_loss"), py::arg("texts_per_pass"),
          py::arg("bf16_products"));
  mod.def("bf16_products_available", &llip_cpu::bf16_gemm_available,
          "whether this CPU and torch build run the bf16 products (oneDNN's bf16 GEMM micro-kernel)");
  mod.def("parallel_width", &parallel_width, "threads a parallel region of n items runs on (a build check)");
}

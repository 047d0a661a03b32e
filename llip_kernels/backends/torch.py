"""Backend ``"torch"``: a portable, memory-bounded Llip path in plain PyTorch.

The (image, text) pairs are processed in chunks of ``bi`` images x ``bt`` texts, so no tensor of Bi*Bt*K or
Bi*Bt*D elements ever exists (the losses do not build Bi*Bt either; the logits op returns it, as its output).
The backward pass saves nothing but the inputs (and the softmax loss's row / column log-sum-exps): it
recomputes each chunk, pulls the chunk's gradient through it, and accumulates per-image / per-text gradients
(the FlashAttention recipe, with torch ops as the tile). Forms 2 and 3 have hand-written chunk gradients
(form 3's are those of docs/design.md section 7); form 1 and ``llip_mix`` differentiate the recomputed chunk
with autograd. The per-image (V', G) and per-text (U, y_hat) tensors are rebuilt under autograd once per image
chunk / once per call, and their accumulated gradients are pulled back to v, w_out and y in one call each.
Plain torch ops, fixed loop order, no atomics: results are bitwise repeatable on one machine.

Each call takes the algebraic form with the fewest forward FLOPs (:func:`llip_kernels.algebra.cheapest_form`:
pairs plus per-image and per-text precomputation; docs/design.md section 4). Per pair, form 3 wins for the
paper's wide configs (B/16, L/14, H/14, G/14), form 2 for B/32, form 1 for large K (the ablations' K = 512); but
G only pays off against hundreds of texts, so small batches (128 x 128 at B/16) take form 2. ``llip_mix`` needs
``z``: forms 1 and 2 only. Backward FLOPs: see :func:`flops`.

Arithmetic is float32 whatever the input dtype (float64 inputs stay float64), except that bfloat16 inputs keep
bfloat16 operands in the mixing matmuls of forms 1 and 2 (see ``_matmul_dtype``).

Tuning (read at each call, see :mod:`llip_kernels.settings`): ``$LLIP_TORCH_FORM`` forces a form,
``$LLIP_TORCH_CHUNK`` the chunk sizes, ``$LLIP_TORCH_BUDGET_MB`` the memory budget they are derived from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import settings
from .._custom_ops import autograd_inside, define
from .._validate import LlipProblem
from ..algebra import (
    EPS,
    Op,
    call_flops,
    cheapest_form,
    gram_matrices,
    mix_aligned,
    pair_flops,
    pair_grad_flops,
    projected_values,
    text_projection,
)

FLOP_FORM = "torch: form 1, 2 or 3 chosen per shape (least forward FLOPs); backward = recompute + 2 x fwd"


# ---- backend interface (llip_kernels.backends.Backend) ----------------------------------------------------


def environment_reasons() -> list[str]:
    return []  # plain torch: nothing to build or import


def not_supported_reasons(problem: LlipProblem) -> list[str]:
    return []  # any op, dtype, device and shape (the chunking bounds the memory)


def algebraic_form(problem: LlipProblem) -> int:
    return choose_form(problem.op, problem.H, problem.K, problem.d, problem.Bi, problem.Bt)


def logits(k, v, q, y, w_out, t, b, *, tau: float) -> torch.Tensor:
    return torch_pairs(k, v, q, y, w_out, t, b, Op.LOGITS.value, tau, None)[0]


def sigmoid_loss(k, v, q, y, w_out, t, b, *, tau: float, pos_offset: int | None) -> torch.Tensor:
    return torch_pairs(k, v, q, y, w_out, t, b, Op.SIGMOID_LOSS.value, tau, pos_offset)[0]


def softmax_loss(k, v, q, y, w_out, t, *, tau: float) -> torch.Tensor:
    b = torch.zeros((), dtype=t.dtype, device=t.device)  # no bias in InfoNCE; its gradient is dropped
    return torch_pairs(k, v, q, y, w_out, t, b, Op.SOFTMAX_LOSS.value, tau, None)[0]


def mix(k, v, q, w_out, *, tau: float, all_pairs: bool) -> torch.Tensor:
    if all_pairs:
        return torch_pairs(k, v, q, None, w_out, None, None, Op.MIX.value, tau, None)[0]
    # Aligned pairs: O(B * H * K) work and memory, nothing to chunk; plain autograd in float32.
    cdt = _compute_dtype(k.dtype)
    return mix_aligned(*(x.to(cdt) for x in (k, v, q, w_out)), tau).to(k.dtype)


def flops(op: str, Bi: int, Bt: int, H: int, K: int, d: int, backward: bool = False) -> float:
    """FLOPs this backend spends on ``op`` (forward, or the backward pass alone when ``backward``), counting
    matmuls in the form it picks for the shape: pair work plus per-image and per-text precomputation.

    Backward: each chunk is recomputed, then differentiated. Forms 1 and 2 cost two matmuls per forward matmul
    (3x the forward in all); form 3's hand-written chunk gradients add ``8KD + 2(HK)^2`` per pair to the
    recomputed forward; the precomputations are recomputed under autograd and differentiated (3x theirs)."""
    form = choose_form(op, H, K, d, Bi, Bt)
    fwd = float(call_flops(form, Bi, Bt, H, K, d))
    if not backward:
        return fwd
    if form != 3:
        return 3.0 * fwd
    pairs = float(Bi) * Bt
    side = fwd - pairs * pair_flops(3, H, K, d)
    return pairs * (pair_flops(3, H, K, d) + pair_grad_flops(H, K, d)) + 3.0 * side


# ---- choosing the form and the chunk sizes ----------------------------------------------------------------


def choose_form(op: str, H: int, K: int, d: int, Bi: int | None = None, Bt: int | None = None) -> int:
    """The cheapest form for the call (:func:`llip_kernels.algebra.cheapest_form`), unless ``$LLIP_TORCH_FORM``
    forces one (form 3 forced on ``mix``, which needs ``z``, gives form 2)."""
    forced = settings.torch_form()
    if forced is not None:
        return 2 if (op == Op.MIX and forced == 3) else forced
    return cheapest_form(op, H, K, d, Bi, Bt)


def _pair_floats(form: int, op: str, H: int, K: int, d: int) -> int:
    """Live floats per pair in one chunk, forward plus the recomputed backward (a generous count of the
    scores, weights, their permuted copies and gradients; z and its gradient for forms 1 and 2)."""
    HK, D = H * K, H * d
    return {1: 8 * HK + 6 * D, 2: 8 * HK + 4 * D, 3: 12 * HK}[form] + 8


def _image_floats(form: int, H: int, K: int, d: int) -> int:
    """Live floats per image of a chunk: k and v in two layouts, V' (form 2) or G and its gradient (form 3)."""
    HK, D = H * K, H * d
    return {1: 6 * HK * d, 2: 4 * HK * d + 3 * HK * D, 3: 6 * HK * d + 2 * HK * D + 3 * HK * HK}[form]


def plan_chunks(op: str, form: int, Bi: int, Bt: int, H: int, K: int, d: int, itemsize: int = 4) -> tuple[int, int]:
    """Chunk sizes ``(bi, bt)``: the per-image tensors of ``bi`` images take at most half the budget and the
    ``bi x bt`` pair tensors fit the rest, so memory does not grow with Bi * Bt. Texts are the inner loop and
    the chunk grows along them first (the per-image work of a chunk is then reused over more texts). Chunks
    are balanced (100 images in chunks of at most 64 become 50 + 50). ``$LLIP_TORCH_CHUNK`` overrides."""
    forced = settings.torch_chunk()
    if forced is not None:
        bi, bt = forced
        return min(bi, max(Bi, 1)), min(bt, max(Bt, 1))
    elements = settings.torch_budget_mb() * 2**20 / itemsize
    per_pair, per_image = _pair_floats(form, op, H, K, d), _image_floats(form, H, K, d)
    bi_cap = max(1, int(elements / 2 / per_image))
    pairs = max(1, int(elements / 2 / per_pair))
    # Texts get the larger share (about 8 images per chunk when texts abound): the text count is the contraction
    # length of the gradient matmuls dV' = a^T dz and dG = a^T diag a, which run at a third of the CPU's matmul
    # rate with 64 texts and near its peak with 256+ (measured); the image count is only a batch dimension.
    bt = max(1, min(Bt, pairs // min(8, Bi, bi_cap)))
    bi = max(1, min(Bi, bi_cap, pairs // bt))
    return _balance(Bi, bi), _balance(Bt, bt)


def _balance(n: int, c: int) -> int:
    chunks = -(-n // c) if n else 1
    return max(1, -(-n // chunks))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _matmul_dtype(dtype: torch.dtype, cdt: torch.dtype) -> torch.dtype:
    """Operand dtype of the mixing matmuls (``a V'`` in form 2, ``m W_out`` in form 1, and their gradients).
    bfloat16 inputs keep them in bfloat16 (float32 accumulation inside the matmul; 3-5x the float32 matmul rate
    on AVX-512-bf16 CPUs and tensor-core GPUs); scores, softmax, norms and every reduction stay in float32.
    Form 3 keeps float32 throughout: ``a G a^T`` can cancel and would amplify bf16 rounding of ``G``."""
    return torch.bfloat16 if dtype == torch.bfloat16 else cdt


# ---- the three forms: per-image side, per-text side, and the pair function --------------------------------
#
# Layout: scores live as [H, bt, bi, K] (one gemm per head, [bt, d] x [d, bi*K]) so the softmax over K runs
# along the contiguous last axis. Text-side tensors are [Bt, ...] and are sliced per text chunk.


def _attention(kH: torch.Tensor, q: torch.Tensor, K: int, tau: float) -> torch.Tensor:
    """``softmax_k(<k, q> / tau)`` for a chunk: ``kH [H, bi*K, d]``, ``q [bt, H, d]`` -> ``[H, bt, bi, K]``."""
    H, biK, _ = kH.shape
    # Scale the scores, not q: 1/tau is rarely a power of two, so pre-scaling rounds every element of q, and at a
    # small tau (a peaked softmax) those roundings add up to several times the error of one rounding of each score
    # (dk and dq at tau = 0.05 were up to 4x the same-dtype reference's error).
    s = torch.matmul(q.transpose(0, 1), kH.transpose(1, 2)).mul_(1.0 / tau)  # [H, bt, bi*K]
    return torch.softmax(s.view(H, q.shape[0], biK // K, K), dim=-1)


def _by_image(a: torch.Tensor, dtype: torch.dtype | None = None, transposed: bool = False) -> torch.Tensor:
    """``[H, bt, bi, K]`` -> ``[bi, bt, H*K]`` (each image's weights as a matrix over its texts), or
    ``[bi, H*K, bt]`` if ``transposed``; one copy, converting to ``dtype`` on the way."""
    H, bt, bi, K = a.shape
    if transposed:
        out = torch.empty(bi, H, K, bt, dtype=dtype or a.dtype, device=a.device)
        return out.copy_(a.permute(2, 0, 3, 1)).view(bi, H * K, bt)
    out = torch.empty(bi, bt, H, K, dtype=dtype or a.dtype, device=a.device)
    return out.copy_(a.permute(2, 1, 0, 3)).view(bi, bt, H * K)


def _cos_from_z(z: torch.Tensor, yhat: torch.Tensor) -> torch.Tensor:
    """``cos(z[i, j], y_j)`` from ``z [bi, bt, D]`` and unit ``yhat [bt, D]`` -> ``[bi, bt]``."""
    dot = (z * yhat.unsqueeze(0)).sum(-1)
    return dot / torch.linalg.vector_norm(z, dim=-1).clamp_min(EPS)


def _softmax_grad(a: torch.Tensor, da: torch.Tensor, tau: float) -> torch.Tensor:
    """Gradient w.r.t. the unscaled scores ``<k, q>`` of ``a = softmax_k(<k, q> / tau)``, ``[H, bt, bi, K]``."""
    return a * (da - (a * da).sum(-1, keepdim=True)) * (1.0 / tau)


def _qk_grads(ds: torch.Tensor, kH: torch.Tensor, q: torch.Tensor):
    """``ds [H, bt, bi, K]`` (gradient of ``<k, q>``) -> ``dkH [H, bi*K, d]``, ``dq [bt, H, d]``."""
    H, bt, bi, K = ds.shape
    dsf = ds.reshape(H, bt, bi * K)
    # dk^T = q^T ds as an NN gemm, returned as a transposed view: a TN gemm (ds^T q) runs at half speed on CPU.
    dkT = torch.matmul(q.permute(1, 2, 0), dsf)  # [H, d, bi*K]
    return dkT.transpose(1, 2), torch.matmul(dsf, kH).transpose(0, 1)


def _autograd_vjp(fn, img, txt, w, tau):
    """Run a pair function under autograd on detached leaves; return its value and a function mapping the
    value's cotangent to ``(image-side grads, text-side grads, w grad or None)``. Used where no hand-written
    gradient exists (form 1, and ``z`` for mix)."""
    with torch.enable_grad():
        img_l = [x.detach().requires_grad_() for x in img]
        txt_l = [x.detach().requires_grad_() for x in txt]
        w_l = None if w is None else w.detach().requires_grad_()
        val = fn(img_l, txt_l, w_l, tau)

    def vjp(dval):
        ins = img_l + txt_l + ([] if w_l is None else [w_l])
        grads = torch.autograd.grad(val, ins, dval, allow_unused=True)
        ni, nt = len(img_l), len(txt_l)
        return list(grads[:ni]), list(grads[ni : ni + nt]), (None if w_l is None else grads[-1])

    return val.detach(), vjp


def _text_yhat(q, y, w):
    return (q,) if y is None else (q, F.normalize(y, dim=-1, eps=EPS))


class _Form1:
    """As written: ``m = a V`` per head, then ``z = m W_out`` as one [bi*bt, D] x [D, D] matmul."""

    uses_w = True
    text_side = staticmethod(_text_yhat)

    @staticmethod
    def image_side(k, v, w, mm):
        bi, H, K, d = k.shape
        return (k.transpose(0, 1).reshape(H, bi * K, d), v.transpose(0, 1).contiguous())  # [H,bi*K,d], [H,bi,K,d]

    @staticmethod
    def z(img, txt, w, tau):
        kH, vH = img
        H, bi, K, d = vH.shape
        bt = txt[0].shape[0]
        a = _attention(kH, txt[0], K, tau)  # [H, bt, bi, K]
        m = torch.matmul(a.transpose(1, 2), vH)  # [H, bi, bt, d]
        z = m.permute(1, 2, 0, 3).reshape(bi * bt, H * d).to(w.dtype) @ w  # w arrives in the matmul dtype
        return z.to(m.dtype).view(bi, bt, H * d)

    @classmethod
    def cos(cls, img, txt, w, tau):
        return _cos_from_z(cls.z(img, txt, w, tau), txt[1])

    @classmethod
    def cos_vjp(cls, img, txt, w, tau):
        return _autograd_vjp(cls.cos, img, txt, w, tau)


class _Form2:
    """``V'_i [HK, D]`` once per image chunk; ``z[i, :] = a_i V'_i`` as a batched [bt, HK] x [HK, D] matmul."""

    uses_w = False
    text_side = staticmethod(_text_yhat)

    @staticmethod
    def image_side(k, v, w, mm):
        bi, H, K, d = k.shape
        vp = projected_values(v, w)  # [bi, HK, D]
        return (k.transpose(0, 1).reshape(H, bi * K, d), vp.to(mm))  # V' in the matmul dtype

    @staticmethod
    def z(img, txt, w, tau):
        kH, vp = img
        a = _attention(kH, txt[0], vp.shape[1] // kH.shape[0], tau)  # [H, bt, bi, K]
        return torch.bmm(_by_image(a, vp.dtype), vp).to(a.dtype)  # [bi, bt, D]

    @classmethod
    def cos(cls, img, txt, w, tau):
        return _cos_from_z(cls.z(img, txt, w, tau), txt[1])

    @staticmethod
    def cos_vjp(img, txt, w, tau):
        """Hand-written chunk gradient: with ``nc = max(||z||, eps)``, ``dz = ddot * y_hat + (dn / nc) * z``,
        ``dV' = a^T dz``, ``da = dz V'^T``, then the softmax and score gradients."""
        kH, vp = img
        q, yhat = txt
        H = kH.shape[0]
        a = _attention(kH, q, vp.shape[1] // H, tau)  # [H, bt, bi, K]
        ai = _by_image(a, vp.dtype)  # [bi, bt, HK], in the matmul dtype
        z = torch.bmm(ai, vp).to(a.dtype)  # [bi, bt, D]
        dot = (z * yhat.unsqueeze(0)).sum(-1)
        n = torch.linalg.vector_norm(z, dim=-1)
        nc = n.clamp_min(EPS)

        def vjp(dcos):
            ddot = dcos / nc
            dn = torch.where(n > EPS, -dcos * dot / (nc * nc), 0.0)
            dz = z * (dn / nc).unsqueeze(-1) + ddot.unsqueeze(-1) * yhat.unsqueeze(0)  # [bi, bt, D]
            dyhat = (z * ddot.unsqueeze(-1)).sum(0)  # [bt, D]
            dz_mm = dz.to(vp.dtype)
            dvp = torch.bmm(_by_image(a, vp.dtype, transposed=True), dz_mm).to(dz.dtype)  # [bi, HK, D]
            bi, bt, HK = ai.shape
            da = torch.bmm(dz_mm, vp.transpose(1, 2)).to(dz.dtype)
            da = da.view(bi, bt, H, HK // H).permute(2, 1, 0, 3)  # [H, bt, bi, K]
            dkH, dq = _qk_grads(_softmax_grad(a, da, tau), kH, q)
            return [dkH, dvp], [dq, dyhat], None

        return dot / nc, vjp


class _Form3:
    """``z . y_hat = sum a * c`` with ``c = <V_i[h,k], U_j[h]>`` (one gemm per head, like the scores) and
    ``||z||^2 = a G_i a^T`` (a batched [bt, HK] x [HK, HK] matmul per image). ``z`` is never formed."""

    uses_w = False

    @staticmethod
    def text_side(q, y, w):
        H, d = q.shape[1], q.shape[2]
        u = text_projection(y, w)  # U_j = W_out y_hat_j, [Bt, D]
        return (q, u.view(-1, H, d))

    @staticmethod
    def image_side(k, v, w, mm):
        bi, H, K, d = k.shape
        vH = v.transpose(0, 1).reshape(H, bi * K, d)  # head-major values, for c = <V_i[h,k], U_j[h]>
        return (k.transpose(0, 1).reshape(H, bi * K, d), vH, gram_matrices(v, w))  # G: [bi, HK, HK]

    @staticmethod
    def cos(img, txt, w, tau):
        kH, vH, gram = img
        q, u = txt
        H = kH.shape[0]
        K = gram.shape[1] // H
        a = _attention(kH, q, K, tau)  # [H, bt, bi, K]
        c = torch.matmul(u.transpose(0, 1), vH.transpose(1, 2)).view(a.shape)  # [H, bt, bi, K]
        dot = (a * c).sum(dim=(0, 3)).t()  # [bi, bt]
        ai = _by_image(a)  # [bi, bt, HK]
        n2 = (torch.bmm(ai, gram) * ai).sum(-1)  # [bi, bt]
        return dot / n2.clamp_min(EPS * EPS).sqrt()

    @staticmethod
    def cos_vjp(img, txt, w, tau):
        """Hand-written chunk gradient, docs/design.md section 7: ``ddot = dcos / n``, ``dn2 = -dcos dot / (2 n^3)``,
        ``da = ddot c + 2 dn2 (G a)``, ``dG = a^T diag(dn2) a`` (a matmul over the texts), ``dV = (ddot a)^T U``,
        ``dU = (ddot a) V``, then the softmax and score gradients."""
        kH, vH, gram = img
        q, u = txt
        H = kH.shape[0]
        bi, HK = gram.shape[0], gram.shape[1]
        a = _attention(kH, q, HK // H, tau)  # [H, bt, bi, K]
        bt = a.shape[1]
        c = torch.matmul(u.transpose(0, 1), vH.transpose(1, 2)).view(a.shape)  # [H, bt, bi, K]
        dot = (a * c).sum(dim=(0, 3)).t()  # [bi, bt]
        ai = _by_image(a)  # [bi, bt, HK]
        gai = torch.bmm(ai, gram)  # [bi, bt, HK]
        n2 = (gai * ai).sum(-1)
        n = n2.clamp_min(EPS * EPS).sqrt()

        def vjp(dcos):
            ddot = dcos / n
            dn2 = torch.where(n2 > EPS * EPS, -0.5 * dcos * dot / (n * n * n), 0.0)
            ddot_h = ddot.t()[None, :, :, None]  # [1, bt, bi, 1]
            da = c * ddot_h + (gai * (2 * dn2).unsqueeze(-1)).view(bi, bt, H, HK // H).permute(2, 1, 0, 3)
            dgram = torch.bmm((ai * dn2.unsqueeze(-1)).transpose(1, 2).contiguous(), ai)  # [bi, HK, HK]
            e = (a * ddot_h).view(H, bt, -1)  # [H, bt, bi*K]
            dvH = torch.matmul(e.transpose(1, 2).contiguous(), u.transpose(0, 1))  # [H, bi*K, d]
            du = torch.matmul(e, vH).transpose(0, 1)  # [bt, H, d]
            dkH, dq = _qk_grads(_softmax_grad(a, da, tau), kH, q)
            return [dkH, dvH, dgram], [dq, du], None

        return dot / n, vjp


FORMS = {1: _Form1, 2: _Form2, 3: _Form3}


# ---- heads: what is done with each chunk's pair values ----------------------------------------------------


class _LogitsHead:
    """``logits = t * cos + b`` written into the ``[Bi, Bt]`` output."""

    op = Op.LOGITS
    value = "cos"

    def __init__(self, Bi, Bt, t, b, pos_offset, device, out_dtype):
        self.t, self.b = t, b
        self.out = torch.empty(Bi, Bt, dtype=out_dtype, device=device)

    def forward(self, I, J, cos):
        self.out[I, J] = self.t * cos + self.b

    def result(self):
        return self.out

    def dlogits(self, I, J, lg, grad_out):
        return grad_out[I, J].to(lg.dtype)


class _SigmoidLossHead:
    """SigLIP: ``-(1/Bi) sum log sigmoid(l * logit)``, accumulated chunk by chunk; ``l = +1`` iff
    ``j == i + pos_offset``. Gradient ``dL/dlogit = -l sigmoid(-l logit) / Bi``."""

    op = Op.SIGMOID_LOSS
    value = "cos"

    def __init__(self, Bi, Bt, t, b, pos_offset, device, out_dtype):
        self.t, self.b, self.Bi, self.off, self.device = t, b, Bi, pos_offset, device
        self.total = torch.zeros((), dtype=t.dtype, device=device)
        self.out_dtype = out_dtype

    def labels(self, I, J, dtype):
        lab = -torch.ones(I.stop - I.start, J.stop - J.start, dtype=dtype, device=self.device)
        if self.off is not None:
            lo, hi = max(I.start, J.start - self.off), min(I.stop, J.stop - self.off)  # images whose positive is in J
            if lo < hi:
                rows = torch.arange(lo, hi, device=self.device)
                lab[rows - I.start, rows + self.off - J.start] = 1.0
        return lab

    def forward(self, I, J, cos):
        lg = self.t * cos + self.b
        self.total += -F.logsigmoid(self.labels(I, J, lg.dtype) * lg).sum()

    def result(self):
        return (self.total / self.Bi).to(self.out_dtype)

    def dlogits(self, I, J, lg, grad_out):
        lab = self.labels(I, J, lg.dtype)
        return (-lab * torch.sigmoid(-lab * lg)) * (grad_out.to(lg.dtype) / self.Bi)


class _SoftmaxLossHead:
    """CLIP: ``(mean_i (lse_row_i - l_ii) + mean_j (lse_col_j - l_jj)) / 2``. The forward keeps only the row
    and column log-sum-exps (merged chunk by chunk) and the diagonal; the backward recomputes
    ``dL/dlogit = (softmax_row + softmax_col) / (2B) - onehot / B`` per chunk from them."""

    op = Op.SOFTMAX_LOSS
    value = "cos"

    def __init__(self, Bi, Bt, t, b, pos_offset, device, out_dtype):
        self.t, self.B, self.device, self.out_dtype = t, Bi, device, out_dtype
        self.row = torch.full((Bi,), -math.inf, dtype=t.dtype, device=device)
        self.col = torch.full((Bt,), -math.inf, dtype=t.dtype, device=device)
        self.diag = torch.zeros(Bi, dtype=t.dtype, device=device)

    def _diag_idx(self, I, J):
        lo, hi = max(I.start, J.start), min(I.stop, J.stop)
        return torch.arange(lo, hi, device=self.device) if lo < hi else None

    def forward(self, I, J, cos):
        lg = self.t * cos
        self.row[I] = torch.logaddexp(self.row[I], torch.logsumexp(lg, dim=1))
        self.col[J] = torch.logaddexp(self.col[J], torch.logsumexp(lg, dim=0))
        idx = self._diag_idx(I, J)
        if idx is not None:
            self.diag[idx] = lg[idx - I.start, idx - J.start]

    def result(self):
        return (0.5 * (self.row.mean() + self.col.mean()) - self.diag.mean()).to(self.out_dtype)

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.row.clone(), self.col.clone()

    def restore(self, row: torch.Tensor, col: torch.Tensor) -> None:
        self.row, self.col = row.to(self.t.dtype), col.to(self.t.dtype)

    def dlogits(self, I, J, lg, grad_out):
        g = (torch.exp(lg - self.row[I, None]) + torch.exp(lg - self.col[None, J])) / (2 * self.B)
        idx = self._diag_idx(I, J)
        if idx is not None:
            g[idx - I.start, idx - J.start] -= 1.0 / self.B
        return g * grad_out.to(lg.dtype)


class _MixHead:
    """``llip_mix(all_pairs=True)``: the ``[Bi, Bt, D]`` mixed features themselves, in the inputs' dtype."""

    op = Op.MIX
    value = "z"

    def __init__(self, Bi, Bt, D, device, dtype):
        self.out = torch.empty(Bi, Bt, D, dtype=dtype, device=device)

    def statistics(self):
        return _no_statistics(self.out)

    def forward(self, I, J, z):
        self.out[I, J] = z

    def result(self):
        return self.out


# ---- the chunked passes, registered as custom ops ----------------------------------------------------------
#
# The passes are torch.library custom ops (llip_kernels._custom_ops) with shape-only fake twins, so that
# torch.compile(fullgraph=True) sees one opaque op per pass instead of tracing the chunk loops (whose backward calls
# torch.autograd.grad, which dynamo cannot trace). The softmax loss's row and column log-sum-exps are extra outputs
# of the forward pass, saved for the backward pass; the other heads return empty statistics.

HEADS = {Op.LOGITS: _LogitsHead, Op.SIGMOID_LOSS: _SigmoidLossHead, Op.SOFTMAX_LOSS: _SoftmaxLossHead, Op.MIX: _MixHead}
Tensor = torch.Tensor


def _chunks(n: int, c: int):
    return [slice(s, min(s + c, n)) for s in range(0, n, c)]


def _no_statistics(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return like.new_empty(0, dtype=torch.float32), like.new_empty(0, dtype=torch.float32)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Pass:
    """What a forward pass and its backward pass share: the form, the chunk sizes, the compute dtypes, the head."""

    def __init__(self, op: str, k, q, t, b, pos_offset):
        Bi, H, K, d = k.shape
        Bt = q.shape[0]
        self.op = Op(op)
        self.cdt = _compute_dtype(k.dtype)
        form_number = choose_form(self.op, H, K, d, Bi, Bt)
        self.form = FORMS[form_number]
        self.bi, self.bt = plan_chunks(self.op, form_number, Bi, Bt, H, K, d, torch.finfo(self.cdt).bits // 8)
        self.mm = _matmul_dtype(k.dtype, self.cdt)
        if self.op == Op.MIX:
            self.ts = None
            self.head = _MixHead(Bi, Bt, H * d, k.device, k.dtype)
        else:
            # Detached: the backward pass re-enables autograd for its chunks, and a t or b that requires grad would
            # otherwise chain every chunk's graph into dt and db and keep all of them alive to the end.
            self.ts = (t.detach().to(self.cdt), b.detach().to(self.cdt))
            self.head = HEADS[self.op](Bi, Bt, *self.ts, pos_offset, k.device, _loss_dtype(self.cdt))


def _pairs(
    k: Tensor,
    v: Tensor,
    q: Tensor,
    y: Tensor | None,
    w_out: Tensor,
    t: Tensor | None,
    b: Tensor | None,
    op: str,
    tau: float,
    pos_offset: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward: loop over image chunks (per-image side computed once) and text chunks, feeding each chunk's cosines
    (or ``z`` for mix) to the head -> ``(result, lse_row, lse_col)`` (the statistics: softmax loss only)."""
    run = _Pass(op, k, q, t, b, pos_offset)
    form, head, cdt = run.form, run.head, run.cdt
    kc, vc, qc, wc = (x.to(cdt) for x in (k, v, q, w_out))
    yc = None if y is None else y.to(cdt)
    wm = wc.to(run.mm) if form.uses_w else None
    txt = form.text_side(qc, yc, wc)
    for I in _chunks(k.shape[0], run.bi):
        img = form.image_side(kc[I], vc[I], wc, run.mm)
        for J in _chunks(q.shape[0], run.bt):
            tj = [x[J] for x in txt]
            head.forward(I, J, form.z(img, tj, wm, tau) if head.value == "z" else form.cos(img, tj, wm, tau))
    row, col = head.statistics() if hasattr(head, "statistics") else _no_statistics(k)
    return head.result(), row, col


def _pairs_backward(
    grad_out: Tensor,
    k: Tensor,
    v: Tensor,
    q: Tensor,
    y: Tensor | None,
    w_out: Tensor,
    t: Tensor | None,
    b: Tensor | None,
    lse_row: Tensor,
    lse_col: Tensor,
    op: str,
    tau: float,
    pos_offset: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: the same loops, recomputing each chunk, pulling the chunk's gradient through it and accumulating
    per-image / per-text gradients -> ``(dk, dv, dq, dy, dw_out, dt, db)`` (empty for absent inputs)."""
    run = _Pass(op, k, q, t, b, pos_offset)
    form, head, cdt, mm, ts = run.form, run.head, run.cdt, run.mm, run.ts
    if run.op == Op.SOFTMAX_LOSS:
        head.restore(lse_row, lse_col)
    Bi, Bt = k.shape[0], q.shape[0]
    with autograd_inside():  # each chunk is differentiated with torch.autograd.grad
        qc, wc = (x.detach().to(cdt).requires_grad_() for x in (q, w_out))
        yc = None if y is None else y.detach().to(cdt).requires_grad_()
        kc, vc = (x.detach().to(cdt) for x in (k, v))
        txt = form.text_side(qc, yc, wc)
        txt_d = [x.detach() for x in txt]
        dtxt = [torch.zeros_like(x) for x in txt_d]
        dk, dv, dw = torch.zeros_like(kc), torch.zeros_like(vc), torch.zeros_like(wc)
        dt = db = torch.zeros((), dtype=cdt, device=k.device)
        for I in _chunks(Bi, run.bi):
            kI, vI = kc[I].requires_grad_(), vc[I].requires_grad_()
            img = form.image_side(kI, vI, wc, mm)
            img_d = [x.detach() for x in img]
            dimg = [None] * len(img_d)  # summed over the text chunks, in float32
            for J in _chunks(Bt, run.bt):
                tj = [x[J] for x in txt_d]
                wl = wc.detach().to(mm) if form.uses_w else None
                if head.value == "z":
                    _, vjp = _autograd_vjp(form.z, img_d, tj, wl, tau)
                    dval = grad_out[I, J].to(cdt)
                else:
                    cos, vjp = form.cos_vjp(img_d, tj, wl, tau)
                    tf, bf = ts
                    g = head.dlogits(I, J, tf * cos + bf, grad_out)  # dL/dlogit, [bi, bt]
                    dt = dt + (g * cos).sum()
                    db = db + g.sum()
                    dval = g * tf
                gimg, gtxt, gw = vjp(dval)
                for n, gr in enumerate(gimg):
                    if gr is not None:
                        dimg[n] = gr.to(cdt) if dimg[n] is None else dimg[n].add_(gr)
                for acc, gr in zip(dtxt, gtxt):
                    if gr is not None:
                        acc[J] += gr
                if gw is not None:
                    dw += gw.to(cdt)
            outs = [(x, g.to(x.dtype)) for x, g in zip(img, dimg) if g is not None]
            gk, gv, gw = torch.autograd.grad(
                [o for o, _ in outs], [kI, vI, wc], [g for _, g in outs], allow_unused=True
            )
            dk[I], dv[I] = gk, gv
            if gw is not None:
                dw += gw
        wanted = [x for x in (qc, yc, wc) if x is not None]
        gtxt = torch.autograd.grad(txt, wanted, dtxt, allow_unused=True)
    gq, gw = gtxt[0], gtxt[-1]
    gy = gtxt[1] if y is not None else None
    if gw is not None:
        dw += gw
    dt_out = k.new_empty(0, dtype=torch.float32) if t is None else dt.to(t.dtype).reshape(t.shape)
    db_out = k.new_empty(0, dtype=torch.float32) if b is None else db.to(b.dtype).reshape(b.shape)
    dy_out = k.new_empty(0, dtype=torch.float32) if y is None else _to(gy, y)  # fresh: custom ops may not return
    return dk.to(k.dtype), dv.to(v.dtype), _to(gq, q), dy_out, dw.to(w_out.dtype), dt_out, db_out  # a tensor twice


def _to(g, like):
    """``g`` as the gradient of ``like``: zeros where autograd found none."""
    return torch.zeros_like(like) if g is None else g.to(like.dtype)


def _pairs_fake(k, v, q, y, w_out, t, b, op, tau, pos_offset):
    Bi, Bt, D = k.shape[0], q.shape[0], w_out.shape[0]
    out_dtype = _loss_dtype(k.dtype)
    shape = {Op.LOGITS: (Bi, Bt), Op.MIX: (Bi, Bt, D)}.get(Op(op), ())
    out = k.new_empty(shape, dtype=k.dtype if Op(op) == Op.MIX else out_dtype)
    if Op(op) == Op.SOFTMAX_LOSS:
        return out, k.new_empty(Bi, dtype=out_dtype), k.new_empty(Bt, dtype=out_dtype)
    return (out, *_no_statistics(k))


def _pairs_backward_fake(grad_out, k, v, q, y, w_out, t, b, lse_row, lse_col, op, tau, pos_offset):
    def like(x):
        return k.new_empty(0, dtype=torch.float32) if x is None else torch.empty_like(x)

    return like(k), like(v), like(q), like(y), like(w_out), like(t), like(b)


torch_pairs = define("torch_pairs", _pairs, fake=_pairs_fake)
torch_pairs_backward = define("torch_pairs_backward", _pairs_backward, fake=_pairs_backward_fake)


def _setup_context(ctx, inputs, output):
    k, v, q, y, w_out, t, b, op, tau, pos_offset = inputs
    _, lse_row, lse_col = output
    ctx.save_for_backward(k, v, q, y, w_out, t, b, lse_row, lse_col)
    ctx.params = (op, tau, pos_offset)


def _backward(ctx, grad, _grad_lse_row, _grad_lse_col):
    k, v, q, y, w_out, t, b, lse_row, lse_col = ctx.saved_tensors
    dk, dv, dq, dy, dw, dt, db = torch_pairs_backward(grad, k, v, q, y, w_out, t, b, lse_row, lse_col, *ctx.params)
    absent = [x is None for x in (y, t, b)]  # mix has no y, t, b: no gradient for them
    dy, dt, db = (None if gone else g for gone, g in zip(absent, (dy, dt, db)))
    return dk, dv, dq, dy, dw, dt, db, None, None, None


torch_pairs.register_autograd(_backward, setup_context=_setup_context)

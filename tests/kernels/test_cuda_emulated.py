"""The cuda backend's Python side and its maths, checked on the CPU with the extension replaced by an emulator.

No GPU can run the kernels here, so this file checks everything around them: the custom ops, their autograd,
the torch pre-computations (u, the padded Gram matrices, gscale), and the exact per-pair formulas the kernels
implement (``csrc/cuda/llip_kernels.cu``: softmax, dot, n2 from the scaled G with ``a`` rounded to the input dtype,
g, ddot, dn2, dn2s, da, ds, and which quantity each output gradient is taken with respect to). The emulator
(:class:`EmulatedExtension`) evaluates those formulas for all pairs at once in float32; if the kernels compute what
it computes, the real backend passes the same checks (docs/design.md section 6; bench/cuda_check.py runs them on a
GPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llip_kernels import functional
from llip_kernels.backends import cuda as cuda_backend
from llip_kernels.testing import check_op_against_reference, make_llip_inputs

EPS2 = 1e-24


class EmulatedExtension:
    """Same functions, arguments and outputs as the compiled extension (``llip_binding.cpp``), in float32 torch."""

    @staticmethod
    def _pairs(k, v, q, u, g, gscale, tau):
        Bi, H, K, d = k.shape
        Kp = g.shape[1] // H
        kf, vf, qf, uf = k.float(), v.float(), q.float(), u.float()
        a = torch.softmax(torch.einsum("ihkc,jhc->ijhk", kf, qf) / tau, dim=-1)  # [Bi, Bt, H, K]
        c = torch.einsum("ihkc,jhc->ijhk", vf, uf)  # [Bi, Bt, H, K]
        dot = (a * c).sum((-1, -2))  # [Bi, Bt]
        a_t = F.pad(a, (0, Kp - K)).to(k.dtype).float().flatten(2)  # As: [Bi, Bt, HKp], rounded like the kernel's
        r = torch.einsum("irs,ijs->ijr", g.float(), a_t)  # G_scaled @ a
        n2 = (a_t * r).sum(-1) * gscale[:, None]  # [Bi, Bt], the true (unscaled) n2
        return a, c, dot, a_t, r, n2

    def cosine(self, k, v, q, u, g, gscale, tau):
        _, _, dot, _, _, n2 = self._pairs(k, v, q, u, g, gscale, tau)
        return dot / n2.clamp_min(EPS2).sqrt()

    @staticmethod
    def _labels(Bi, Bt, pos_offset, has_pos):
        i = torch.arange(Bi)[:, None]
        j = torch.arange(Bt)[None, :]
        return torch.where(torch.tensor(has_pos) & (j == i + pos_offset), 1.0, -1.0)

    def sigmoid_fwd(self, k, v, q, u, g, gscale, t, b, tau, pos_offset, has_pos, grid_x):
        cos = self.cosine(k, v, q, u, g, gscale, tau)
        x = self._labels(*cos.shape, pos_offset, has_pos) * (t * cos + b)
        part = torch.zeros(cos.shape[0], grid_x)
        part[:, 0] = F.softplus(-x).sum(1)
        return part

    def sigmoid_bwd(self, gout, k, v, q, u, g, gscale, t, b, tau, pos_offset, has_pos, deterministic):
        Bi, H, K, d = k.shape
        a, c, dot, a_t, r, n2 = self._pairs(k, v, q, u, g, gscale, tau)
        nsq = n2.clamp_min(EPS2)
        n = nsq.sqrt()
        cos = dot / n
        lab = self._labels(Bi, q.shape[0], pos_offset, has_pos)
        gg = -lab * gout / (1 + torch.exp(lab * (t * cos + b)))  # dLoss/dlogit per pair
        dcos = gg * t
        ddot = dcos / n
        dn2 = torch.where(n2 > EPS2, -dcos * dot / (2 * nsq * n), 0.0)
        dn2s = dn2 * gscale[:, None]
        r_h = r.view(Bi, -1, H, g.shape[1] // H)[..., :K]  # [Bi, Bt, H, K]
        da = ddot[..., None, None] * c + 2 * dn2s[..., None, None] * r_h
        ds = a * (da - (a * da).sum(-1, keepdim=True)) / tau
        pa = ddot[..., None, None] * a
        # The kernel feeds ds, ddot*a and a*dn2 to the tensor cores in the input dtype (after a power-of-two
        # rescale that only matters for float16's range): round them the same way here.
        ds, pa = ds.to(k.dtype).float(), pa.to(k.dtype).float()
        a_dn2 = (a_t * dn2[..., None]).to(k.dtype).float()
        kf, vf, qf, uf = k.float(), v.float(), q.float(), u.float()
        dk = torch.einsum("ijhk,jhc->ihkc", ds, qf)
        dq = torch.einsum("ijhk,ihkc->jhc", ds, kf)
        dv = torch.einsum("ijhk,jhc->ihkc", pa, uf)
        du = torch.einsum("ijhk,ihkc->jhc", pa, vf)
        dg = torch.einsum("ijr,ijs->irs", a_dn2, a_t)
        return dk, dv, dq, du, dg, (gg * cos).sum(1), gg.sum(1)


@pytest.fixture
def emulated(monkeypatch):
    """Route backend "cuda" to the emulator, on CPU tensors."""
    ext = EmulatedExtension()
    monkeypatch.setattr(cuda_backend, "extension", lambda: ext)
    monkeypatch.setattr(cuda_backend, "not_supported_reasons", lambda problem: [])
    return ext


# Odd shapes: Bi != Bt; K = 1 (softmax of one), 5 and 17 (padding to 16 and 32 per head); d = 48 and 20 (not a
# power of two); H = 1 and 3.
SHAPES = [(5, 7, 2, 5, 48), (3, 11, 1, 1, 20), (6, 4, 3, 17, 16)]


ALL_KINDS = ("gaussian", "peaked", "near_ties", "duplicate_rows", "non_unit", "large_scale")
# Every adversarial kind on the first shape; the families that stress the norm and the softmax on the others.
BF16_CASES = [(SHAPES[0], kind) for kind in ALL_KINDS] + [
    (shape, kind) for shape in SHAPES[1:] for kind in ("gaussian", "peaked", "non_unit")
]


@pytest.mark.parametrize(
    ("shape", "kind"), BF16_CASES, ids=["Bi{}-Bt{}-H{}-K{}-d{}-".format(*s) + k for s, k in BF16_CASES]
)
def test_sigmoid_loss_bf16(emulated, shape, kind):
    x = make_llip_inputs(*shape, kind=kind, dtype=torch.bfloat16, seed=3)
    check_op_against_reference("sigmoid_loss", x, "cuda", pos_offset=1)


# float16: its narrow range is what gscale and the power-of-two gradient rescaling are for; pos_offset None is a
# block of remote texts (all negatives), -2 puts the positives below the diagonal.
@pytest.mark.parametrize(("kind", "pos_offset"), [("gaussian", 0), ("non_unit", 0), ("non_unit", None), ("peaked", -2)])
def test_sigmoid_loss_fp16(emulated, kind, pos_offset):
    x = make_llip_inputs(6, 5, 2, 5, 24, kind=kind, dtype=torch.float16, seed=4)
    check_op_against_reference("sigmoid_loss", x, "cuda", pos_offset=pos_offset)


@pytest.mark.parametrize("kind", ["gaussian", "peaked", "non_unit"])
def test_logits_forward(emulated, kind):
    x = make_llip_inputs(5, 9, 2, 5, 48, kind=kind, dtype=torch.bfloat16, seed=5, requires_grad=False)
    check_op_against_reference("logits", x, "cuda", with_grad=False)


def test_gram_and_text_precomputation():
    """``text_and_gram`` reproduces z.y_hat = sum_h m_h . u_h and ||z||^2 = a G a^T for a random mixing ``a``."""
    Bi, Bt, H, K, d = 3, 4, 2, 5, 6
    g = torch.Generator().manual_seed(0)
    v = torch.randn(Bi, H, K, d, generator=g, dtype=torch.float64)
    y = torch.randn(Bt, H * d, generator=g, dtype=torch.float64)
    w = torch.randn(H * d, H * d, generator=g, dtype=torch.float64)
    a = torch.softmax(torch.randn(Bi, Bt, H, K, generator=g, dtype=torch.float64), -1)
    u, gram = cuda_backend.text_and_gram(v, y, w)
    assert gram.shape == (Bi, H * 16, H * 16)
    z = torch.einsum("ijhk,ihkc->ijhc", a, v).reshape(Bi, Bt, H * d) @ w
    ap = F.pad(a, (0, 16 - K)).reshape(Bi, Bt, H * 16).float()
    n2 = torch.einsum("ijr,irs,ijs->ij", ap, gram, ap)
    torch.testing.assert_close(n2.double(), (z * z).sum(-1), rtol=1e-5, atol=1e-5)
    dot = torch.einsum("ijhk,ihkc,jhc->ij", a, v, u.double().view(Bt, H, d))
    torch.testing.assert_close(dot, (z * F.normalize(y, dim=-1)).sum(-1), rtol=1e-5, atol=1e-5)


def test_no_pair_sized_tensors_in_glue(emulated, monkeypatch):
    """Around the kernels, the torch glue of the loss allocates nothing with both a Bi and a Bt dimension (the
    emulator itself does, so it is swapped for a shape-only stand-in here). Bi and Bt are primes that no other size
    equals, so a [Bi, Bt]-like intermediate cannot hide."""
    from llip_kernels.testing import record_allocations

    class ShapesOnly:
        def sigmoid_fwd(self, k, v, q, u, g, gscale, t, b, tau, pos_offset, has_pos, grid_x):
            return torch.zeros(k.shape[0], grid_x)

    monkeypatch.setattr(cuda_backend, "extension", lambda: ShapesOnly())
    Bi, Bt, H, K, d = 37, 41, 2, 3, 5
    x = make_llip_inputs(Bi, Bt, H, K, d, dtype=torch.bfloat16, requires_grad=False)
    with record_allocations() as rec:
        loss = functional.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend="cuda")
    assert loss.shape == ()
    pair_sized = [a for a in rec.allocations if Bi in a.shape and Bt in a.shape]
    assert rec.allocations and not pair_sized, pair_sized

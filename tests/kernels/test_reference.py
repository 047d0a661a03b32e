"""The reference backend and the pooled baselines against an independent fp64 implementation.

The oracle here is written from docs/design.md section 1 with explicit loops over heads (not the einsums of
llip_kernels/reference.py), so a shared mistake would have to be made twice in two different ways.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import llip_kernels as lk
from llip_kernels.testing import KINDS, make_llip_inputs


def llip_logits_fp64(k, v, q, y, w_out, t, b, tau):
    """docs/design.md section 1, literally: for each head, a softmax over the K tokens of <K_i[h,k], Q_j[h]> / tau."""
    k, v, q, y, w_out = (x.double() for x in (k, v, q, y, w_out))
    H = k.shape[1]
    heads = []
    for h in range(H):
        s = (k[:, h] @ q[:, h].T).permute(0, 2, 1) / tau  # [Bi, Bt, K]
        a = torch.exp(s - s.max(-1, keepdim=True).values)
        a = a / a.sum(-1, keepdim=True)
        heads.append(a @ v[:, h])  # [Bi, Bt, d]
    z = torch.cat(heads, dim=-1) @ w_out  # [Bi, Bt, D]
    zn = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    yn = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (zn * yn[None]).sum(-1)
    return t.double() * cos + b.double()


def sigmoid_loss_fp64(logits, pos_offset):
    Bi, Bt = logits.shape
    total = 0.0
    for i in range(Bi):
        for j in range(Bt):
            label = 1.0 if (pos_offset is not None and j == i + pos_offset) else -1.0
            total += -F.logsigmoid(label * logits[i, j]).item()
    return total / Bi


def softmax_loss_fp64(logits):
    B = logits.shape[0]
    rows = sum(-(logits[i, i] - torch.logsumexp(logits[i], 0)).item() for i in range(B)) / B
    cols = sum(-(logits[i, i] - torch.logsumexp(logits[:, i], 0)).item() for i in range(B)) / B
    return 0.5 * (rows + cols)


# Odd shapes: Bi != Bt, primes, K at 1 (no mixing), 5, 64 and 65 (one past a power of two), d not a power of two.
SHAPES = [
    # (Bi, Bt, H, K, d)
    (7, 5, 2, 5, 48),
    (3, 11, 1, 1, 16),
    (5, 7, 3, 64, 8),
    (2, 3, 2, 65, 96),
    (1, 1, 1, 3, 160),
]


def _ids(shape):
    return "B{}x{}-H{}-K{}-d{}".format(*shape)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_logits_match_fp64(shape, kind):
    x = make_llip_inputs(*shape, kind=kind, dtype=torch.float64, seed=sum(shape))
    ours = lk.llip_logits(x.k, x.v, x.q, x.y, x.w_out, tau=x.tau, logit_scale=x.t, logit_bias=x.b, backend="reference")
    expected = llip_logits_fp64(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, x.tau)
    assert ours.dtype == torch.float64  # float64 in, float64 out (float32 for every other dtype)
    assert (ours - expected).abs().max().item() <= 1e-10 * (1 + expected.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES[:3], ids=_ids)
@pytest.mark.parametrize("pos_offset", [0, 2, -1, None, 100])
def test_reference_sigmoid_loss_matches_fp64(shape, pos_offset):
    x = make_llip_inputs(*shape, dtype=torch.float64, seed=3)
    loss = lk.llip_sigmoid_loss(
        x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, pos_offset=pos_offset, backend="reference"
    )
    expected = sigmoid_loss_fp64(llip_logits_fp64(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, x.tau), pos_offset)
    assert loss.shape == ()
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


@pytest.mark.parametrize("B,H,K,d", [(6, 2, 5, 48), (1, 1, 1, 16), (9, 3, 65, 8)])
def test_reference_softmax_loss_matches_fp64(B, H, K, d):
    x = make_llip_inputs(B, B, H, K, d, dtype=torch.float64, seed=4)
    loss = lk.llip_softmax_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, tau=x.tau, backend="reference")
    expected = softmax_loss_fp64(llip_logits_fp64(x.k, x.v, x.q, x.y, x.w_out, x.t, torch.tensor(0.0), x.tau))
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_reference_is_exact_in_fp64_before_the_output_cast():
    """Done-when criterion of the foundation issue: the reference matches the fp64 formula to 1e-10 in fp64."""
    from llip_kernels.reference import cosine_all_pairs, mix_all_pairs

    x = make_llip_inputs(7, 33, 4, 63, 48, dtype=torch.float64, seed=7, kind="non_unit")
    z = mix_all_pairs(x.k, x.v, x.q, x.w_out, x.tau)
    assert z.dtype == torch.float64
    expected = llip_logits_fp64(x.k, x.v, x.q, x.y, x.w_out, torch.tensor(1.0), torch.tensor(0.0), x.tau)
    assert (cosine_all_pairs(x.k, x.v, x.q, x.y, x.w_out, x.tau) - expected).abs().max().item() < 1e-10
    lg32 = lk.llip_logits(*(t.float() for t in (x.k, x.v, x.q, x.y, x.w_out)), tau=x.tau, backend="reference")
    assert lg32.dtype == torch.float32 and (lg32.double() - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("op", ["logits", "sigmoid_loss", "softmax_loss"])
def test_gradcheck_every_input_fp64(op):
    x = make_llip_inputs(3, 3, 2, 4, 5, dtype=torch.float64, seed=11, tau=0.7)
    x.t = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)  # keep the sigmoid out of saturation
    x.b = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)

    def fn(k, v, q, y, w_out, t, b):
        if op == "logits":
            return lk.llip_logits(k, v, q, y, w_out, tau=x.tau, logit_scale=t, logit_bias=b, backend="reference")
        if op == "sigmoid_loss":
            return lk.llip_sigmoid_loss(k, v, q, y, w_out, t, b, tau=x.tau, pos_offset=1, backend="reference")
        return lk.llip_softmax_loss(k, v, q, y, w_out, t, tau=x.tau, backend="reference") + 0 * b

    assert torch.autograd.gradcheck(fn, tuple(x.tensors().values()), eps=1e-6, atol=1e-7, fast_mode=True)


def test_permuting_texts_permutes_logit_columns():
    x = make_llip_inputs(4, 6, 2, 5, 8, seed=5)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    lg = lk.llip_logits(x.k, x.v, x.q, x.y, x.w_out, tau=x.tau, backend="reference")
    lg_perm = lk.llip_logits(x.k, x.v, x.q[perm], x.y[perm], x.w_out, tau=x.tau, backend="reference")
    assert torch.allclose(lg_perm, lg[:, perm], atol=1e-6)


def test_single_token_reduces_to_plain_cosine():
    """K = 1: the softmax is 1, so z_i = v_i @ w_out for every text and the logit is the plain cosine."""
    x = make_llip_inputs(5, 4, 3, 1, 6, dtype=torch.float64, seed=6)
    lg = lk.llip_logits(x.k, x.v, x.q, x.y, x.w_out, tau=x.tau, backend="reference")
    img = x.v[:, :, 0, :].reshape(5, -1) @ x.w_out
    expected = F.normalize(img, dim=-1) @ F.normalize(x.y, dim=-1).T
    assert torch.allclose(lg.double(), expected, atol=1e-6)


def test_pos_offset_semantics():
    """The loss with pos_offset p equals the all-negative loss minus, for each existing positive, the change of
    that one term from label -1 to +1."""
    x = make_llip_inputs(5, 7, 2, 3, 4, dtype=torch.float64, seed=8)
    lg = llip_logits_fp64(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, x.tau)
    for p in (0, 2, -3, 6, -5, 50):
        got = lk.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, pos_offset=p, backend="reference")
        expected = sigmoid_loss_fp64(lg, None)
        for i in range(5):
            if 0 <= i + p < 7:
                expected += (-F.logsigmoid(lg[i, i + p]) + F.logsigmoid(-lg[i, i + p])).item() / 5
        assert math.isclose(got.item(), expected, rel_tol=1e-6), p


@pytest.mark.parametrize("Bi,Bt,D", [(5, 7, 12), (1, 1, 3)])
@pytest.mark.parametrize("pos_offset", [0, 1, None])
def test_pooled_sigmoid_loss_matches_fp64(Bi, Bt, D, pos_offset):
    g = torch.Generator().manual_seed(0)
    img, txt = (
        torch.randn(Bi, D, generator=g, dtype=torch.float64),
        torch.randn(Bt, D, generator=g, dtype=torch.float64),
    )
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    lg = t * (img / img.norm(dim=1, keepdim=True)) @ (txt / txt.norm(dim=1, keepdim=True)).T + b
    got = lk.sigmoid_loss(img, txt, t, b, pos_offset=pos_offset)
    assert math.isclose(got.item(), sigmoid_loss_fp64(lg, pos_offset), rel_tol=1e-6)


def test_pooled_softmax_loss_matches_fp64():
    g = torch.Generator().manual_seed(1)
    img, txt = (
        torch.randn(9, 10, generator=g, dtype=torch.float64),
        torch.randn(9, 10, generator=g, dtype=torch.float64),
    )
    t = torch.tensor(14.0)
    lg = t * (img / img.norm(dim=1, keepdim=True)) @ (txt / txt.norm(dim=1, keepdim=True)).T
    assert math.isclose(lk.softmax_loss(img, txt, t).item(), softmax_loss_fp64(lg), rel_tol=1e-6)


def test_llip_mix_aligned_is_the_diagonal_of_all_pairs():
    x = make_llip_inputs(5, 5, 2, 7, 6, dtype=torch.float64, seed=9)
    allp = lk.llip_mix(x.k, x.v, x.q, x.w_out, tau=x.tau, all_pairs=True, backend="reference")
    aligned = lk.llip_mix(x.k, x.v, x.q, x.w_out, tau=x.tau, backend="reference")
    assert allp.shape == (5, 5, 12) and aligned.shape == (5, 12)
    assert torch.allclose(aligned, allp[torch.arange(5), torch.arange(5)], atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_low_precision_returns_float32_and_stays_close(dtype):
    x = make_llip_inputs(6, 5, 2, 5, 16, dtype=dtype, seed=10)
    lg = lk.llip_logits(x.k, x.v, x.q, x.y, x.w_out, tau=x.tau, logit_scale=x.t, logit_bias=x.b, backend="reference")
    assert lg.dtype == torch.float32
    ref = llip_logits_fp64(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, x.tau)
    assert (lg.double() - ref).abs().max() < 0.5  # t = 10: a cosine error below 0.05 in 8-bit mantissas

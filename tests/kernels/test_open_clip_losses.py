"""The blocked pooled losses (llip_kernels/pooled.py) against the float64 reference, and the open_clip drop-ins
(llip_kernels/open_clip.py) against open_clip's own ``ClipLoss`` / ``SigLipLoss`` with open_clip's call convention.
Their multi-process behaviour is tested in test_distributed.py."""

from __future__ import annotations

import pytest
import torch

import llip_kernels as lk
from llip_kernels.open_clip import ClipLoss, SigLipLoss
from llip_kernels.pooled import fused_sigmoid_loss, fused_softmax_loss
from llip_kernels.testing import check_rule

# (Bi, Bt, D, block, pos_offset): odd sizes, blocks that do not divide the batch, one row per block, a block larger
# than the batch, positives shifted off the square and none at all.
SIGMOID_CASES = [(37, 53, 19, 8, 0), (64, 64, 32, 7, 3), (50, 31, 9, 1000, None), (33, 33, 5, 1, -4), (1, 17, 3, 4, 0)]
SOFTMAX_CASES = [(37, 19, 8), (64, 32, 7), (50, 9, 1000), (1, 3, 1)]


def _inputs(Bi, Bt, D, dtype, seed=0, scale=12.0, bias=-4.0):
    g = torch.Generator().manual_seed(seed)
    img = (3 * torch.randn(Bi, D, generator=g)).to(dtype).requires_grad_()  # not normalised: the losses do it
    txt = (0.1 * torch.randn(Bt, D, generator=g)).to(dtype).requires_grad_()
    scalar = torch.float64 if dtype == torch.float64 else torch.float32  # a model keeps its scale in float32
    t = torch.tensor(scale, dtype=scalar, requires_grad=True)
    b = torch.tensor(bias, dtype=scalar, requires_grad=True)
    return img, txt, t, b


def _value_and_grads(fn, inputs):
    out = fn(*inputs)
    return [out.detach(), *torch.autograd.grad(out, inputs)]


def _as64(inputs):
    return [x.detach().double().requires_grad_() for x in inputs]


def _check_against_reference(fused, baseline, inputs, dtype, names):
    ours = _value_and_grads(fused, inputs)
    ref64 = _value_and_grads(baseline, _as64(inputs))
    same_dtype = _value_and_grads(baseline, inputs)  # the plain [B, B] path in the inputs' dtype
    for name, a, r, s in zip(("loss", *names), ours, ref64, same_dtype):
        check_rule(name, a, r, s, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", SIGMOID_CASES)
def test_blocked_sigmoid_loss_matches_the_reference(case, dtype):
    Bi, Bt, D, block, pos = case
    inputs = _inputs(Bi, Bt, D, dtype, seed=Bi)
    _check_against_reference(
        lambda i, x, t, b: fused_sigmoid_loss(i, x, t, b, pos_offset=pos, block=block),
        lambda i, x, t, b: lk.sigmoid_loss(i, x, t, b, pos_offset=pos),
        inputs,
        dtype,
        ("dimg", "dtxt", "dlogit_scale", "dlogit_bias"),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", SOFTMAX_CASES)
def test_blocked_softmax_loss_matches_the_reference(case, dtype):
    B, D, block = case
    img, txt, t, _ = _inputs(B, B, D, dtype, seed=B, scale=100.0)  # a peaked softmax: the log-sum-exps must hold
    _check_against_reference(
        lambda i, x, t: fused_softmax_loss(i, x, t, block=block),
        lambda i, x, t: lk.softmax_loss(i, x, t),
        [img, txt, t],
        dtype,
        ("dimg", "dtxt", "dlogit_scale"),
    )


def test_blocked_losses_in_float64_pass_gradcheck():
    g = torch.Generator().manual_seed(3)
    img, txt = (torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: fused_sigmoid_loss(*a, pos_offset=1, block=3), (img, txt, t, b))
    assert torch.autograd.gradcheck(lambda i, x, t: fused_softmax_loss(i, x, t, block=2), (img, txt, t))


def test_blocked_losses_edges():
    empty = torch.zeros(0, 4, requires_grad=True)
    txt = torch.randn(3, 4, requires_grad=True)
    loss = fused_sigmoid_loss(empty, txt, 10.0, -10.0)
    assert loss.item() == 0.0 and torch.autograd.grad(loss, txt)[0].abs().sum() == 0
    assert fused_softmax_loss(empty, empty, 10.0).item() == 0.0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="block must be a positive int"):
            fused_sigmoid_loss(txt, txt, 10.0, -10.0, block=bad)
    with pytest.raises(ValueError):
        fused_softmax_loss(txt, txt[:2], 10.0)  # CLIP needs Bi == Bt


def _open_clip_outputs(dtype, with_bias=True, B=24, D=16):
    """What an open_clip model returns with ``output_dict=True``: normalised features and the exponentiated scale."""
    img, txt, t, b = _inputs(B, B, D, dtype, seed=5)
    out = {"image_features": torch.nn.functional.normalize(img, dim=-1),
           "text_features": torch.nn.functional.normalize(txt, dim=-1), "logit_scale": t}  # fmt: skip
    if with_bias:
        out["logit_bias"] = b
    return out, [img, txt, t] + ([b] if with_bias else [])


@pytest.mark.parametrize("block", [5, None])
def test_drop_ins_equal_open_clip_with_its_call_convention(open_clip, block):
    from open_clip.loss import ClipLoss as TheirClip
    from open_clip.loss import SigLipLoss as TheirSigLip

    for ours, theirs, with_bias in ((SigLipLoss(block=block), TheirSigLip(), True),
                                    (ClipLoss(block=block), TheirClip(), False)):  # fmt: skip
        out, leaves = _open_clip_outputs(torch.float64, with_bias)
        got = ours(**out, output_dict=True)
        want = theirs(**out, output_dict=True)
        assert set(got) == set(want) == {"contrastive_loss"}
        pairs = [(got["contrastive_loss"], want["contrastive_loss"])]
        pairs += zip(torch.autograd.grad(got["contrastive_loss"], leaves, retain_graph=True),
                     torch.autograd.grad(want["contrastive_loss"], leaves))  # fmt: skip
        for a, w in pairs:  # float64 both: equal to float64 rounding of sums over B^2 pairs
            assert (a - w).abs().max() <= 1e-12 * max(1.0, w.abs().max().item())
        # positional calls and output_dict=False too; open_clip's ClipLoss also takes (and ignores) a bias
        assert torch.equal(ours(*out.values()), got["contrastive_loss"].detach())
    clip_out, _ = _open_clip_outputs(torch.float64, with_bias=True)
    assert torch.allclose(ClipLoss(block=block)(**clip_out), TheirClip()(**clip_out), rtol=1e-12, atol=0)


def test_drop_ins_in_float32_keep_the_numerics_rule(open_clip):
    from open_clip.loss import SigLipLoss as TheirSigLip

    def run(loss, dtype):  # gradients reach the features before the model's normalisation, as in training
        out, leaves = _open_clip_outputs(dtype)
        value = loss(**out)
        return [value.detach(), *torch.autograd.grad(value, leaves)]

    ours, ref64, same = (
        run(SigLipLoss(block=7), torch.float32),
        run(TheirSigLip(), torch.float64),
        run(TheirSigLip(), torch.float32),
    )
    for name, a, r, s in zip(("loss", "dimg", "dtxt", "dt", "db"), ours, ref64, same):
        check_rule(name, a, r, s, torch.float32)


def test_drop_ins_refuse_what_they_would_change_silently():
    with pytest.raises(ValueError, match="local_loss=True, gather_with_grad=True"):
        ClipLoss(world_size=2, rank=0)
    with pytest.raises(ValueError, match="use_horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="carrier-pigeon")
    out, _ = _open_clip_outputs(torch.float32)
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed"):
        SigLipLoss(rank=1, world_size=2)(**out)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        SigLipLoss(rank=2, world_size=2)(**out)
    with pytest.raises(TypeError, match="image_embs"):
        SigLipLoss()(**out, image_embs=out["image_features"])  # open_clip's losses do not take other keys either

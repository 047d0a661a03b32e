"""Backend "torch" (llip_kernels/backends/torch.py) against the fp64 reference (docs/design.md section 6): every
op, each algebraic form, every gradient, low-precision dtypes, adversarial inputs and pos_offsets, with the chunking
forced small so chunk boundaries fall inside the batches; then its memory bound, form choice and FLOP count."""

import pytest
import torch

import llip_kernels as lk
from llip_kernels import settings
from llip_kernels.algebra import call_flops, pair_flops, pair_grad_flops
from llip_kernels.backends import torch as torch_backend
from llip_kernels.testing import (
    KINDS,
    check_op_against_reference,
    check_rule,
    make_llip_inputs,
    record_allocations,
    run_op,
)

OPS = ("logits", "sigmoid_loss", "softmax_loss")


@pytest.fixture
def force(monkeypatch):
    """``force(form=2, chunk="3,4", budget_mb=0.05)`` sets the backend's tuning variables for one test."""

    def _force(form=None, chunk=None, budget_mb=None):
        tuning = {settings.TORCH_FORM: form, settings.TORCH_CHUNK: chunk, settings.TORCH_BUDGET_MB: budget_mb}
        for env, val in tuning.items():
            if val is None:
                monkeypatch.delenv(env, raising=False)
            else:
                monkeypatch.setenv(env, str(val))

    return _force


# 7 images in chunks of 3 (3 + 3 + 1) against 11 texts in chunks of 4 (4 + 4 + 3): ragged last chunks on both
# axes, and for the square softmax case (7 x 7) diagonal blocks that straddle chunk edges.
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("form", [1, 2, 3])
def test_every_form_op_and_kind(force, form, op, kind):
    force(form=form, chunk="3,4")
    x = make_llip_inputs(7, 7 if op == "softmax_loss" else 11, 2, 5, 6, kind=kind, seed=form)
    check_op_against_reference(op, x, "torch")


# Odd shapes (docs/design.md section 6): Bi != Bt both ways, primes, K in {1, 5, 64, 65}, d in {48, 96, 160}.
SHAPES = [
    (7, 13, 1, 1, 48),  # K = 1: the softmax over K is the constant 1
    (13, 5, 2, 5, 48),  # more images than texts
    (5, 7, 2, 64, 96),  # the paper's K
    (3, 7, 1, 65, 160),  # K one past a power of two, the widest head
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "Bi{}-Bt{}-H{}-K{}-d{}".format(*s))
@pytest.mark.parametrize("form", [1, 2, 3])
def test_odd_shapes(force, form, shape):
    force(form=form, chunk="2,3")
    Bi, Bt, H, K, d = shape
    x = make_llip_inputs(Bi, Bt, H, K, d, kind="gaussian", seed=K)
    check_op_against_reference("sigmoid_loss", x, "torch", pos_offset=1)
    x = make_llip_inputs(Bi, Bt, H, K, d, kind="peaked", seed=d)
    check_op_against_reference("logits", x, "torch")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(9, 9, 3, 5, 16), (16, 16, 4, 8, 32)], ids=str)
def test_peaked_softmax_every_seed(op, shape):
    """tau = 0.05: the scores are scaled after their product (pre-scaling q put dk and dq at up to 4x the
    same-dtype reference's error in 5 of these 72 runs)."""
    for seed in range(12):
        check_op_against_reference(op, make_llip_inputs(*shape, kind="peaked", seed=seed), "torch")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["gaussian", "non_unit", "large_scale"])
@pytest.mark.parametrize("form", [1, 2, 3])
def test_low_precision(force, form, kind, dtype):
    force(form=form, chunk="4,5")
    for op in OPS:
        x = make_llip_inputs(7, 7 if op == "softmax_loss" else 5, 2, 5, 24, kind=kind, dtype=dtype)
        check_op_against_reference(op, x, "torch")


# 3 and -2 put some images' positives outside the texts (no positive for them); None: all pairs negative;
# 100: no positive anywhere yet the labels code runs.
@pytest.mark.parametrize("pos_offset", [0, 3, -2, None, 100])
@pytest.mark.parametrize("form", [1, 2, 3])
def test_pos_offset(force, form, pos_offset):
    force(form=form, chunk="2,4")
    x = make_llip_inputs(7, 9, 2, 5, 6, kind="duplicate_rows")
    check_op_against_reference("sigmoid_loss", x, "torch", pos_offset=pos_offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("all_pairs", [True, False], ids=["all_pairs", "aligned"])
@pytest.mark.parametrize("form", [1, 2])
def test_mix(force, form, all_pairs, dtype):
    force(form=form, chunk="3,2")
    x = make_llip_inputs(5, 7 if all_pairs else 5, 2, 5, 6, kind="peaked", dtype=dtype)

    def run(inp, backend):
        z = lk.llip_mix(inp.k, inp.v, inp.q, inp.w_out, tau=inp.tau, all_pairs=all_pairs, backend=backend)
        cot = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(z.dtype)
        return [z.detach(), *torch.autograd.grad(z, [inp.k, inp.v, inp.q, inp.w_out], cot)]

    ours, ref64, same = run(x, "torch"), run(x.to(torch.float64), "reference"), run(x.to(dtype), "reference")
    assert ours[0].dtype == dtype
    for name, o, r, s in zip(["z", "dk", "dv", "dq", "dw_out"], ours, ref64, same):
        check_rule(f"torch mix {name}", o, r, s, dtype)


def test_forward_without_grad_matches(force):
    force(chunk="4,3")
    x = make_llip_inputs(6, 8, 2, 5, 6, requires_grad=False)
    with torch.no_grad():
        ours = lk.llip_logits(x.k, x.v, x.q, x.y, x.w_out, tau=x.tau, logit_scale=x.t, logit_bias=x.b, backend="torch")
    ref64 = run_op("logits", x.to(torch.float64, requires_grad=False), "reference", with_grad=False).out
    same = run_op("logits", x, "reference", with_grad=False).out
    assert ours.dtype == torch.float32 and not ours.requires_grad
    check_rule("torch logits without grad", ours, ref64, same, torch.float32)


# ---- memory: nothing of Bi*Bt*K or Bi*Bt*D elements, and nothing of Bi*Bt for the losses --------------------

# 48 x 48 pairs, H = 1, K = 4, d = 8: Bi*Bt = 2304 is above every input (k: 1536 elements) and below Bi*Bt*K = 9216
# and Bi*Bt*D = 18432, and a 0.05 MB budget gives chunks of some tens of pairs, so the sizes are told apart.
ALLOC = dict(Bi=48, Bt=48, H=1, K=4, d=8)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("form", [1, 2, 3])
def test_memory_is_bounded_by_chunks(force, form, op):
    force(form=form, budget_mb=0.05)
    Bi, Bt, H, K, d = ALLOC.values()
    bi, bt = torch_backend.plan_chunks(op, form, Bi, Bt, H, K, d)
    assert bi < Bi and bt < Bt, "the budget must force several chunks on both axes for this test to mean anything"
    x = make_llip_inputs(Bi, Bt, H, K, d)
    with record_allocations() as rec:
        out = _call(op, x, "torch")
        out.backward(torch.ones_like(out))
    limit = Bi * Bt if op == "logits" else Bi * Bt - 1  # the logits op returns (and gets a gradient of) Bi*Bt
    too_big = [a for a in rec.at_least(limit + 1)]
    assert not too_big, f"allocations above {limit} elements: {too_big[:3]}"


def test_allocation_recorder_sees_the_reference_blowup():
    """The same recorder does catch Bi*Bt*K tensors when they exist (so the test above can fail)."""
    Bi, Bt, H, K, d = ALLOC.values()
    x = make_llip_inputs(Bi, Bt, H, K, d)
    with record_allocations() as rec:
        _call("sigmoid_loss", x, "reference").backward()
    assert rec.at_least(Bi * Bt * K)


def test_default_plan_respects_the_budget_at_scale(force):
    force()
    for H, K, d in [(8, 32, 64), (8, 64, 64), (8, 64, 160), (8, 512, 64)]:
        for form in (1, 2, 3):
            Bi, Bt = 256, 32768  # one GPU's images against the gathered global batch
            bi, bt = torch_backend.plan_chunks("sigmoid_loss", form, Bi, Bt, H, K, d)
            budget = settings.DEFAULT_TORCH_BUDGET_MB * 2**20 / 4
            pair_ok = bi * bt * torch_backend._pair_floats(form, "sigmoid_loss", H, K, d) <= budget
            image_ok = bi == 1 or bi * torch_backend._image_floats(form, H, K, d) <= budget / 2
            assert pair_ok and image_ok, (H, K, d, form, bi, bt)
            assert bt < Bt  # memory does not grow with Bi * Bt


@pytest.mark.parametrize(
    "env,value,words",
    [
        (settings.TORCH_CHUNK, "3", ["bi,bt"]),
        (settings.TORCH_CHUNK, "0,4", ["positive"]),
        (settings.TORCH_FORM, "4", ["1, 2 or 3"]),
        (settings.TORCH_BUDGET_MB, "lots", ["megabytes"]),
    ],
)
def test_bad_tuning_variables_raise_clear_errors(monkeypatch, env, value, words):
    monkeypatch.setenv(env, value)
    x = make_llip_inputs(3, 4, 1, 2, 4)
    with pytest.raises(ValueError) as info:
        _call("logits", x, "torch")
    assert env in str(info.value) and all(w in str(info.value) for w in words)


# ---- form choice and FLOP count -----------------------------------------------------------------------------


def test_form_choice_follows_the_flop_model(force):
    force()
    # Per pair (docs/design.md section 4): form 3 for B/16, L/14, G/14; form 2 for B/32; form 1 for K = 512.
    per_pair = [torch_backend.choose_form("logits", *c) for c in [(8, 32, 64), (8, 64, 96), (8, 64, 160), (8, 64, 64)]]
    assert per_pair == [3, 3, 3, 2]
    assert torch_backend.choose_form("logits", 8, 512, 64) == 1
    assert torch_backend.choose_form("mix", 8, 32, 64) == 2  # mix needs z: never form 3
    # With batch sizes, the per-image Gram matrices count: 128 texts do not amortise them at B/16, 32k do.
    assert torch_backend.choose_form("logits", 8, 32, 64, 128, 128) != 3
    assert torch_backend.choose_form("logits", 8, 32, 64, 256, 32768) == 3
    for Bi, Bt in [(128, 128), (256, 32768)]:
        form = torch_backend.choose_form("sigmoid_loss", 8, 32, 64, Bi, Bt)
        fwd = torch_backend.flops("sigmoid_loss", Bi, Bt, 8, 32, 64, False)
        assert fwd == call_flops(form, Bi, Bt, 8, 32, 64) == min(call_flops(f, Bi, Bt, 8, 32, 64) for f in (1, 2, 3))
        assert fwd >= Bi * Bt * pair_flops(form, 8, 32, 64)
        bwd = torch_backend.flops("sigmoid_loss", Bi, Bt, 8, 32, 64, True)
        if form == 3:  # hand-written gradients: the recomputed forward plus 8KD + 2(HK)^2 per pair
            pairs = Bi * Bt * pair_flops(3, 8, 32, 64)
            assert bwd == pairs + Bi * Bt * pair_grad_flops(8, 32, 64) + 3 * (fwd - pairs)
        else:  # recompute, then two matmuls per forward matmul
            assert bwd == 3 * fwd


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("form", [1, 2, 3])
def test_cuda(force, form):
    force(form=form, chunk="3,4")
    for op in OPS:
        x = make_llip_inputs(7, 7 if op == "softmax_loss" else 11, 2, 5, 48, kind="peaked", device="cuda")
        check_op_against_reference(op, x, "torch")


def _call(op, x, backend):
    if op == "logits":
        return lk.llip_logits(x.k, x.v, x.q, x.y, x.w_out, tau=x.tau, logit_scale=x.t, logit_bias=x.b, backend=backend)
    if op == "sigmoid_loss":
        return lk.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend=backend)
    return lk.llip_softmax_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, tau=x.tau, backend=backend)


@pytest.mark.parametrize("op", ["logits", "sigmoid_loss", "softmax_loss", "mix"])
def test_opcheck(force, op):
    """The chunked passes are torch.library custom ops: schema, fake twin, autograd registration, and their use
    under AOT dispatch with dynamic shapes (``torch.library.opcheck``)."""
    force(chunk="2,3")
    x = make_llip_inputs(5, 5 if op == "softmax_loss" else 7, 2, 3, 8, seed=3)
    k, v, q, y, w, t, b = (a.detach().clone().requires_grad_() for a in x.tensors().values())
    if op == "mix":
        y = t = b = None
    pos_offset = 1 if op == "sigmoid_loss" else None
    torch.library.opcheck(torch.ops.llip_kernels.torch_pairs, (k, v, q, y, w, t, b, op, 2.0, pos_offset))

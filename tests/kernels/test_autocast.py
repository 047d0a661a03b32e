"""Every public op under ``torch.autocast`` on every backend that runs here.

The policy (docs/design.md section 3): the Llip ops are matmul-class ops, so inside an autocast region their floating
tensor inputs are cast to the autocast dtype (float64 excepted) and the backend runs with autocast off, following its
own precision policy. So an op under autocast must give exactly what it gives, outside autocast, for inputs cast to
the autocast dtype by hand, and the gradients reach float32 leaves as float32.

As PyTorch advises, the backward pass runs after the autocast region. A backward pass run inside it also works, but
the plain torch ops around the kernels (the casts, ``U = y W_out``) then follow autocast in their backward formulas
as every built-in op does, so it is checked by the numerics rule rather than for identity.
"""

from __future__ import annotations

import os

import pytest
import torch

from llip_kernels import functional
from llip_kernels.testing import INPUT_NAMES, OpResult, backpropagate, call_op, check_rule, make_llip_inputs, run_op

BACKENDS = ["reference", "torch", "cpu", None]  # None: automatic dispatch
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    BACKENDS.append("triton")
OPS = ["logits", "sigmoid_loss", "softmax_loss"]


def _skip_unless_runs(backend):
    if backend in (None, "reference"):
        return
    from llip_kernels import dispatch

    reasons = dispatch.load_backend(backend).environment_reasons()
    if reasons:
        pytest.skip("; ".join(reasons))


def _assert_identical(name, a, b):
    assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} under autocast, {b.dtype} with the inputs cast by hand"
    assert torch.equal(a, b), f"{name}: max difference {(a.double() - b.double()).abs().max().item():.3e}"


def _forward_under_autocast(op, x, backend, *, backward_inside: bool = False) -> OpResult:
    """Like ``run_op`` (same cotangent), with the forward pass in a cpu bf16 autocast region."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call_op(op, x, backend)
        if backward_inside:
            return backpropagate(op, out, x)
    return backpropagate(op, out, x)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b or "auto")
def test_op_under_cpu_bfloat16_autocast_is_the_op_on_bfloat16_inputs(op, backend):
    _skip_unless_runs(backend)
    x = make_llip_inputs(5, 5 if op == "softmax_loss" else 7, 2, 3, 8, seed=3)  # float32 leaves
    under = _forward_under_autocast(op, x, backend)
    by_hand = run_op(op, x.to(torch.bfloat16), backend)  # k, v, q, y, w_out in bf16; t, b stay float32
    _assert_identical(f"{op} output", under.out, by_hand.out)
    for name, grad in under.grads.items():
        assert grad.dtype == torch.float32, f"d{name} reached a float32 leaf as {grad.dtype}"
        _assert_identical(f"{op} d{name}", grad, by_hand.grads[name].float())
    assert set(under.grads) <= set(INPUT_NAMES)


def test_automatic_dispatch_under_autocast_at_the_reported_shape():
    """B = 128, K = 8, H = 4, D = 128, where automatic dispatch picks the cpu kernel: it used to raise
    'u must be float32, got BFloat16' because the input preparation's matmuls were autocast."""
    x = make_llip_inputs(128, 128, 4, 8, 32, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = functional.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(t.grad).all() for t in x.tensors().values())


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b or "auto")
def test_backward_inside_the_autocast_region(op, backend):
    _skip_unless_runs(backend)
    x = make_llip_inputs(5, 5 if op == "softmax_loss" else 7, 2, 3, 8, seed=4)
    inside = _forward_under_autocast(op, x, backend, backward_inside=True)
    by_hand = run_op(op, x.to(torch.bfloat16), "torch")
    ref64 = run_op(op, x.to(torch.float64), "reference")
    for name, grad in inside.grads.items():
        assert grad.dtype == torch.float32, f"d{name} reached a float32 leaf as {grad.dtype}"
        check_rule(f"{op} d{name}", grad, ref64.grads[name], by_hand.grads[name], torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", "torch", None], ids=lambda b: b or "auto")
@pytest.mark.parametrize("all_pairs", [False, True])
def test_mix_under_autocast(backend, all_pairs):
    _skip_unless_runs(backend)
    x = make_llip_inputs(4, 4, 2, 3, 8, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = functional.llip_mix(x.k, x.v, x.q, x.w_out, tau=x.tau, all_pairs=all_pairs, backend=backend)
    xb = x.to(torch.bfloat16)
    by_hand = functional.llip_mix(xb.k, xb.v, xb.q, xb.w_out, tau=x.tau, all_pairs=all_pairs, backend=backend)
    _assert_identical("mix", under, by_hand)


def test_float64_inputs_are_left_alone_under_autocast():
    x = make_llip_inputs(3, 4, 2, 2, 4, dtype=torch.float64, seed=1)
    under = _forward_under_autocast("sigmoid_loss", x, "torch")
    outside = run_op("sigmoid_loss", x, "torch")
    _assert_identical("float64 output", under.out, outside.out)

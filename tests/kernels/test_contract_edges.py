"""The edges of the op contract (docs/design.md section 3), the same on every backend that runs here: the valid
``logit_scale`` range, ``pos_offset`` beyond int64, ``$LLIP_CPU_THREADS``, float64 on the cpu kernel, and the
loss modules taking an llip model's output as is."""

from __future__ import annotations

import os

import pytest
import torch

import llip
import llip_kernels as lk
from llip_kernels import dispatch
from llip_kernels.nn import LlipSigmoidLoss, LlipSoftmaxLoss
from llip_kernels.testing import check_op_against_reference, make_llip_inputs

FUSED = ["torch", "cpu"]
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    FUSED.append("triton")
OPS = ("logits", "sigmoid_loss", "softmax_loss")


def _skip_unless_runs(backend):
    reasons = dispatch.load_backend(backend).environment_reasons()
    if reasons:
        pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("logit_scale", [1.0, 100.0, 1000.0])
def test_logit_scale_up_to_1e3(op, backend, logit_scale):
    """The documented range: t in (0, 1e3] (the model clamps t at 100). Beyond it the softmax loss's gradients
    turn on float32 differences of logits of size t, and the fused backends exceed the rule's bound."""
    _skip_unless_runs(backend)
    for seed in (0, 1):
        x = make_llip_inputs(6, 6 if op == "softmax_loss" else 9, 2, 3, 8, seed=seed)
        x.t = torch.tensor(logit_scale, requires_grad=True)
        x.b = torch.tensor(-logit_scale / 10, requires_grad=True)
        check_op_against_reference(op, x, backend)


BAD_OFFSETS = [2**63, -(2**63) - 1, 10**30]


@pytest.mark.parametrize("pos_offset", BAD_OFFSETS, ids=["2^63", "-2^63-1", "1e30"])
@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_pos_offset_beyond_int64_is_one_clear_error(backend, pos_offset):
    x = make_llip_inputs(3, 4, 2, 2, 4)
    with pytest.raises(ValueError, match=r"^pos_offset must fit in int64"):
        lk.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, pos_offset=pos_offset, backend=backend)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_pos_offset_at_the_int64_limits_means_no_positives(backend):
    if backend != "reference":
        _skip_unless_runs(backend)
    x = make_llip_inputs(3, 4, 2, 2, 4)
    args = (x.k, x.v, x.q, x.y, x.w_out, x.t, x.b)
    none = lk.llip_sigmoid_loss(*args, tau=x.tau, pos_offset=None, backend=backend)
    for offset in (2**63 - 1, -(2**63)):
        got = lk.llip_sigmoid_loss(*args, tau=x.tau, pos_offset=offset, backend=backend)
        torch.testing.assert_close(got, none, rtol=0, atol=0)


@pytest.mark.parametrize("value", ["0", "-2", "x", "1.5"])
def test_bad_llip_cpu_threads_is_refused(monkeypatch, value):
    from llip_kernels import settings

    monkeypatch.setenv("LLIP_CPU_THREADS", value)
    with pytest.raises(ValueError, match=r"^\$LLIP_CPU_THREADS must be a positive integer"):
        settings.cpu_threads()


def test_cpu_refuses_float64_with_a_reason_and_dispatch_moves_on():
    _skip_unless_runs("cpu")
    x = make_llip_inputs(3, 4, 2, 2, 4, dtype=torch.float64)
    args = (x.k, x.v, x.q, x.y, x.w_out, x.t, x.b)
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run .* float64"):
        lk.llip_sigmoid_loss(*args, tau=x.tau, backend="cpu")
    reasons = lk.backend_reasons(*args[:5], op="sigmoid_loss", tau=x.tau)
    assert any("float32" in r for r in reasons["cpu"]), reasons
    auto = lk.llip_sigmoid_loss(*args, tau=x.tau)  # automatic dispatch picks a backend that keeps float64
    assert auto.dtype == torch.float64


@pytest.mark.parametrize("loss_class", [LlipSigmoidLoss, LlipSoftmaxLoss])
def test_loss_modules_take_the_model_output(loss_class):
    model = llip.create_model("llip-tiny")
    torch.manual_seed(0)
    images = torch.randn(4, 3, model.image_size, model.image_size)
    tokens = torch.randint(1, 100, (4, model.context_length))
    out = model(images, tokens)
    loss = loss_class(model.tau)(**out)
    loss.backward()
    assert torch.isfinite(loss) and model.w_out.grad is not None

"""The test helpers must be able to fail: a backend with a subtly wrong gradient is caught by the rule of
docs/design.md section 6."""

import types

import pytest
import torch

from llip_kernels import dispatch, reference
from llip_kernels.testing import check_op_against_reference, make_llip_inputs, record_allocations


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by (1 + eps): a "hidden wrong backward pass"."""

    @staticmethod
    def forward(ctx, x, eps):
        ctx.eps = eps
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * (1 + ctx.eps), None


def _install(monkeypatch, name, eps_grad=0.0, eps_out=0.0):
    mod = types.ModuleType(name)
    mod.not_supported_reasons = lambda problem: []

    def sigmoid_loss(k, v, q, y, w_out, t, b, *, tau, pos_offset):
        out = reference.sigmoid_loss(
            _ScaleGrad.apply(k, eps_grad), v, q, y, w_out, t, b, tau=tau, pos_offset=pos_offset
        )
        return out * (1 + eps_out)

    mod.sigmoid_loss = sigmoid_loss
    monkeypatch.setitem(dispatch.BACKEND_MODULES, name, name)
    monkeypatch.setitem(dispatch._loaded, name, mod)


# The relative error each dtype's rule must catch: 1e-3 in float32; bfloat16's own error is ~1e-2, so 30%.
@pytest.mark.parametrize("dtype,eps", [(torch.float32, 1e-3), (torch.bfloat16, 0.3)])
def test_rule_passes_a_correct_backend_and_catches_wrong_ones(monkeypatch, dtype, eps):
    x = make_llip_inputs(5, 6, 2, 5, 8, dtype=dtype)
    _install(monkeypatch, "exact")
    check_op_against_reference("sigmoid_loss", x, "exact")
    _install(monkeypatch, "bad_grad", eps_grad=eps)
    with pytest.raises(AssertionError, match="dk"):
        check_op_against_reference("sigmoid_loss", x, "bad_grad")
    _install(monkeypatch, "bad_out", eps_out=eps)
    with pytest.raises(AssertionError, match="output"):
        check_op_against_reference("sigmoid_loss", x, "bad_out")


def test_allocation_recorder_sees_big_tensors():
    x = make_llip_inputs(6, 7, 2, 5, 4)
    with record_allocations() as rec:
        reference.logits(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=1.0).sum().backward()
    assert rec.largest().numel >= 6 * 7 * 8  # the reference materialises [Bi, Bt, D]
    assert rec.at_least(6 * 7 * 2 * 5)  # and [Bi, Bt, H, K]

"""The cuda backend on a machine without a GPU: it imports, says why it cannot run, and its custom ops have working
fake (meta) implementations and autograd, so torch.compile can trace them. The kernels' numerics are covered by
tests/kernels/test_cuda_emulated.py here and by bench/cuda_check.py on a GPU."""

from __future__ import annotations

import pytest
import torch

from llip_kernels import functional
from llip_kernels._validate import LlipProblem
from llip_kernels.backends import cuda as cuda_backend
from llip_kernels.testing import make_llip_inputs

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given without a GPU")


def _problem(op="sigmoid_loss", dtype=torch.bfloat16, device="cuda", H=8, K=32, d=64, requires_grad=True, Bi=7):
    return LlipProblem(op, Bi, 9, H, K, d, dtype, torch.device(device), 5.0, requires_grad)


@needs_no_gpu
def test_environment_reasons_without_gpu():
    reasons = cuda_backend.environment_reasons()
    assert reasons, "a machine without a GPU must not look able to run the cuda backend"
    assert any("CPU-only" in r or "no CUDA device" in r for r in reasons), reasons
    assert functional.backend_reasons()["cuda"] == reasons


def test_reasons_name_the_unsupported_parts():
    assert any("CUDA tensors" in r for r in cuda_backend.not_supported_reasons(_problem(device="cpu")))
    assert any("float32" in r for r in cuda_backend.not_supported_reasons(_problem(dtype=torch.float32)))
    assert any("softmax_loss" in r for r in cuda_backend.not_supported_reasons(_problem("softmax_loss")))
    assert any("no backward" in r for r in cuda_backend.not_supported_reasons(_problem("logits")))
    # H*K = 4096 (the K=512 ablation at 8 heads): the Gram tile of a block no longer fits shared memory.
    assert any("shared memory" in r for r in cuda_backend.not_supported_reasons(_problem(K=512)))
    assert any("65535" in r for r in cuda_backend.not_supported_reasons(_problem(Bi=70000)))


def test_explicit_request_on_cpu_raises_with_reasons():
    x = make_llip_inputs(3, 4, 2, 5, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        functional.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend="cuda")


def test_tile_width_choice():
    # B/16 head: 64 texts per tile forward and backward; G/14 head backward drops to 32 to fit 227 KiB.
    assert cuda_backend.pick_bt(8, 32, 64, False) == 64
    assert cuda_backend.pick_bt(8, 32, 64, True) == 64
    assert cuda_backend.pick_bt(8, 64, 160, True) == 32
    assert cuda_backend.pick_bt(8, 512, 64, False) == 0


def test_flops_use_form_3():
    """Pairs in form 3 (4KD + 2(HK)^2 each) plus the precomputations: V' and G per image, U per text."""
    fwd = cuda_backend.flops("sigmoid_loss", 2, 3, 8, 32, 64, False)
    pairs = 6 * (4 * 32 * 512 + 2 * 256**2)
    assert fwd == pairs + 2 * (2 * 32 * 512**2 + 2 * 256**2 * 512) + 3 * 2 * 512**2
    assert cuda_backend.flops("sigmoid_loss", 2, 3, 8, 32, 64, True) > 2 * fwd


def _meta_inputs(Bi=5, Bt=7, H=2, K=5, d=24, dtype=torch.bfloat16):
    x = make_llip_inputs(Bi, Bt, H, K, d, dtype=dtype, requires_grad=False)
    return {n: t.to("meta").requires_grad_(True) for n, t in x.tensors().items()}, x.tau


def test_fake_loss_and_backward_on_meta_tensors():
    x, tau = _meta_inputs()
    loss = cuda_backend.sigmoid_loss(x["k"], x["v"], x["q"], x["y"], x["w_out"], x["t"], x["b"], tau=tau, pos_offset=0)
    assert loss.shape == () and loss.dtype == torch.float32 and loss.device.type == "meta"
    loss.backward()
    for name, t in x.items():
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype, name


def test_fake_logits_on_meta_tensors():
    x, tau = _meta_inputs()
    with torch.no_grad():
        out = cuda_backend.logits(x["k"], x["v"], x["q"], x["y"], x["w_out"], x["t"], x["b"], tau=tau)
    assert out.shape == (5, 7) and out.dtype == torch.float32


def test_opcheck_on_meta_tensors():
    """torch.library.opcheck's schema, fake-tensor and autograd-registration checks (the real implementation needs a
    GPU; on meta tensors the fake one stands in for it)."""
    x, tau = _meta_inputs()
    u, g = cuda_backend.text_and_gram(x["v"].detach(), x["y"].detach(), x["w_out"].detach())
    args = (x["k"], x["v"], x["q"], u.requires_grad_(), g.requires_grad_(), x["t"], x["b"], tau, 1, True, False)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.llip_kernels.cuda_sigmoid_loss.default, args, test_utils=tests)
    grad = torch.ones((), device="meta")
    torch.library.opcheck(
        torch.ops.llip_kernels.cuda_sigmoid_loss_backward.default,
        (grad, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args]),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_compile_traces_without_graph_break():
    """torch.compile(fullgraph=True) traces the backend's loss (forward and backward) into one graph."""
    x, tau = _meta_inputs()

    def f(k, v, q, y, w, t, b):
        return cuda_backend.sigmoid_loss(k, v, q, y, w, t, b, tau=tau, pos_offset=0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*x.values())
    loss.backward()
    assert loss.shape == () and x["w_out"].grad.shape == x["w_out"].shape

"""The public API's contract: clear errors for bad input, backend selection, empty batches, module wrappers."""

import pytest
import torch

import llip_kernels as lk
from llip_kernels import dispatch
from llip_kernels.nn import LlipSigmoidLoss, LlipSoftmaxLoss, SigmoidLoss, SoftmaxLoss
from llip_kernels.testing import make_llip_inputs


def _inputs(Bi=3, Bt=4, H=2, K=5, d=4, **kw):
    x = make_llip_inputs(Bi, Bt, H, K, d, **kw)
    return dict(k=x.k, v=x.v, q=x.q, y=x.y, w_out=x.w_out), x


def _call(op, args, tau=5.0, **kw):
    if op == "logits":
        return lk.llip_logits(**args, tau=tau, backend="reference", **kw)
    if op == "sigmoid_loss":
        return lk.llip_sigmoid_loss(**args, logit_scale=10.0, logit_bias=-10.0, tau=tau, backend="reference", **kw)
    return lk.llip_softmax_loss(**args, logit_scale=10.0, tau=tau, backend="reference", **kw)


# Each case: (what to change, the exception type, words the message must contain so a user can act on it)
BAD_INPUTS = [
    (lambda a: a.update(k=a["k"][0]), ValueError, ["k", "4 dimensions", "[Bi, H, K, d]"]),
    (lambda a: a.update(v=a["v"][:, :, :2]), ValueError, ["v", "shape of k"]),
    (lambda a: a.update(q=torch.randn(4, 3, 4)), ValueError, ["q", "H=2"]),
    (lambda a: a.update(q=torch.randn(4, 2, 5)), ValueError, ["q", "d=4"]),
    (lambda a: a.update(y=torch.randn(4, 9)), ValueError, ["y", "[4, 8]"]),
    (lambda a: a.update(y=torch.randn(5, 8)), ValueError, ["y", "Bt"]),
    (lambda a: a.update(w_out=torch.randn(8, 7)), ValueError, ["w_out", "[8, 8]", "D = H * d"]),
    (lambda a: a.update(w_out=torch.randn(6, 6)), ValueError, ["w_out", "[8, 8]"]),
    (lambda a: a.update(k=a["k"].long()), TypeError, ["k", "floating-point", "int64"]),
    (lambda a: a.update(q=a["q"].to(torch.int32)), TypeError, ["q", "floating-point"]),
    (lambda a: a.update(y=a["y"].double()), TypeError, ["y", "float64", "float32", "share one dtype"]),
    (lambda a: a.update(w_out=a["w_out"].to("meta")), ValueError, ["w_out", "meta", "device"]),
    (lambda a: a.update(k=a["k"].numpy()), TypeError, ["k", "torch.Tensor", "ndarray"]),
]


@pytest.mark.parametrize("change,exc,words", BAD_INPUTS)
@pytest.mark.parametrize("op", ["logits", "sigmoid_loss"])
def test_bad_inputs_raise_clear_errors(op, change, exc, words):
    args, _ = _inputs()
    args = {n: t.detach() for n, t in args.items()}
    change(args)
    with pytest.raises(exc) as info:
        _call(op, args)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize(
    "tau,exc,word",
    [
        (0.0, ValueError, "> 0"),
        (-1.0, ValueError, "> 0"),
        (float("nan"), ValueError, "finite"),
        (float("inf"), ValueError, "finite"),
        ("5", TypeError, "str"),
        (True, TypeError, "bool"),
        (None, TypeError, "tau"),
    ],
)
def test_bad_tau(tau, exc, word):
    args, _ = _inputs()
    with pytest.raises(exc, match="tau") as info:
        _call("logits", args, tau=tau)
    assert word in str(info.value)


@pytest.mark.parametrize("pos_offset", [1.0, "0", True, [0]])
def test_bad_pos_offset(pos_offset):
    args, _ = _inputs()
    with pytest.raises(TypeError, match="pos_offset must be an int or None"):
        _call("sigmoid_loss", args, pos_offset=pos_offset)


def test_softmax_loss_needs_square_batch():
    args, _ = _inputs(Bi=3, Bt=4)
    with pytest.raises(ValueError, match="Bi=3, Bt=4"):
        _call("softmax_loss", args)
    img, txt = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="Bi=3, Bt=4"):
        lk.softmax_loss(img, txt, 10.0)


def test_bad_scalars():
    args, _ = _inputs()
    with pytest.raises(ValueError, match="logit_scale must be a 0-dim tensor"):
        lk.llip_logits(**args, tau=1.0, logit_scale=torch.ones(2))
    with pytest.raises(TypeError, match="logit_bias must be a number or a 0-dim tensor"):
        lk.llip_logits(**args, tau=1.0, logit_bias="x")
    with pytest.raises(TypeError, match="logit_bias is required"):
        lk.llip_sigmoid_loss(**args, logit_scale=1.0, logit_bias=None, tau=1.0)
    with pytest.raises(ValueError, match="logit_scale is on meta"):
        lk.llip_logits(**args, tau=1.0, logit_scale=torch.tensor(1.0, device="meta"))


def test_pooled_bad_inputs():
    with pytest.raises(ValueError, match="share the embedding dim"):
        lk.sigmoid_loss(torch.randn(3, 4), torch.randn(3, 5), 1.0, 0.0)
    with pytest.raises(ValueError, match="img must have 2 dimensions"):
        lk.sigmoid_loss(torch.randn(3), torch.randn(3, 5), 1.0, 0.0)
    with pytest.raises(TypeError, match="txt must be a floating-point"):
        lk.softmax_loss(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.long), 1.0)


def test_llip_mix_errors_and_shapes():
    args, x = _inputs(Bi=3, Bt=4)
    with pytest.raises(ValueError, match="needs Bi == Bt"):
        lk.llip_mix(x.k, x.v, x.q, x.w_out, tau=1.0)
    with pytest.raises(TypeError, match="all_pairs must be a bool"):
        lk.llip_mix(x.k, x.v, x.q, x.w_out, tau=1.0, all_pairs=1)
    z = lk.llip_mix(x.k, x.v, x.q, x.w_out, tau=1.0, all_pairs=True)
    assert z.shape == (3, 4, 8) and z.dtype == x.k.dtype


def test_unknown_backend_lists_choices(monkeypatch):
    args, _ = _inputs()
    with pytest.raises(ValueError, match="unknown backend backend='nope'.*reference"):
        lk.llip_logits(**args, tau=1.0, backend="nope")
    monkeypatch.setenv(dispatch.ENV_BACKEND, "nope2")
    with pytest.raises(ValueError, match=r"\$LLIP_KERNELS_BACKEND='nope2'"):
        lk.llip_logits(**args, tau=1.0)


def test_explicit_backend_that_cannot_run_raises_with_reasons(monkeypatch):
    args, _ = _inputs()
    monkeypatch.setattr(dispatch, "reasons_for", lambda name, p: [] if name == "reference" else [f"{name} says no"])
    with pytest.raises(RuntimeError, match="backend 'torch' cannot run llip logits.*torch says no"):
        lk.llip_logits(**args, tau=1.0, backend="torch")
    # automatic choice skips backends with reasons and lands on the reference
    assert lk.llip_logits(**args, tau=1.0).shape == (3, 4)
    monkeypatch.setattr(dispatch, "reasons_for", lambda name, p: [f"{name} says no"])
    with pytest.raises(RuntimeError, match="no backend can run.*cpu: cpu says no.*reference: reference says no"):
        lk.llip_logits(**args, tau=1.0)


def test_environment_variable_selects_backend(monkeypatch):
    args, _ = _inputs()
    chosen = []
    real = dispatch.select_backend

    def spy(problem, backend):
        mod = real(problem, backend)
        chosen.append(mod.__name__)
        return mod

    monkeypatch.setattr(dispatch, "select_backend", spy)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "reference")
    lk.llip_logits(**args, tau=1.0)
    assert chosen == ["llip_kernels.reference"]
    # the argument wins over the environment
    monkeypatch.setenv(dispatch.ENV_BACKEND, "nope")
    lk.llip_logits(**args, tau=1.0, backend="reference")
    assert chosen[-1] == "llip_kernels.reference"


def test_backends_reports_every_backend():
    report = lk.backend_reasons()
    assert set(report) == set(dispatch.BACKEND_MODULES)
    assert report["reference"] == []
    args, _ = _inputs()
    per_call = lk.backend_reasons(**args, tau=2.0, op="logits")
    assert set(per_call) == set(dispatch.BACKEND_MODULES) and per_call["reference"] == []
    for name, reasons in per_call.items():
        assert isinstance(reasons, list) and all(isinstance(r, str) and r for r in reasons), name
    with pytest.raises(ValueError, match="op must be one of"):
        lk.backend_reasons(op="nope")


def test_deterministic_switches(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_DETERMINISTIC, raising=False)
    assert lk.deterministic_requested() is torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv(dispatch.ENV_DETERMINISTIC, "1")
    assert lk.deterministic_requested() is True


@pytest.mark.parametrize("Bi,Bt", [(0, 4), (3, 0), (0, 0)])
def test_empty_batches(Bi, Bt):
    """Defined behaviour: logits are empty tensors of the right shape; losses are 0 with zero gradients."""
    args, x = _inputs(Bi=Bi, Bt=Bt)
    lg = lk.llip_logits(**args, tau=1.0)
    assert lg.shape == (Bi, Bt) and lg.dtype == torch.float32
    loss = lk.llip_sigmoid_loss(**args, logit_scale=x.t, logit_bias=x.b, tau=1.0)
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert x.k.grad is not None and x.k.grad.abs().sum() == 0 and x.t.grad == 0
    if Bi == Bt:
        assert lk.llip_softmax_loss(**args, logit_scale=x.t, tau=1.0).item() == 0.0
        assert lk.llip_mix(x.k, x.v, x.q, x.w_out, tau=1.0).shape == (0, 8)


def test_modules_match_functions():
    args, x = _inputs(Bi=4, Bt=4)
    a = LlipSigmoidLoss(tau=5.0, backend="reference")(*args.values(), x.t, x.b, pos_offset=1)
    b = lk.llip_sigmoid_loss(*args.values(), x.t, x.b, tau=5.0, pos_offset=1)
    assert torch.allclose(a, b)
    c = LlipSoftmaxLoss(tau=5.0)(*args.values(), x.t)
    assert torch.allclose(c, lk.llip_softmax_loss(*args.values(), x.t, tau=5.0))
    img, txt = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(SigmoidLoss()(img, txt, 10.0, -10.0), lk.sigmoid_loss(img, txt, 10.0, -10.0))
    assert torch.allclose(SoftmaxLoss()(img, txt, 10.0), lk.softmax_loss(img, txt, 10.0))
    with pytest.raises(ValueError, match="tau"):
        LlipSigmoidLoss(tau=0.0)
    assert "tau=5.0" in repr(LlipSigmoidLoss(tau=5.0))


def test_import_touches_no_device_and_needs_no_triton():
    import subprocess
    import sys

    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name == 'triton' or name.startswith('triton.'):\n"
        "        raise ImportError('triton hidden for this test')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import llip_kernels, torch\n"
        "x = torch.randn(2, 1, 3, 4)\n"
        "print(float(llip_kernels.llip_logits(x, x, torch.randn(2, 1, 4), torch.randn(2, 4), torch.eye(4), tau=1.0)"
        ".sum()))\n"
        "print(sorted(llip_kernels.backend_reasons()))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "reference" in out.stdout

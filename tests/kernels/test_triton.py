"""Backend "triton" against the fp64 reference (the rule of docs/design.md section 6), under TRITON_INTERPRET=1 on
the CPU.

Shapes are tiny because the interpreter runs every tile op in numpy (~ms each); the tile caps are lowered
in the multi-tile tests so that K, the text batch and the Gram matrix span several tiles with few elements.
Ids read ``op-kind-dtype`` / ``Bi-Bt-H-K-d``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import llip_kernels as lk
from llip_kernels import testing
from llip_kernels._validate import check_llip_inputs
from llip_kernels.algebra import pair_flops
from llip_kernels.testing import KINDS, check_op_against_reference, make_llip_inputs, record_allocations

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("triton backend needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

from llip_kernels.backends import triton as triton_backend  # noqa: E402
from llip_kernels.backends.triton import launch  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
OPS = ("logits", "sigmoid_loss", "softmax_loss")


def _check(op, Bi, Bt, H, K, d, *, kind="gaussian", dtype=torch.float32, pos_offset=0, seed=0, **kw):
    if op == "softmax_loss":
        Bt = Bi  # diagonal positives need a square batch
    x = make_llip_inputs(Bi, Bt, H, K, d, kind=kind, dtype=dtype, seed=seed, device=DEVICE, **kw)
    check_op_against_reference(op, x, "triton", pos_offset=pos_offset)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tile caps of 16 so that K = 17, Bt = 17 and H*K = 34 span two or three tiles each."""
    monkeypatch.setattr(launch, "MAX_BLOCK_T", 16)
    monkeypatch.setattr(launch, "MAX_BLOCK_K", 16)
    monkeypatch.setattr(launch, "MAX_BLOCK_G", 16)


# Every adversarial kind, fp32: Bi != Bt, K = 5 (a masked token tile), H = 2 (the quadratic form couples heads).
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", OPS)
def test_fp32_every_kind(op, kind):
    _check(op, 3, 5, 2, 5, 16, kind=kind)


# Low precision: bf16 on every kind for the sigmoid loss (the training op), the riskiest kinds for the rest.
@pytest.mark.parametrize(
    "op,kind,dtype",
    [("sigmoid_loss", kind, torch.bfloat16) for kind in KINDS]
    + [(op, kind, torch.bfloat16) for op in ("logits", "softmax_loss") for kind in ("peaked", "non_unit")]
    + [(op, kind, torch.float16) for op in OPS for kind in ("gaussian", "non_unit")],
    ids=lambda p: str(p).replace("torch.", ""),
)
def test_low_precision(op, kind, dtype):
    _check(op, 4, 3, 2, 5, 16, kind=kind, dtype=dtype)


# Positives on the diagonal, shifted either way, all out of range, or none at all (a remote text block).
@pytest.mark.parametrize("pos_offset", [2, -3, 9, None])
def test_sigmoid_pos_offset(pos_offset):
    _check("sigmoid_loss", 4, 6, 2, 3, 16, pos_offset=pos_offset, kind="large_scale")


# Edge shapes: single image / text / token / head; d = 48 (three 16-wide chunks); d = 20 (masked chunk).
@pytest.mark.parametrize(
    "op,Bi,Bt,H,K,d",
    [
        ("logits", 1, 1, 1, 1, 16),
        ("sigmoid_loss", 2, 1, 1, 1, 48),
        ("logits", 3, 2, 3, 2, 20),
        ("softmax_loss", 2, 2, 1, 7, 48),
    ],
    ids=lambda p: str(p),
)
def test_edge_shapes(op, Bi, Bt, H, K, d):
    _check(op, Bi, Bt, H, K, d, kind="peaked")


# Multi-tile paths: online softmax over two K tiles, two text blocks, a 3x3 grid of Gram tiles. (The logits at
# this shape run in the split-atomics and deterministic tests below.)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_tile(small_tiles, dtype):
    _check("sigmoid_loss", 2, 17, 2, 17, 20, kind="peaked", dtype=dtype, pos_offset=-2)


def test_multi_tile_split_atomics(small_tiles, monkeypatch):
    """Several programs per image: image-side gradients go through atomics (the default, non-deterministic
    backward; one program per image runs the same kernel flavour)."""
    monkeypatch.setattr(launch, "INTERPRET_WORK", 16)
    _check("logits", 2, 17, 2, 17, 20, kind="near_ties")


@pytest.mark.parametrize("deterministic", ["0", "1"])
def test_softmax_two_text_blocks(small_tiles, monkeypatch, deterministic):
    """Row and column log-sum-exps merged across text blocks and across image splits; the backward either with
    atomics (several programs per image) or ordered (text-stationary second pass)."""
    monkeypatch.setattr(launch, "INTERPRET_WORK", 40)
    monkeypatch.setenv("LLIP_KERNELS_DETERMINISTIC", deterministic)
    _check("softmax_loss", 17, 17, 1, 2, 16, kind="duplicate_rows")


def test_deterministic_mode_matches_reference(small_tiles, monkeypatch):
    """The ordered path (one program per image, text-stationary second pass) over two K tiles and text blocks."""
    monkeypatch.setenv("LLIP_KERNELS_DETERMINISTIC", "1")
    _check("logits", 2, 17, 2, 17, 20, kind="non_unit")


def test_deterministic_mode_is_repeatable(monkeypatch):
    monkeypatch.setenv("LLIP_KERNELS_DETERMINISTIC", "1")
    x = make_llip_inputs(3, 5, 2, 5, 16, device=DEVICE)
    runs = [testing.run_op("sigmoid_loss", x.to(), "triton", pos_offset=1) for _ in range(2)]
    for name in runs[0].grads:
        assert torch.equal(runs[0].grads[name], runs[1].grads[name]), name
    monkeypatch.setenv("LLIP_KERNELS_DETERMINISTIC", "0")
    fast = testing.run_op("sigmoid_loss", x.to(), "triton", pos_offset=1)
    for name in runs[0].grads:  # atomics against ordered sums: the same pairs, added in another order
        testing.check_same_result(f"d{name}", fast.grads[name], runs[0].grads[name], dtype=torch.float32, terms=15)


def _losses_fwd_bwd(op, x):
    if op == "sigmoid_loss":
        out = lk.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend="triton")
    else:
        out = lk.llip_softmax_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, tau=x.tau, backend="triton")
    out.backward()


def _one_program(monkeypatch):
    """A persistent grid of one program: the scratch (grid * BT * H*K floats) is then tiny next to Bi*Bt, as it
    is at real sizes (132 programs on an H200 against millions of pairs)."""
    for name in ("WORK_PER_SM", "GRID_PER_SM"):
        monkeypatch.setattr(launch, name, 0)
    monkeypatch.setattr(launch, "INTERPRET_WORK", 1)
    monkeypatch.setattr(launch, "INTERPRET_GRID", 1)


def _allocated(rec, numel):
    """Allocations of at least ``numel`` elements. Under the interpreter, Triton re-points each argument's storage
    to a host copy (``set_``) and copies results back (``copy_``): in-place ops on existing tensors, sized in
    bytes, that allocate nothing on a GPU; they are left out."""
    interp = DEVICE == "cpu"
    return [a for a in rec.at_least(numel) if not (interp and (".set_." in a.op or ".copy_." in a.op))]


@pytest.mark.parametrize("op", ["sigmoid_loss", "softmax_loss"])
def test_losses_never_allocate_pairs(monkeypatch, op):
    """Fused losses allocate nothing with Bi*Bt elements (so nothing with Bi*Bt*K or Bi*Bt*D either), forward or
    backward. Sizes make every legitimate buffer smaller than Bi*Bt: Bi > D (text-side [Bt, D]) and Bt > K*d
    (image-side [Bi, H, K, d])."""
    _one_program(monkeypatch)
    Bi, Bt, H, K, d = 17, 20 if op == "sigmoid_loss" else 17, 1, 1, 16
    x = make_llip_inputs(Bi, Bt, H, K, d, device=DEVICE)
    with record_allocations() as rec:
        _losses_fwd_bwd(op, x)
    assert len(rec.allocations) > 10, "the recorder saw nothing: it is not active"
    assert not _allocated(rec, Bi * Bt), _allocated(rec, Bi * Bt)[:3]


def test_logits_never_allocate_pair_features(small_tiles, monkeypatch):
    """Logits may return [Bi, Bt] but never allocate Bi*Bt*K or Bi*Bt*D elements."""
    _one_program(monkeypatch)
    Bi, Bt, H, K, d = 3, 20, 1, 16, 16  # Bi*Bt*K = 960: bigger than every legitimate buffer here
    x = make_llip_inputs(Bi, Bt, H, K, d, device=DEVICE)
    with record_allocations() as rec:
        out = lk.llip_logits(x.k, x.v, x.q, x.y, x.w_out, tau=x.tau, logit_scale=x.t, logit_bias=x.b, backend="triton")
        out.backward(torch.ones_like(out))
    assert not _allocated(rec, Bi * Bt * K), _allocated(rec, Bi * Bt * K)[:3]


def test_allocation_check_can_fail():
    """The same check flags the reference backend, which materialises [Bi, Bt, H, K]."""
    x = make_llip_inputs(3, 20, 1, 16, 16, device=DEVICE)
    with record_allocations() as rec:
        lk.llip_logits(x.k, x.v, x.q, x.y, x.w_out, tau=x.tau, backend="reference")
    assert rec.at_least(3 * 20 * 16)


def _problem(op="sigmoid_loss", dtype=torch.float32, H=2, K=3):
    x = make_llip_inputs(2, 3, H, K, 16, dtype=dtype, requires_grad=False)
    return check_llip_inputs(op, x.k, x.v, x.q, x.y, x.w_out, tau=1.0)


def test_reasons(monkeypatch):
    assert triton_backend.not_supported_reasons(_problem()) == [] or DEVICE == "cuda"
    assert any("llip mix" in r for r in triton_backend.not_supported_reasons(_problem("mix")))
    big = _problem(H=2, K=4097)
    assert any("H*K" in r for r in triton_backend.not_supported_reasons(big))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert any(
        "needs a CUDA device or TRITON_INTERPRET=1" in r for r in triton_backend.not_supported_reasons(_problem())
    )
    if not torch.cuda.is_available():
        assert triton_backend.environment_reasons() == ["needs a CUDA device or TRITON_INTERPRET=1"]


def test_import_without_triton():
    """The package imports and explains itself on a machine without Triton."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import llip_kernels, llip_kernels.backends.triton as t\n"
        "print(t.environment_reasons()); print(llip_kernels.backend_reasons()['triton'])"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("triton is not installed") == 2, res.stdout


def test_explicit_request_on_cpu_without_interpreter_is_clear(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = make_llip_inputs(2, 3, 1, 2, 16)
    with pytest.raises(RuntimeError, match="needs a CUDA device or TRITON_INTERPRET=1"):
        lk.llip_logits(x.k, x.v, x.q, x.y, x.w_out, tau=1.0, backend="triton")


def test_flops():
    Bi, Bt, H, K, d = 4, 6, 8, 64, 160
    pair = pair_flops(3, H, K, d)
    fwd = triton_backend.flops("sigmoid_loss", Bi, Bt, H, K, d)
    assert fwd >= Bi * Bt * pair
    assert triton_backend.flops("softmax_loss", Bi, Bt, H, K, d) > fwd  # two statistics passes
    bwd = triton_backend.flops("sigmoid_loss", Bi, Bt, H, K, d, backward=True)  # the backward pass alone
    assert bwd > 2 * Bi * Bt * pair  # recomputed forward + the gradient products
    assert triton_backend.flops("sigmoid_loss", Bi, Bt, H, K, d, True, deterministic=True) > bwd
    with pytest.raises(ValueError, match="op must be"):
        triton_backend.flops("mix", 1, 1, 1, 1, 16)


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    """The kernels are torch.library custom ops: schema, fake twin, autograd registration, and their use under AOT
    dispatch with dynamic shapes (``torch.library.opcheck``), like the cpu and cuda ops."""
    x = make_llip_inputs(3, 3 if op == "softmax_loss" else 5, 2, 3, 16, seed=5, device=DEVICE)
    prec = launch.precision_for(x.k.dtype)
    u, gram = launch.precompute(x.v.detach(), x.y.detach(), x.w_out.detach(), prec.gram_dtype)
    k, v, q = (a.detach().clone().requires_grad_() for a in (x.k, x.v, x.q))
    u, gram, t, b = (a.detach().clone().requires_grad_() for a in (u, gram, x.t, x.b))
    torch.library.opcheck(torch.ops.llip_kernels.triton_pairs, (k, v, q, u, gram, t, b, op, 2.0))

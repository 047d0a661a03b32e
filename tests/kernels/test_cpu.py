"""Backend "cpu" (the fused C++ kernel, llip_kernels/backends/cpu.py + csrc/cpu/) against the fp64 reference.

Every check goes through ``check_op_against_reference`` (docs/design.md section 6: output and every input gradient
within 2x the same-dtype torch error + a floor). The first test to run builds the extension (about 10-60 s).
"""

import os
from pathlib import Path

import pytest
import torch

import llip_kernels as lk
from llip_kernels import _build, dispatch, settings
from llip_kernels._validate import LlipProblem
from llip_kernels.backends import cpu as cpu_backend
from llip_kernels.testing import (
    KINDS,
    check_op_against_reference,
    check_rule,
    check_same_result,
    make_llip_inputs,
    record_allocations,
    run_op,
)

_why = cpu_backend.environment_reasons()
pytestmark = pytest.mark.skipif(bool(_why), reason="cpu backend unavailable: " + "; ".join(_why))

OPS = ("logits", "sigmoid_loss", "softmax_loss")


def _products():
    """The kernel's products to test: float32, and bf16 operands where this CPU runs them."""
    return (False, True) if cpu_backend.bf16_products(torch.bfloat16) else (False,)


@pytest.fixture
def small_tiles(monkeypatch):
    """Force many ragged tiles (3 images x 8 texts) and backward passes of 16 texts so the cross-tile paths run:
    the online log-sum-exps, gradient accumulation across tiles and passes, and the diagonal / positive pairs
    that fall on tile edges."""
    monkeypatch.setattr(cpu_backend, "tile_sizes", lambda Bi, Bt, H, K, bf16=False: (min(Bi, 3), min(Bt, 8)))
    monkeypatch.setattr(cpu_backend, "TEXTS_PER_PASS", 16)  # the backward takes the texts in passes of 2 tiles


def _inputs(op, Bi, Bt, H, K, d, **kw):
    return make_llip_inputs(Bi, Bi if op == "softmax_loss" else Bt, H, K, d, **kw)


# Shapes: Bi != Bt and primes (no tile divides them), d not a power of two, K = 1 (softmax is the identity,
# the gradient through it is zero), K = 64 / 65 (the largest paper K and one past it).
SHAPES = [
    pytest.param((7, 33, 2, 5, 48), id="Bi7-Bt33-H2-K5-d48"),
    pytest.param((5, 3, 3, 1, 48), id="Bi5-Bt3-H3-K1-d48"),
    pytest.param((3, 11, 1, 64, 96), id="Bi3-Bt11-H1-K64-d96"),
    pytest.param((4, 7, 2, 65, 48), id="Bi4-Bt7-H2-K65-d48"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_odd_shapes_fp32(op, shape):
    check_op_against_reference(op, _inputs(op, *shape), "cpu", pos_offset=0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", KINDS)
def test_adversarial_kinds_fp32(op, kind, small_tiles):
    check_op_against_reference(op, _inputs(op, 9, 13, 2, 5, 48, kind=kind, seed=3), "cpu", pos_offset=1)


@pytest.mark.parametrize("pos_offset", [0, 3, -2, None])
def test_sigmoid_pos_offsets(pos_offset, small_tiles):
    # 11 x 17 on 3 x 8 tiles: positives cross tile edges; offset -2 leaves images 0-1 without a positive.
    x = make_llip_inputs(11, 17, 2, 4, 48, kind="large_scale", seed=5)
    check_op_against_reference("sigmoid_loss", x, "cpu", pos_offset=pos_offset)


# bf16 inputs take the bf16 products where the CPU has them (csrc/cpu/bf16_products.cpp; float32 elsewhere): the
# same rule against the reference, on the odd shapes (d = 47 and odd Bt: the padded reductions of the VNNI packs;
# odd K and H*K), every adversarial kind on many ragged tiles and several backward passes, and the positives.
BF16_SHAPES = [*SHAPES, pytest.param((6, 9, 3, 3, 47), id="Bi6-Bt9-H3-K3-d47")]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", BF16_SHAPES)
def test_odd_shapes_bf16(op, shape):
    check_op_against_reference(op, _inputs(op, *shape, dtype=torch.bfloat16), "cpu", pos_offset=0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", KINDS)
def test_adversarial_kinds_bf16(op, kind, small_tiles):
    x = _inputs(op, 9, 13, 2, 5, 47, kind=kind, seed=3, dtype=torch.bfloat16)
    check_op_against_reference(op, x, "cpu", pos_offset=1)


@pytest.mark.parametrize("pos_offset", [0, 3, -2, None])
def test_sigmoid_pos_offsets_bf16(pos_offset, small_tiles):
    x = make_llip_inputs(11, 17, 2, 4, 48, kind="large_scale", seed=5, dtype=torch.bfloat16)
    check_op_against_reference("sigmoid_loss", x, "cpu", pos_offset=pos_offset)


@pytest.mark.parametrize("op", OPS)
def test_bf16_many_blocks_per_thread(op, monkeypatch):
    # One image per block and one thread: 37 blocks, so the float32 dQ / dU sums of the bf16 products are moved
    # into their float64 totals after blocks 16 and 32 and at the end of each pass of 16 texts.
    monkeypatch.setattr(cpu_backend, "tile_sizes", lambda Bi, Bt, H, K, bf16=False: (1, min(Bt, 8)))
    monkeypatch.setattr(cpu_backend, "TEXTS_PER_PASS", 16)
    monkeypatch.setenv(settings.CPU_THREADS, "1")
    x = _inputs(op, 37, 19, 2, 3, 24, seed=21, dtype=torch.bfloat16)
    check_op_against_reference(op, x, "cpu", pos_offset=2)


def test_bf16_products_run_where_the_cpu_has_them():
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if flags & {"avx512_bf16", "amx_bf16"}:
        assert cpu_backend.bf16_products(torch.bfloat16), "this CPU has bf16 dot products: bf16 inputs must use them"
    assert not cpu_backend.bf16_products(torch.float16) and not cpu_backend.bf16_products(torch.float32)


@pytest.mark.parametrize("op", OPS)
def test_bf16_products_are_the_path_taken(op, monkeypatch):
    # Not a vacuous pass: with the bf16 products switched off, the same bf16 call gives other (float32-product)
    # numbers, so the rule checks above really exercised bf16_products.cpp.
    if not cpu_backend.bf16_products(torch.bfloat16):
        pytest.skip("no bf16 products on this CPU: bf16 inputs take the float32 products")
    x = _inputs(op, 7, 12, 2, 5, 48, seed=4, dtype=torch.bfloat16)
    fast = run_op(op, x, "cpu")
    monkeypatch.setattr(cpu_backend, "bf16_products", lambda dtype: False)
    plain = run_op(op, x, "cpu")
    assert not torch.equal(fast.grads["w_out"], plain.grads["w_out"]) or not torch.equal(fast.out, plain.out)


def test_bf16_inputs_reach_the_kernel_without_float32_copies():
    # With bf16 products the kernel reads bf16 k, v, q as they are and returns their gradients in bf16 (no float32
    # copies of the largest tensors either way); the float32 products refuse them in one line.
    if not cpu_backend.bf16_products(torch.bfloat16):
        pytest.skip("no bf16 products on this CPU: bf16 inputs take the float32 products")
    x = make_llip_inputs(6, 9, 2, 3, 16, seed=3, dtype=torch.bfloat16)
    k, v, q, u, m, ti, tj, bf16 = cpu_backend._prepare(x.k, x.v, x.q, x.y, x.w_out)
    assert bf16 and k.dtype == v.dtype == q.dtype == torch.bfloat16 and u.dtype == m.dtype == torch.float32
    t, b = x.t.float(), x.b.float()
    out = torch.ops.llip_kernels.cpu_sigmoid_loss_fused(k, v, q, u, m, t, b, 2.0, 0, ti, tj, True)
    assert [g.dtype for g in out[1:4]] == [torch.bfloat16] * 3 and out[4].dtype == out[5].dtype == torch.float32
    torch.library.opcheck(torch.ops.llip_kernels.cpu_sigmoid_loss_fused, (k, v, q, u, m, t, b, 2.0, 0, ti, tj, True))
    with pytest.raises(RuntimeError, match="k must be float32, got BFloat16"):
        torch.ops.llip_kernels.cpu_sigmoid_loss_fused(k, v, q, u, m, t, b, 2.0, 0, ti, tj, False)


@pytest.mark.parametrize("bf16", _products())
def test_no_texts_gives_zero_image_gradients(bf16):
    # Called directly with Bt = 0 (the public functions refuse empty batches first), the sweep has no tile to run:
    # dk, dv must come back zero, not as the uninitialised outputs of a one-pass call.
    x = make_llip_inputs(4, 3, 2, 3, 16, seed=8, dtype=torch.bfloat16 if bf16 else torch.float32)
    k, v, q, u, m, ti, tj, _ = cpu_backend._prepare(x.k, x.v, x.q, x.y, x.w_out)
    out = torch.ops.llip_kernels.cpu_sigmoid_loss_fused(
        k, v, q[:0], u[:0], m, x.t.float(), x.b.float(), 2.0, None, ti, tj, bf16
    )
    assert torch.equal(out[1], torch.zeros_like(k)) and torch.equal(out[2], torch.zeros_like(v))


def test_fp16_upcast():
    # float16 inputs take the float32 products (exactly converted; bf16 operands would drop mantissa bits).
    check_op_against_reference("sigmoid_loss", make_llip_inputs(6, 9, 2, 3, 48, dtype=torch.float16), "cpu")


@pytest.mark.parametrize("op", OPS)
def test_multi_tile_matches_single_tile(op, small_tiles):
    # The same call on 3 x 8 tiles must agree with the fp64 reference too (ragged last tiles: 10 = 3+3+3+1).
    check_op_against_reference(op, _inputs(op, 10, 19, 2, 6, 48, seed=7), "cpu", pos_offset=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("op", OPS)
def test_bitwise_deterministic(op, threads, dtype, small_tiles, monkeypatch):
    monkeypatch.setenv(settings.CPU_THREADS, threads)
    x = _inputs(op, 10, 19, 2, 6, 48, seed=11, dtype=dtype)
    first = run_op(op, x, "cpu", pos_offset=1)
    second = run_op(op, x.to(dtype), "cpu", pos_offset=1)
    assert torch.equal(first.out, second.out)
    for name, g in first.grads.items():
        assert torch.equal(g, second.grads[name]), f"d{name} differs between two identical calls"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_two_threads(op, dtype, small_tiles, monkeypatch):
    # Image blocks spread over 2 threads: per-thread scratch and the per-thread partial sums (dQ, dU, dM, the
    # loss rows, the softmax column statistics) merged in thread order, so still bitwise repeatable.
    monkeypatch.setenv(settings.CPU_THREADS, "2")
    x = _inputs(op, 10, 19, 2, 6, 48, seed=13, dtype=dtype)
    check_op_against_reference(op, x, "cpu", pos_offset=1)
    first, second = (run_op(op, x.to(dtype), "cpu", pos_offset=1) for _ in range(2))
    assert torch.equal(first.out, second.out)
    for name, g in first.grads.items():
        assert torch.equal(g, second.grads[name]), f"d{name} differs between two identical calls"


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("pos_offset", [1, None])
def test_fused_sigmoid_sweep_matches_forward_then_backward(pos_offset, bf16, small_tiles):
    """The training path (loss and gradients in one sweep, scaled by the cotangent afterwards) against the
    forward-only op followed by its own recomputing backward op, for a cotangent that is not 1."""
    x = make_llip_inputs(10, 19, 2, 6, 48, kind="large_scale", seed=17)
    leaves = list(cpu_backend._prepare(x.k, x.v, x.q, x.y, x.w_out))
    k, v, q, u, m = (a.detach().requires_grad_() for a in leaves[:5])
    t, b = x.t.detach().requires_grad_(), x.b.detach().requires_grad_()
    if bf16 not in _products():
        pytest.skip("no bf16 products on this CPU")
    args = (k, v, q, u, m, t, b, x.tau, pos_offset, 3, 8, bf16)
    cotangent = torch.tensor(0.37)
    fused = torch.ops.llip_kernels.cpu_sigmoid_loss_fused(*args)[0]
    fused_grads = torch.autograd.grad(fused, (k, v, q, u, m, t, b), cotangent)
    plain = torch.ops.llip_kernels.cpu_sigmoid_loss(*args)
    plain_grads = torch.autograd.grad(plain, (k, v, q, u, m, t, b), cotangent)
    assert torch.equal(fused, plain), "the sweep's loss must be the forward's, bit for bit"
    for name, a, e in zip(["k", "v", "q", "u", "m", "t", "b"], fused_grads, plain_grads):
        # Same algebra; only where the cotangent multiplies in (per pair in double, or once at the end) differs:
        # the bound of a float32 sum over every pair. With bf16 products the cotangent also changes the values
        # each product operand is rounded from, so the two differ by a few bf16 roundings of the result instead.
        if bf16:
            check_same_result(f"d{name}", a, e, dtype=torch.bfloat16, terms=1)
        else:
            check_same_result(f"d{name}", a, e, dtype=torch.float32, terms=10 * 19)


def test_public_function_takes_the_fused_sweep_only_for_training(monkeypatch):
    x = make_llip_inputs(6, 9, 2, 3, 16, seed=8)
    args = (x.k, x.v, x.q, x.y, x.w_out, x.t, x.b)
    calls = []
    real = cpu_backend.cpu_sigmoid_loss_fused
    monkeypatch.setattr(cpu_backend, "cpu_sigmoid_loss_fused", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():  # no gradient wanted: the forward-only op, whose loss matches the reference
        _check_loss_against_reference("cpu", lk.llip_sigmoid_loss(*args, tau=x.tau, backend="cpu"), x)
    assert not calls, "a no-grad call must not pay for the gradients"
    lk.llip_sigmoid_loss(*args, tau=x.tau, backend="cpu").backward()
    assert calls == [1], "a training call must take the fused sweep"


def test_fused_sweep_refuses_second_derivatives():
    x = make_llip_inputs(4, 5, 2, 3, 16, seed=9)
    loss = lk.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend="cpu")
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, x.k, create_graph=True)


@pytest.mark.parametrize("op", OPS)
def test_no_large_allocations(op):
    # H*K = 3 and D = 8 keep every O(Bi) / O(Bt) tensor (k, v: [64, 1, 3, 8])
    # below Bi*Bt, so any tensor that large could only be a materialised score matrix.
    Bi = Bt = 64
    x = make_llip_inputs(Bi, Bt, 1, 3, 8)
    with record_allocations() as rec:
        run_op(op, x, "cpu")
    limit = Bi * Bt * 3 if op == "logits" else Bi * Bt
    big = [a for a in rec.at_least(limit) if not (op == "logits" and a.shape == (Bi, Bt))]
    assert not big, f"allocations of >= {limit} elements: {big[:5]}"
    assert rec.allocations, "the recorder saw nothing: the test would pass vacuously"


def test_workspace_is_bounded():
    # The C++ scratch (invisible to record_allocations) is fixed by the tile sizes, not by the batch.
    ws = cpu_backend.workspace_floats(1024, 1024, 8, 32)
    assert ws == cpu_backend.workspace_floats(4096, 4096, 8, 32)
    assert ws < 1024 * 1024 * 32 / 8


def test_opcheck():
    ops = torch.ops.llip_kernels
    x = make_llip_inputs(5, 7, 2, 3, 8, seed=2)
    k, v, q, u, m, _, _, _ = (
        a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a
        for a in cpu_backend._prepare(x.k, x.v, x.q, x.y, x.w_out)
    )
    t, b = x.t.detach().requires_grad_(), x.b.detach().requires_grad_()
    for bf16 in _products():
        torch.library.opcheck(ops.cpu_cos, (k, v, q, u, m, 2.0, 2, 4, bf16))
        torch.library.opcheck(ops.cpu_sigmoid_loss, (k, v, q, u, m, t, b, 2.0, 1, 2, 4, bf16))
        torch.library.opcheck(ops.cpu_sigmoid_loss, (k, v, q, u, m, t, b, 2.0, None, 2, 4, bf16))
        torch.library.opcheck(ops.cpu_sigmoid_loss_fused, (k, v, q, u, m, t, b, 2.0, 1, 2, 4, bf16))
    x = make_llip_inputs(5, 5, 2, 3, 8, seed=2)
    k, v, q, u, m, _, _, _ = (
        a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a
        for a in cpu_backend._prepare(x.k, x.v, x.q, x.y, x.w_out)
    )
    for bf16 in _products():
        torch.library.opcheck(ops.cpu_softmax_loss, (k, v, q, u, m, t, 2.0, 2, 4, bf16))


def test_refuses_huge_hk_with_reason():
    p = LlipProblem("sigmoid_loss", 4, 4, 2, 600, 8, torch.float32, torch.device("cpu"), 1.0, True)
    why = cpu_backend.not_supported_reasons(p)
    assert any("H*K" in w for w in why)


def test_bad_input_raises_shared_validation_error():
    x = make_llip_inputs(3, 4, 2, 3, 8)
    with pytest.raises(TypeError, match="w_out has dtype"):
        lk.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out.double(), x.t, x.b, tau=1.0, backend="cpu")


def test_missing_compiler_gives_reason_and_falls_back(monkeypatch, tmp_path):
    # A build under another name with $CXX pointing nowhere: the reason names the compiler, backend="cpu" raises
    # it, and automatic dispatch falls through to the next CPU backend.
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv(settings.CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_backend, "EXT_NAME", "llip_cpu_ext_missing_compiler_test")
    monkeypatch.delitem(_build._results, cpu_backend.EXT_NAME, raising=False)
    x = make_llip_inputs(4, 5, 2, 3, 8)
    problem = lk._validate.check_llip_inputs("sigmoid_loss", x.k, x.v, x.q, x.y, x.w_out, tau=x.tau)
    why = cpu_backend.not_supported_reasons(problem)
    assert len(why) == 1 and "no C++ compiler" in why[0] and "no-such-c++" in why[0]
    assert cpu_backend.environment_reasons() == why  # remembered, not retried
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        lk.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend="cpu")
    chosen = dispatch.select_backend(problem, None)
    assert chosen is not cpu_backend
    loss = lk.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau)
    _check_loss_against_reference("the automatic choice", loss, x)


def _check_loss_against_reference(name, loss, x):
    """``loss`` (the sigmoid loss of ``x``, pos_offset 0) against the float64 reference, by the numerics rule."""
    ref64 = run_op("sigmoid_loss", x.to(torch.float64), "reference", with_grad=False).out
    same = run_op("sigmoid_loss", x.to(torch.float32), "reference", with_grad=False).out
    check_rule(f"{name} sigmoid loss", loss, ref64, same, torch.float32)


def _problem(Bi, H, K, d, requires_grad, dtype=torch.float32):
    return LlipProblem("sigmoid_loss", Bi, Bi, H, K, d, dtype, torch.device("cpu"), 5.0, requires_grad)


@pytest.mark.parametrize(
    ("shape", "grad", "expected"),
    [
        ((128, 8, 64, 64), True, "torch"),  # B/32 head, small batch: form 1 beats form 3 (measured 1.17x)
        ((128, 8, 64, 64), False, "torch"),  # ... forward only (measured 1.75x)
        ((128, 8, 32, 64), False, "cpu"),  # B/16 forward at 128: form 2 has ~the FLOPs, the kernel wins (1.25x)
        ((128, 8, 32, 64), True, "cpu"),  # ... and the fused training sweep more so (measured 1.85x)
        ((256, 8, 64, 160), True, "cpu"),  # G/14 head (measured 1.9x)
        ((128, 4, 8, 32), False, "cpu"),  # the llip-tiny head: both in form 3, the fused kernel wins (measured 4.7x)
    ],
)
def test_automatic_choice_follows_the_measured_rule(shape, grad, expected):
    chosen = dispatch.select_backend(_problem(*shape, grad), None)
    assert chosen is dispatch.load_backend(expected)
    # An explicit request is never overridden by the speed rule.
    assert dispatch.select_backend(_problem(*shape, grad), "cpu") is cpu_backend


@pytest.mark.parametrize(
    ("shape", "grad", "fp32", "bf16"),
    [
        ((128, 8, 64, 160), False, "torch", "cpu"),  # G/14 forward: FLOP ratio 1.10, bf16 kernel 1.5x faster
        ((128, 8, 64, 64), True, "torch", "torch"),  # B/32 training at 128: ratio 1.17, torch 1.5x faster
        ((128, 8, 32, 64), True, "cpu", "cpu"),  # B/16 training (measured 5x with bf16 products)
    ],
)
def test_automatic_choice_for_bf16_follows_its_own_measured_rule(shape, grad, fp32, bf16):
    assert dispatch.select_backend(_problem(*shape, grad), None) is dispatch.load_backend(fp32)
    if not cpu_backend.bf16_products(torch.bfloat16):
        pytest.skip("no bf16 products on this CPU: bf16 inputs follow the float32 rule")
    chosen = dispatch.select_backend(_problem(*shape, grad, torch.bfloat16), None)
    assert chosen is dispatch.load_backend(bf16)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores")
def test_kernel_really_runs_on_several_threads():
    # The extension was once built without -fopenmp: at::parallel_for then ran every image block on one thread
    # whatever the thread count (2x slower on 2 cores, and nothing failed). Count the threads a region gets.
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu_backend.extension().parallel_width(64) == 2
        # ... and exactly torch's count: a second OpenMP runtime in the process would ignore set_num_threads.
        torch.set_num_threads(1)
        assert cpu_backend.extension().parallel_width(64) == 1
    finally:
        torch.set_num_threads(previous)

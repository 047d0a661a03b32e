"""Long sums stay accurate: every gradient is a sum over all texts (image side) or all images (text side), and the
fused backends add each tile's float32 partial into a float64 total instead of a float32 running sum, so rounding
does not pile up tile after tile (docs/design.md section 6). Checked at the paper's 32,768 texts per rank (cpu) and
over a hundred text blocks (Triton, interpreted), each gradient against the fp32 torch backend's error with the
numerics rule: ``max|ours - ref64| <= 2 * max|torch - ref64| + floor``, the floor a number of float32 roundings
of the gradient's own magnitude (not the suite's usual 2e-5).

At a realistic head (B/16) 8 roundings suffice. At the tiny head of the first report (K = 2, H = 2, d = 8) the
torch backend picks form 2, which builds z and combines the dot and norm parts of each gradient pair by pair; form 3
sums them separately over all texts before they cancel, which costs a few more roundings (about 25 at 32,768
texts): the floor there is 32. The float32 running sum this replaced cost the cpu kernel 60 roundings of dv there
(7.6e-6 against a bound of 1.7e-6), which the first test catches. The Triton test runs the float64 totals through
125 text blocks in the interpreter; at that length a float32 total was still within 3 roundings, so it guards the
float64 path (pointer types, layouts) rather than showing the gain.
"""

from __future__ import annotations

import os

import pytest
import torch

from llip_kernels.testing import INPUT_NAMES, check_rule, make_llip_inputs, run_op

PAIR_SCALARS = ("t", "b")  # gradients summed over every (image, text) pair, one rounded term each


def _check_long_sums(backend, op, shape, Bt, *, ulps, seeds=(0, 1)):
    Bi, H, K, d = shape
    pairs = Bi * (Bi if op == "softmax_loss" else Bt)
    for seed in seeds:
        x = make_llip_inputs(Bi, Bi if op == "softmax_loss" else Bt, H, K, d, seed=seed)
        ours = run_op(op, x.to(), backend, pos_offset=0)
        same = run_op(op, x.to(), "torch", pos_offset=0)
        ref64 = run_op(op, x.to(torch.float64), "torch", pos_offset=0)
        floor = ulps * torch.finfo(torch.float32).eps * ref64.out.abs().max().item()
        check_rule(f"{backend} {op} output (seed {seed})", ours.out, ref64.out, same.out, torch.float32, floor)
        for name, ref in ref64.grads.items():
            if name == "b" and op == "softmax_loss":
                continue
            floor = ulps * torch.finfo(torch.float32).eps * ref.abs().max().item()
            if name in PAIR_SCALARS:
                # Each pair's term is rounded once where it is made (its cosine is a float32 dot product); those
                # independent roundings add like sqrt(pairs) however exactly the total is kept.
                floor *= pairs**0.5
            check_rule(
                f"{backend} {op} d{name} (seed {seed})", ours.grads[name], ref, same.grads[name], torch.float32, floor
            )
    assert set(ref64.grads) <= set(INPUT_NAMES)


TINY = (2, 2, 2, 8)  # Bi, H, K, d of the first report
B16 = (8, 8, 32, 64)


def test_cpu_at_32768_texts():
    from llip_kernels.backends import cpu

    if cpu.environment_reasons():
        pytest.skip("; ".join(cpu.environment_reasons()))
    _check_long_sums("cpu", "sigmoid_loss", TINY, 32768, ulps=32)


def test_cpu_at_the_b16_head():
    from llip_kernels.backends import cpu

    if cpu.environment_reasons():
        pytest.skip("; ".join(cpu.environment_reasons()))
    _check_long_sums("cpu", "sigmoid_loss", B16, 8192, ulps=8, seeds=(0,))


def test_cpu_softmax_loss_at_4096_pairs_each_way():
    """Square: the text-side sums run over 4,096 images too."""
    from llip_kernels.backends import cpu

    if cpu.environment_reasons():
        pytest.skip("; ".join(cpu.environment_reasons()))
    _check_long_sums("cpu", "softmax_loss", (4096, 2, 2, 8), 4096, ulps=32, seeds=(0,))


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available(),
    reason="the triton backend needs TRITON_INTERPRET=1 or a CUDA device",
)
def test_triton_over_a_hundred_text_blocks(monkeypatch):
    from llip_kernels.backends.triton import launch

    for name in ("MAX_BLOCK_T", "MAX_BLOCK_T_BWD"):  # 16 texts per block: 125 blocks of 2,000 texts
        monkeypatch.setattr(launch, name, 16)
    _check_long_sums("triton", "sigmoid_loss", TINY, 2000, ulps=8, seeds=(0,))

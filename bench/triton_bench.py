"""Benchmark of the triton backend at paper shapes (GPU only): llip_sigmoid_loss forward+backward.

    python -m bench triton --out bench/results/gpu/triton_bench.json [--quick]

FLOP model: what the kernels run (``llip_kernels.backends.triton.flops``: form 3, docs/design.md section 4, pair
work plus precomputations), and "effective" FLOPs = form 1 (``llip_kernels.algebra.pair_flops``: as written,
4KD + 2D^2 per pair forward, x3 for fwd+bwd) for comparison across algorithms. The machine reference is a large
bf16 torch matmul measured in the same run.
Baseline: the as-written formula (reference backend) over blocks of texts with activation checkpointing,
the way the reference code survives at scale. Writes one JSON document (GPU name, versions, timestamp, rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import llip_kernels as lk
from bench.common import cuda_event_matmul_tflops, cuda_event_median_ms
from llip_kernels import reference, testing
from llip_kernels.algebra import pair_flops, sigmoid_labels
from llip_kernels.backends import triton as triton_backend
from llip_kernels.backends.triton.aot import PAPER_CONFIGS


def _time(fn, reps: int = 5) -> float:
    """Median seconds of ``fn`` (CUDA events, after one warm-up call that also compiles)."""
    return cuda_event_median_ms(fn, reps) / 1e3


def _inputs(Bi, Bt, H, K, d, dtype):
    x = testing.make_llip_inputs(Bi, 1, H, K, d, dtype=dtype, device="cuda", requires_grad=False)
    q = torch.randn(Bt, H, d, device="cuda", dtype=dtype)
    y = torch.randn(Bt, H * d, device="cuda", dtype=dtype)
    return [t.requires_grad_() for t in (x.k, x.v, q, y, x.w_out, x.t, x.b)], x.tau


def run_triton(args, tau):
    k, v, q, y, w, t, b = args

    def step():
        for a in args:
            a.grad = None
        loss = lk.llip_sigmoid_loss(k, v, q, y, w, t, b, tau=tau, pos_offset=0, backend="triton")
        loss.backward()
        return loss

    return step


def run_blocked_reference(args, tau, block: int):
    """As written (form 1), one checkpointed block of texts at a time: memory O(Bi*block*(HK+D))."""
    k, v, q, y, w, t, b = args

    def block_loss(k, v, qb, yb, w, t, b, start):
        lg = reference.logits(k, v, qb, yb, w, t, b, tau=tau)
        labels = sigmoid_labels(k.shape[0], qb.shape[0], -start, k.device)
        return -F.logsigmoid(labels * lg).sum()

    def step():
        for a in args:
            a.grad = None
        total = 0.0
        for s in range(0, q.shape[0], block):
            total = total + checkpoint(
                block_loss, k, v, q[s : s + block], y[s : s + block], w, t, b, s, use_reentrant=False
            )
        loss = total / k.shape[0]
        loss.backward()
        return loss

    return step


def bench_one(name, Bi, Bt, dtype, peak, baseline_block, with_baseline):
    K, H, d = PAPER_CONFIGS[name]
    args, tau = _inputs(Bi, Bt, H, K, d, dtype)
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    step = run_triton(args, tau)
    loss = step().item()
    sec = _time(step)
    peak_mem = torch.cuda.max_memory_allocated() - base_mem
    fwd_bwd = [triton_backend.flops("sigmoid_loss", Bi, Bt, H, K, d, backward=bw) for bw in (False, True)]
    fl = sum(fwd_bwd)  # forward + the backward pass alone (every backend's flops() convention)
    eff = 3 * Bi * Bt * pair_flops(1, H, K, d)
    row = dict(
        config=name,
        Bi=Bi,
        Bt=Bt,
        K=K,
        H=H,
        D=H * d,
        dtype=str(dtype).replace("torch.", ""),
        op="llip_sigmoid_loss fwd+bwd",
        triton_s=sec,
        triton_flops=fl,
        triton_tflops=fl / sec / 1e12,
        fraction_of_matmul=fl / sec / 1e12 / peak,
        effective_tflops_form1=eff / sec / 1e12,
        triton_peak_mem_gb=peak_mem / 1e9,
    )
    if with_baseline:
        torch.cuda.reset_peak_memory_stats()
        base_step = run_blocked_reference(args, tau, baseline_block)
        base_loss = base_step().item()
        bsec = _time(base_step, reps=2)
        row.update(
            baseline_s=bsec,
            speedup_vs_blocked_checkpointed=bsec / sec,
            triton_loss=loss,
            baseline_loss=base_loss,
            loss_rel_diff=abs(loss - base_loss) / max(abs(base_loss), 1e-30),
            baseline_peak_mem_gb=(torch.cuda.max_memory_allocated() - base_mem) / 1e9,
        )
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench triton", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/gpu/triton_bench.json")
    ap.add_argument("--quick", action="store_true", help="only the G/14 target and B/16")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_bench needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    peak = cuda_event_matmul_tflops(reps=10)
    print(f"bf16 torch matmul: {peak:.1f} TFLOP/s", flush=True)
    rows = []
    # the headline target: G/14 head, 256 local images x 32,768 texts, bf16, vs the blocked checkpointed formula
    rows.append(bench_one("G/14", 256, 32768, torch.bfloat16, peak, 1024, True))
    others = ["B/16"] if args.quick else ["B/32", "B/16", "L/14", "H/14"]
    for name in others:
        rows.append(bench_one(name, 256, 8192, torch.bfloat16, peak, 1024, False))
    if not args.quick:
        rows.append(bench_one("G/14", 64, 4096, torch.float32, peak, 1024, False))
    doc = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        matmul_bf16_tflops=peak,
        rows=rows,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

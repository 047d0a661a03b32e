"""Pooled SigLIP / CLIP loss, forward + backward, three ways side by side (CPU):

- ``plain``: :mod:`llip_kernels.baselines` (what open_clip does): the ``[B, B]`` logits and their gradient;
- ``blocked``: :mod:`llip_kernels.pooled` (the open_clip drop-ins' path): 1024 image rows at a time;
- ``llip-K1``: the fused Llip kernels on the cpu backend with ``K = 1, H = 1, W_out = I`` (SigLIP only), the
  reduction the issue suggested measuring.

FLOPs: ``6 * B^2 * D`` for the plain forward + backward (one ``[B, D] x [D, B]`` product forward, two backward); the
blocked path recomputes the products in backward (``8 * B^2 * D``), but the table counts ``6 * B^2 * D`` for every
row so the GFLOP/s compare like for like. Each time is the median of several calls in this process; the peak
memory of each case is measured in a fresh process (bench/memory.py's method: peak RSS above the warm baseline).

    python -m bench pooled                  # B in 1024, 4096, 8192 at D = 512; writes bench/results/pooled_cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

import llip_kernels as lk
from llip_kernels.pooled import fused_sigmoid_loss, fused_softmax_loss

from .common import REPO, measure, run_metadata
from .memory import measure_in_process_cpu, pin_mmap_threshold
from .providers import Built

PATHS = {
    ("sigmoid", "plain"): lambda i, x, t, b: lk.sigmoid_loss(i, x, t, b),
    ("sigmoid", "blocked"): lambda i, x, t, b: fused_sigmoid_loss(i, x, t, b),
    ("sigmoid", "llip-K1"): lambda i, x, t, b: _siglip_as_llip(i, x, t, b),
    ("softmax", "plain"): lambda i, x, t, b: lk.softmax_loss(i, x, t),
    ("softmax", "blocked"): lambda i, x, t, b: fused_softmax_loss(i, x, t),
}


def _siglip_as_llip(img, txt, t, b):
    """Pooled SigLIP as Llip with one mixture token and one head: the softmax over one token is 1, so every mixed
    embedding is ``img_i @ I``."""
    B, D = img.shape
    k = img.new_zeros(B, 1, 1, D)
    q = txt.new_zeros(txt.shape[0], 1, D)
    eye = torch.eye(D, dtype=img.dtype)
    return lk.llip_sigmoid_loss(k, img[:, None, None, :], q, txt, eye, t, b, tau=1.0, backend="cpu")


def build_case(loss: str, path: str, B: int, D: int) -> Built:
    g = torch.Generator().manual_seed(0)
    img = torch.randn(B, D, generator=g).requires_grad_()
    txt = torch.randn(B, D, generator=g).requires_grad_()
    t, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    fn = PATHS[(loss, path)]

    def step():
        out = fn(img, txt, t, b)
        torch.autograd.grad(out, (img, txt))

    return Built(fn=step, setup=None, tensors={"img": img, "txt": txt})


def _memory_in_fresh_process(loss: str, path: str, B: int, D: int) -> int:
    code = f"import json, bench.pooled as p; print(json.dumps(p._memory_here({loss!r}, {path!r}, {B}, {D})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_here(loss: str, path: str, B: int, D: int) -> int:
    pin_mmap_threshold()
    return measure_in_process_cpu(build_case(loss, path, B, D))["peak_bytes"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench pooled", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "pooled_cpu.json"))
    args = p.parse_args(argv)
    rows = []
    for B in args.batch:
        for loss, path in PATHS:
            ms = measure(build_case(loss, path, B, args.dim).fn, min_reps=3, max_reps=10, min_time_s=2.0).median
            flops = 6 * B * B * args.dim
            row = {"loss": loss, "path": path, "B": B, "D": args.dim, "ms": ms, "gflops": flops / ms / 1e6,
                   "peak_mb": _memory_in_fresh_process(loss, path, B, args.dim) / 2**20}  # fmt: skip
            rows.append(row)
            print(f"{loss:8s} {path:8s} B={B:5d}  {ms:9.1f} ms  {row['gflops']:6.1f} GFLOP/s  {row['peak_mb']:8.1f} MB")
    result = {"meta": run_metadata("cpu", "python -m bench pooled " + " ".join(argv or [])), "rows": rows}
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    return 0  # python -m bench exits with it; the rows are in the file


if __name__ == "__main__":
    sys.exit(main())

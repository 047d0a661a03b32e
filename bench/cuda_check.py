"""GPU check of the ``"cuda"`` backend, in one call: build the extension, check it against the fp64 reference
(docs/design.md section 6) on odd shapes and adversarial inputs, opcheck and torch.compile the custom ops, check
the deterministic backward, time the B/16 and G/14 heads against the reference, and last (optional) run one small
case under compute-sanitizer.

    python -m bench cuda-check OUT_DIR [--quick] [--no-sanitizer]

Writes ``OUT_DIR/cuda_check.json`` (rewritten after every step, so a timeout still leaves the results so far) and
prints one line per step. Exit status 0 when the build and every correctness check passed. Made to run unattended
on a machine with an H200, torch 2.11 + cu130, nvcc 13.0 and no network (bench/gpu_check.sh calls it).

FLOPs: ``llip_kernels.backends.cuda.flops`` (form 3, the form the kernels use); "effective" TFLOP/s count form 1
(``llip_kernels.algebra.pair_flops``, docs/design.md section 4) so that algorithms can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.common import REPO, cuda_event_matmul_tflops, cuda_event_median_ms
from llip_kernels import functional
from llip_kernels.algebra import pair_flops
from llip_kernels.backends import cuda as cuda_backend
from llip_kernels.testing import check_op_against_reference, make_llip_inputs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Correctness grid: (Bi, Bt, H, K, d) with why.
SHAPES = [
    (5, 7, 2, 5, 48),  # the emulated-test shape: K and d padded, one partial text tile
    (7, 33, 3, 17, 20),  # Kp = 32 (two k-steps), d = 20, H = 3
    (3, 11, 1, 1, 16),  # K = 1: a softmax of one token
    (9, 130, 8, 32, 64),  # B/16 head, three text tiles (64 + 64 + 2)
    (4, 70, 8, 64, 160),  # G/14 head: backward runs with 32 texts per tile
    (6, 40, 2, 65, 96),  # K = 65: Kp = 80, L/14 head dim
]
KINDS = ("gaussian", "peaked", "near_ties", "duplicate_rows", "non_unit", "large_scale")
ALL_KINDS_SHAPES = (SHAPES[0], SHAPES[3])  # every kind here (bf16 and fp16 on the first; bf16 on the B/16 head)
TIMING_HEADS = {"B/16": (8, 32, 64), "G/14": (8, 64, 160)}  # (H, K, d)


class Report:
    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "cuda_check.json"
        self.data: dict = {"meta": _meta(), "build": None, "checks": [], "sanitizer": None, "timing": []}
        self.ok = True
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


def _meta() -> dict:
    dev = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": dev.name if dev else None,
        "capability": f"{dev.major}.{dev.minor}" if dev else None,
        "sms": dev.multi_processor_count if dev else None,
        "cuda_home": cuda_backend.cuda_home(),
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST"),
    }


def build(rep: Report) -> bool:
    t0 = time.perf_counter()
    try:
        ext = cuda_backend.extension()
        rep.data["build"] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), "module": ext.__file__}
    except Exception as e:
        rep.data["build"] = {"ok": False, "seconds": round(time.perf_counter() - t0, 1), "error": str(e)[-4000:]}
        rep.ok = False
    rep.save()
    print(f"build: {rep.data['build']}", flush=True)
    return rep.data["build"]["ok"]


def _is_context_fatal(e: BaseException) -> bool:
    text = str(e)
    return any(
        s in text
        for s in (
            "illegal memory access",
            "misaligned address",
            "unspecified launch failure",
            "illegal instruction",
            "device-side assert",
        )
    )


def correctness(rep: Report, quick: bool) -> bool:
    """Every case: output and every gradient vs fp64 with the docs/design.md section 6 rule. Returns False when the CUDA
    context died (later GPU work would only repeat the error)."""
    cases = []
    for shape in SHAPES[: 3 if quick else None]:
        for dtype in (torch.bfloat16, torch.float16):
            every_kind = shape == ALL_KINDS_SHAPES[0] or (dtype == torch.bfloat16 and shape in ALL_KINDS_SHAPES)
            kinds = KINDS if every_kind else ("gaussian",)
            for kind in kinds:
                cases.append(("sigmoid_loss", shape, dtype, kind, 1))
        cases.append(("logits", shape, torch.bfloat16, "gaussian", None))
    cases += [
        ("sigmoid_loss", SHAPES[0], torch.bfloat16, "gaussian", None),  # all-negative block (remote texts)
        ("sigmoid_loss", SHAPES[0], torch.bfloat16, "gaussian", -3),
    ]
    for op, shape, dtype, kind, pos in cases:
        entry = {
            "op": op,
            "shape": "Bi{}-Bt{}-H{}-K{}-d{}".format(*shape),
            "dtype": str(dtype),
            "kind": kind,
            "pos_offset": pos,
        }
        t0 = time.perf_counter()
        try:
            x = make_llip_inputs(
                *shape, kind=kind, dtype=dtype, device="cuda", seed=11, requires_grad=op == "sigmoid_loss"
            )
            check_op_against_reference(op, x, "cuda", pos_offset=pos, with_grad=op == "sigmoid_loss")
            torch.cuda.synchronize()
            entry["ok"] = True
        except Exception as e:
            entry["ok"] = False
            entry["error"] = f"{type(e).__name__}: {e}"[-3000:]
            rep.ok = False
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        rep.data["checks"].append(entry)
        rep.save()
        print(
            f"check {op} {entry['shape']} {dtype} {kind} pos={pos}: {'ok' if entry['ok'] else entry['error']}",
            flush=True,
        )
        if not entry["ok"] and _is_context_fatal(Exception(entry["error"])):
            return False
    return True


def sanitizer(rep: Report, timeout_s: int = 90) -> None:
    """compute-sanitizer memcheck and racecheck (shared-memory hazards) of one small forward + backward."""
    home = cuda_backend.cuda_home()
    tool = shutil.which("compute-sanitizer") or (home and str(Path(home) / "bin" / "compute-sanitizer"))
    if not tool or not Path(tool).exists():
        rep.data["sanitizer"] = {"skipped": "compute-sanitizer not found"}
        rep.save()
        return
    results = {}
    for check in ("memcheck", "racecheck"):
        cmd = [tool, "--tool", check, "--error-exitcode", "3", sys.executable, "-m", "bench", "cuda-check"]
        cmd.append("--tiny-case")
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
            tail = (p.stdout + p.stderr)[-2500:]
            results[check] = {"rc": p.returncode, "ok": p.returncode == 0, "tail": tail}
        except subprocess.TimeoutExpired:
            results[check] = {"ok": None, "error": f"timed out after {timeout_s} s"}
        if results[check].get("ok") is False:
            rep.ok = False
        rep.data["sanitizer"] = results
        rep.save()
        print(f"sanitizer {check}: {results[check].get('ok')}", flush=True)


def tiny_case() -> None:
    """What the sanitizer runs: one small loss forward + backward and one logits call."""
    x = make_llip_inputs(5, 70, 2, 17, 48, dtype=torch.bfloat16, device="cuda", seed=2)
    loss = functional.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend="cuda")
    loss.backward()
    with torch.no_grad():
        functional.llip_logits(x.k, x.v, x.q, x.y, x.w_out, tau=x.tau, backend="cuda")
    torch.cuda.synchronize()


def compiled(rep: Report) -> None:
    """The custom ops on real tensors: torch.library.opcheck (all its tests), torch.compile(fullgraph=True) against
    eager, and how far apart two backward passes land (dq/du use float atomics, so they may differ in the last
    bits)."""
    out: dict = {}
    x = make_llip_inputs(6, 70, 2, 17, 48, dtype=torch.bfloat16, device="cuda", seed=5)
    inputs = [x.k, x.v, x.q, x.y, x.w_out, x.t, x.b]

    def loss_fn(k, v, q, y, w, t, b):
        return cuda_backend.sigmoid_loss(k, v, q, y, w, t, b, tau=x.tau, pos_offset=0)

    try:
        u, g = cuda_backend.text_and_gram(x.v.detach(), x.y.detach(), x.w_out.detach())
        args = (x.k, x.v, x.q, u.requires_grad_(), g.requires_grad_(), x.t, x.b, x.tau, 0, True, False)
        torch.library.opcheck(torch.ops.llip_kernels.cuda_sigmoid_loss.default, args)
        out["opcheck"] = "ok"
    except Exception as e:
        out["opcheck"] = f"{type(e).__name__}: {e}"[-1500:]
        rep.ok = False
    try:
        eager = torch.autograd.grad(loss_fn(*inputs), inputs)
        again = torch.autograd.grad(loss_fn(*inputs), inputs)
        out["repeat_max_abs_diff"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(eager, again))
        comp = torch.compile(loss_fn, fullgraph=True)
        got = torch.autograd.grad(comp(*inputs), inputs)
        out["compile_max_abs_diff"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(eager, got))
        out["compile"] = "ok"
    except Exception as e:
        out["compile"] = f"{type(e).__name__}: {e}"[-1500:]
        rep.ok = False
    rep.data["compiled"] = out
    rep.save()
    print(f"compiled: {out}", flush=True)


def deterministic(rep: Report) -> None:
    """Deterministic mode ($LLIP_KERNELS_DETERMINISTIC=1: no atomics in the backward): the reference check on two
    text tiles with the positives in the second, and two backward passes that must agree bit for bit."""
    out: dict = {}
    old = os.environ.get("LLIP_KERNELS_DETERMINISTIC")
    os.environ["LLIP_KERNELS_DETERMINISTIC"] = "1"
    try:
        x = make_llip_inputs(5, 100, 8, 32, 64, kind="large_scale", dtype=torch.bfloat16, device="cuda", seed=6)
        check_op_against_reference("sigmoid_loss", x, "cuda", pos_offset=64)
        inputs = [x.k, x.v, x.q, x.y, x.w_out, x.t, x.b]
        runs = []
        for _ in range(2):
            loss = cuda_backend.sigmoid_loss(*inputs, tau=x.tau, pos_offset=64)
            runs.append(torch.autograd.grad(loss, inputs))
        out["bitwise_repeatable"] = all(torch.equal(a, b) for a, b in zip(*runs))
        out["ok"] = out["bitwise_repeatable"]
    except Exception as e:
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {e}"[-1500:]
    finally:
        if old is None:
            os.environ.pop("LLIP_KERNELS_DETERMINISTIC")
        else:
            os.environ["LLIP_KERNELS_DETERMINISTIC"] = old
    rep.ok = rep.ok and out["ok"]
    rep.data["deterministic"] = out
    rep.save()
    print(f"deterministic: {out}", flush=True)


def _loss_fns(x, backend: str):
    """(forward without autograd, forward + backward to every input) of the sigmoid loss on inputs ``x``."""

    def fwd():
        with torch.no_grad():
            functional.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend=backend)

    def fwd_bwd():
        loss = functional.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend=backend)
        torch.autograd.grad(loss, [x.k, x.v, x.q, x.y, x.w_out])

    return fwd, fwd_bwd


def timing(rep: Report, B: int, reps: int) -> None:
    """Sigmoid loss forward and forward + backward, cuda vs reference, bf16, Bi = Bt = B, plus a bf16 matmul."""
    rep.data["matmul_bf16_tflops"] = cuda_event_matmul_tflops(reps)
    for name, (H, K, d) in TIMING_HEADS.items():
        x = make_llip_inputs(B, B, H, K, d, dtype=torch.bfloat16, device="cuda", seed=0)
        for backend in ("cuda", "reference"):
            row = {"config": name, "B": B, "backend": backend, "dtype": "bfloat16"}
            try:
                row.update(_time_backend(x, backend, B, H, K, d, reps))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[-2000:]
            rep.data["timing"].append(row)
            rep.save()
            print(f"timing {row}", flush=True)
        torch.cuda.empty_cache()


def _time_backend(x, backend: str, B: int, H: int, K: int, d: int, reps: int) -> dict:
    fwd, fwd_bwd = _loss_fns(x, backend)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    row = {"fwd_ms": cuda_event_median_ms(fwd, reps), "fwd_bwd_ms": cuda_event_median_ms(fwd_bwd, reps)}
    row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    f3_fwd = cuda_backend.flops("sigmoid_loss", B, B, H, K, d, False)
    f3_bwd = cuda_backend.flops("sigmoid_loss", B, B, H, K, d, True)
    f1 = pair_flops(1, H, K, d) * B * B
    row["fwd_tflops_form3"] = f3_fwd / (row["fwd_ms"] * 1e-3) / 1e12
    row["fwd_bwd_tflops_form3"] = (f3_fwd + f3_bwd) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    row["fwd_effective_tflops_form1"] = f1 / (row["fwd_ms"] * 1e-3) / 1e12
    row["fwd_bwd_effective_tflops_form1"] = 3 * f1 / (row["fwd_bwd_ms"] * 1e-3) / 1e12  # bwd counted as 2x fwd
    return row


def main(argv: list[str] | None = None) -> int:
    """The check; any exception is printed and gives exit status 1 (the JSON written so far stays)."""
    try:
        return _main(argv)
    except Exception:
        traceback.print_exc()
        return 1


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench cuda-check", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", default=str(REPO / "bench" / "results" / "cuda_check"))
    p.add_argument("--quick", action="store_true", help="fewer shapes, smaller timing batch")
    p.add_argument("--no-sanitizer", action="store_true")
    p.add_argument("--tiny-case", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny_case:
        tiny_case()
        return 0
    rep = Report(Path(args.out_dir))
    if not torch.cuda.is_available():
        rep.data["error"] = "no CUDA device"
        rep.save()
        print("cuda_check: no CUDA device", flush=True)
        return 2
    if not build(rep):
        return 1
    alive = correctness(rep, args.quick)
    if alive:
        compiled(rep)
        deterministic(rep)
        timing(rep, B=512 if args.quick else 1024, reps=3 if args.quick else 5)
    if alive and not args.no_sanitizer:  # last: slowest, and the least likely to matter if time runs out
        sanitizer(rep)
    rep.data["ok"] = rep.ok
    rep.save()
    n_ok = sum(c["ok"] for c in rep.data["checks"])
    print(f"cuda_check: {'PASS' if rep.ok else 'FAIL'} ({n_ok}/{len(rep.data['checks'])} checks) -> {rep.path}")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The cpu backend's targets, printed by one command: ``.venv/bin/python -m bench cpu-targets``.

Shape: B/16 head (K=32, H=8, D=512, d=64, tau=5), float32, ``llip_sigmoid_loss`` forward + backward.

- speed: ``cpu`` vs ``reference`` (target >= 4x) and vs ``torch`` (the chunked backend, target >= 1.5x) at
  Bi = Bt = 1024 (``--batch``);
- memory: peak RSS of each provider minus its baseline (after imports and inputs), each in a fresh subprocess
  (ru_maxrss never goes down, so one process per measurement); target cpu <= reference / 20;
- bounded memory: ``cpu`` at Bi = Bt = 4096 (``--big``, 0 to skip), its peak reported;
- efficiency: ``cpu``'s FLOP/s, counting the FLOPs of form 3 that it performs (``cpu_backend.flops``), over a large
  fp32 ``torch.mm`` measured in the same run; target >= 50%;
- bf16 (``--bf16``, on by default): ``cpu`` on bfloat16 inputs (its bf16 products where the CPU has them,
  ``cpu_backend.bf16_products``) against the float32 row of the same run (target >= 2x), and its FLOP/s over a
  bf16 ``torch.mm`` of the same run (target >= 50%).

Every provider runs on torch's default thread count (the cpu kernel follows it unless ``$LLIP_CPU_THREADS`` says
otherwise, see ``llip_kernels.backends.cpu.kernel_threads``); the yardstick matmul too. Timings on 2 shared cores are
noisy: each worker takes the best of ``--reps`` timed calls after one warm-up, and the ratios are what to read.
``--json PATH`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
K, H, d, TAU = 32, 8, 64, 5.0


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Restart the kernel's high-water mark (VmHWM) so that transients before the baseline (the float64
    generation of the inputs) do not hide the working memory; False where /proc does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(provider: str, batch: int, reps: int, dtype: str = "float32") -> dict:
    """Runs in its own process: time fwd+bwd of one provider, and its peak RSS above the baseline."""
    import torch

    import llip_kernels as lk
    from llip_kernels.backends import cpu as cpu_backend  # importing builds nothing
    from llip_kernels.testing import make_llip_inputs

    x = make_llip_inputs(batch, batch, H, K, d, tau=TAU, dtype=getattr(torch, dtype))
    if provider == "cpu":  # build / load the extension before the baseline: a one-off, not working memory
        cpu_backend.extension()
    import gc

    gc.collect()
    base = _status_mb("VmRSS") if _reset_peak() else None
    if base is None:  # no resettable high-water mark: ru_maxrss so far is the baseline
        base = _peak_rss_mb()

    def step():
        for t in x.tensors().values():
            t.grad = None
        loss = lk.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend=provider)
        loss.backward()
        return loss

    threads = cpu_backend.kernel_threads() if provider == "cpu" else torch.get_num_threads()
    times = []
    loss = None
    for i in range(reps + 1):  # the first call is a warm-up
        t0 = time.perf_counter()
        loss = step()
        if i > 0 or reps == 0:
            times.append(time.perf_counter() - t0)
    return {
        "provider": provider,
        "batch": batch,
        "seconds": min(times),
        "peak_mb": _peak_rss_mb() - base,
        "loss": float(loss.detach()),
        "threads": threads,
        "dtype": dtype,
        "bf16_products": provider == "cpu" and cpu_backend.bf16_products(x.k.dtype),
    }


def run_worker(provider: str, batch: int, reps: int, timeout: float, dtype: str = "float32") -> dict:
    cmd = [sys.executable, "-m", "bench.cpu_targets", "--worker", provider, "--batch", str(batch), "--reps", str(reps)]
    cmd += ["--dtype", dtype]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"provider": provider, "batch": batch, "error": f"timed out after {timeout:.0f} s"}
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        return {"provider": provider, "batch": batch, "error": " | ".join(tail) or f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def matmul_gflops(dtype: str = "float32") -> float:
    """The suite's yardstick (:func:`bench.common.matmul_tflops`, a 2048^3 ``torch.mm`` on the CPU) in GFLOP/s."""
    import torch

    from bench.common import matmul_tflops

    return matmul_tflops("cpu", getattr(torch, dtype))["tflops"] * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench cpu-targets", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--big", type=int, default=4096, help="batch of the bounded-memory run of cpu (0: skip)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--providers", nargs="+", default=["cpu", "torch", "reference"])
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="the bf16 rows (default on)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.reps, args.dtype)))
        return 0

    from llip_kernels.backends import cpu as cpu_backend

    B = args.batch
    fl = sum(cpu_backend.flops("sigmoid_loss", B, B, H, K, d, backward=bw) for bw in (False, True))
    rows = {}
    mm_before = matmul_gflops()
    mm16_before = matmul_gflops("bfloat16") if args.bf16 else 0.0
    for prov in args.providers:
        rows[prov] = run_worker(prov, B, args.reps, args.timeout)
        print(f"  {prov:>9} B={B}: {json.dumps(rows[prov])}", flush=True)
        if prov == "cpu" and args.bf16:  # right after the float32 run, so that the two see the same machine
            rows["cpu-bf16"] = run_worker("cpu", B, args.reps, args.timeout, "bfloat16")
            print(f"  {'cpu-bf16':>9} B={B}: {json.dumps(rows['cpu-bf16'])}", flush=True)
    big = run_worker("cpu", args.big, 0, args.timeout) if args.big else None
    if big:
        print(f"  {'cpu':>9} B={args.big}: {json.dumps(big)}", flush=True)
    mm = max(mm_before, matmul_gflops())  # yardstick measured before and after the runs, best of both
    mm16 = max(mm16_before, matmul_gflops("bfloat16")) if args.bf16 else 0.0

    def ok(r):
        return r is not None and "error" not in r

    cpu = rows.get("cpu")
    print(f"\nB/16 head (K={K}, H={H}, D={H * d}), fp32, llip_sigmoid_loss fwd+bwd, Bi = Bt = {B}")
    print(f"fp32 torch.mm (2048^3): {mm:.1f} GFLOP/s")
    if ok(cpu):
        for other, target in (("reference", 4.0), ("torch", 1.5)):
            r = rows.get(other)
            if ok(r):
                ratio = r["seconds"] / cpu["seconds"]
                verdict = "PASS" if ratio >= target else "FAIL"
                print(
                    f"speed   cpu vs {other:<9}: {ratio:6.2f}x  (target >= {target}x) {verdict}   "
                    f"[{cpu['seconds']:.2f} s vs {r['seconds']:.2f} s]"
                )
            elif r is not None:
                print(f"speed   cpu vs {other:<9}: n/a ({r['error']})")
        ref = rows.get("reference")
        if ok(ref):
            frac = cpu["peak_mb"] / max(ref["peak_mb"], 1e-9)
            verdict = "PASS" if frac <= 1 / 20 else "FAIL"
            print(
                f"memory  cpu / reference  : {frac:6.3f}   (target <= 0.050) {verdict}   "
                f"[{cpu['peak_mb']:.0f} MB vs {ref['peak_mb']:.0f} MB]"
            )
        gf = fl / cpu["seconds"] / 1e9
        verdict = "PASS" if gf >= 0.5 * mm else "FAIL"
        print(
            f"flops   cpu form 3       : {gf:6.1f} GFLOP/s = {100 * gf / mm:.0f}% of torch.mm (target >= 50%) "
            f"{verdict}   [{fl / 1e9:.0f} GFLOP fwd+bwd]"
        )
    elif cpu is not None:
        print(f"cpu failed: {cpu['error']}")
    bf = rows.get("cpu-bf16")
    if ok(bf) and ok(cpu):
        ratio = cpu["seconds"] / bf["seconds"]
        products = "bf16 products" if bf["bf16_products"] else "float32 products: no bf16 products on this CPU"
        print(f"bf16 torch.mm (2048^3): {mm16:.1f} GFLOP/s ({mm16 / mm:.2f}x fp32)")
        print(
            f"speed   cpu bf16 vs fp32 : {ratio:6.2f}x  (target >= 2.0x) {'PASS' if ratio >= 2.0 else 'FAIL'}   "
            f"[{bf['seconds']:.2f} s vs {cpu['seconds']:.2f} s; {products}]"
        )
        gf16 = fl / bf["seconds"] / 1e9
        print(
            f"flops   cpu bf16 form 3  : {gf16:6.1f} GFLOP/s = {100 * gf16 / mm16:.0f}% of bf16 torch.mm "
            f"(target >= 50%) {'PASS' if gf16 >= 0.5 * mm16 else 'FAIL'}"
        )
    elif bf is not None and not ok(bf):
        print(f"cpu bf16 failed: {bf['error']}")
    if big is not None:
        state = f"{big['peak_mb']:.0f} MB peak, {big['seconds']:.1f} s" if ok(big) else big["error"]
        print(f"bounded cpu at Bi = Bt = {args.big}: {state}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rows": rows, "big": big, "matmul_gflops": mm, "matmul_bf16_gflops": mm16, "flops": fl}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

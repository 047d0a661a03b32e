"""Compile every triton-backend kernel ahead of time for sm_90a (and sm_80) and print registers, spills, smem.

No GPU needed. Must run WITHOUT TRITON_INTERPRET (the interpreter replaces @triton.jit), e.g.

    env -u TRITON_INTERPRET .venv/bin/python -m bench compile-table [--quick] [--json out.json] [--md out.md]

For each paper config of docs/design.md section 2 (K, H, d) and dtype it compiles the launch configurations the
launcher uses at a large text batch (see ``llip_kernels.backends.triton.aot``): 13 kernels (3 forward modes, the
column pass of the softmax loss, and per mode the atomic and ordered image passes and the deterministic text
pass) x 5 configs x {bf16, fp32} x {sm_90a, sm_80} = 260. Exit status 1 when any kernel spills or exceeds the
chip's shared memory. ``--quick`` compiles the representative subset the test suite uses (QUICK below).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The test suite's subset, (config, dtype, arch) -> kernels (None: all 13). Every kernel of one config in both
# dtypes on sm_90a (B/16 is where the fp32 text pass used to spill), the largest head in bf16 (the training
# case), and on sm_80 the two cases that spilled before their tiles and register caps were set.
QUICK = {
    ("B/16", "bf16", 90): None,
    ("B/16", "fp32", 90): None,
    ("G/14", "bf16", 90): (
        "forward[op=sigmoid_loss]",
        "forward[op=softmax_loss,text-stationary]",
        "backward[op=sigmoid_loss,pass=atomic]",
        "backward[op=softmax_loss,pass=image]",
    ),
    ("G/14", "fp32", 80): ("backward[op=sigmoid_loss,pass=image]",),
    ("H/14", "bf16", 80): ("forward[op=sigmoid_loss]", "backward[op=sigmoid_loss,pass=atomic]"),
}


def _jobs(quick: bool, archs: list[int]):
    from llip_kernels.backends.triton.aot import PAPER_CONFIGS, launch_specs

    for name, (K, H, d) in PAPER_CONFIGS.items():
        for dname, dtype in DTYPES.items():
            for cap in archs:
                if quick and (name, dname, cap) not in QUICK:
                    continue
                for idx, spec in enumerate(launch_specs(H, K, d, dtype, capability=cap)):
                    wanted = QUICK[name, dname, cap] if quick else None
                    if wanted is None or spec.label in wanted:
                        yield name, K, H, d, dname, idx, cap


def _run(job):
    name, K, H, d, dname, idx, cap = job
    from llip_kernels.backends.triton.aot import compile_spec, launch_specs

    spec = launch_specs(H, K, d, DTYPES[dname], capability=cap)[idx]
    t0 = time.time()
    row = compile_spec(spec, DTYPES[dname], cap)
    return dict(config=name, K=K, H=H, d=d, compile_s=round(time.time() - t0, 2), **row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench compile-table", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset, for the test suite")
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 = sm_90a)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--md", help="write the table here as markdown")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: compiling needs the real Triton compiler", file=sys.stderr)
        return 2
    jobs = list(_jobs(args.quick, args.arch))
    print(
        f"{'config':6} {'dtype':5} {'arch':7} {'kernel':28} {'warps':>5} {'cap':>4} {'regs':>4} {'spill st/ld':>12} "
        f"{'smem KB':>8} ok",
        flush=True,
    )
    rows, bad = [], 0
    with ProcessPoolExecutor(args.workers) as pool:
        for r in pool.map(_run, jobs):  # in order, each printed as soon as it and those before it are done
            rows.append(r)
            ok = r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["smem_ok"]
            bad += not ok
            spills = f"{r['spill_stores']}/{r['spill_loads']}"
            print(
                f"{r['config']:6} {r['dtype']:5} {r['arch']:7} {r['kernel']:28} {r['num_warps']:>5} "
                f"{r['maxnreg'] or '-':>4} {r['registers']:>4} {spills:>12} {r['shared_bytes'] / 1024:>8.1f} "
                f"{'yes' if ok else 'NO'}",
                flush=True,
            )
    summary = f"{len(rows)} kernels, {bad} with spills or too much shared memory"
    print(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(_markdown(rows, summary))
    return 1 if bad else 0


def _markdown(rows: list[dict], summary: str) -> str:
    import triton

    lines = [
        "# Triton backend: ahead-of-time compile table",
        "",
        f"Made by `python -m bench compile-table` (triton {triton.__version__}, no GPU: `triton.compile` for the",
        "target, then `ptxas -v` for registers and spills) on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. cap: the register cap the launcher passes",
        "(`maxnreg`, '-' for none); smem limit 227 KB on sm_90a, 163 KB on sm_80.",
        "",
        f"**{summary}.**",
        "",
        "| config | dtype | arch | kernel | warps | cap | regs | spill st/ld (B) | smem KB | wgmma | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["smem_ok"]
        lines.append(
            f"| {r['config']} | {r['dtype']} | {r['arch']} | `{r['kernel']}` | {r['num_warps']} | "
            f"{r['maxnreg'] or '-'} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
            f"{r['shared_bytes'] / 1024:.1f} | {'yes' if r['wgmma'] else 'no'} | {'yes' if ok else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Compile every triton-backend kernel ahead of time for sm_90a (and sm_80) and print registers, spills, smem.

No GPU needed. Must run WITHOUT TRITON_INTERPRET (the interpreter replaces @triton.jit), e.g.

    env -u TRITON_INTERPRET .venv/bin/python bench/triton_compile_table.py [--quick] [--json out.json]

For each paper config of SPEC section 2 (K, H, d) and dtype it compiles the launch configurations the
launcher uses at a large text batch (see llip_kernels/triton_ops/_aot.py). Exit status 1 when any kernel
spills or exceeds the chip's shared memory. ``--quick`` compiles a subset (the largest head dim, both dtypes,
the forward and the two backward flavours of the sigmoid loss) for the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
QUICK_KERNELS = ("fwd_image[MODE=1]", "bwd_image[MODE=1,atomic]", "bwd_image[MODE=1,ordered]")


def _jobs(quick: bool, archs: list[int]):
    from llip_kernels.triton_ops._aot import PAPER_CONFIGS, launch_specs

    configs = {"G/14": PAPER_CONFIGS["G/14"]} if quick else PAPER_CONFIGS
    for name, (K, H, d) in configs.items():
        for dname, dtype in DTYPES.items():
            for cap in archs:
                for idx, spec in enumerate(launch_specs(H, K, d, dtype, capability=cap)):
                    if quick and spec.label not in QUICK_KERNELS:
                        continue
                    if quick and cap != 90 and (dname != "bf16" or spec.label != QUICK_KERNELS[1]):
                        continue
                    yield name, K, H, d, dname, idx, cap


def _run(job):
    name, K, H, d, dname, idx, cap = job
    from llip_kernels.triton_ops._aot import compile_spec, launch_specs

    spec = launch_specs(H, K, d, DTYPES[dname], capability=cap)[idx]
    t0 = time.time()
    row = compile_spec(spec, DTYPES[dname], cap)
    return dict(config=name, K=K, H=H, d=d, compile_s=round(time.time() - t0, 2), **row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset, for the test suite")
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 = sm_90a)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: compiling needs the real Triton compiler", file=sys.stderr)
        return 2
    jobs = list(_jobs(args.quick, args.arch))
    print(
        f"{'config':6} {'dtype':5} {'arch':7} {'kernel':28} {'warps':>5} {'regs':>4} {'spill st/ld':>12} "
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
                f"{r['registers']:>4} {spills:>12} {r['shared_bytes'] / 1024:>8.1f} {'yes' if ok else 'NO'}",
                flush=True,
            )
    print(f"{len(rows)} kernels, {bad} with spills or too much shared memory")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

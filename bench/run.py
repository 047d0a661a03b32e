"""Microbenchmarks from the command line: ``python -m bench run [--preset cpu|gpu|quick] [options]``.

Prints one line per (op, mode, provider, shape, dtype) as it is measured and writes the JSON result file
(format: :mod:`bench.harness`). Providers that cannot run here are listed as skipped with their reasons.

Presets (each a list of tables; the options below replace the preset's choices in every table):

- ``quick``: the tiny shape, every op, mode and provider (seconds; what the tests run).
- ``cpu``: (a) every op x mode x provider on B/16 at Bi = Bt = 128 (the compiled reference for the sigmoid
  loss only); (b) sigmoid loss fwd+bwd on all five paper configs at Bi = Bt = 64. Float32. About ten minutes
  on 2 idle cores.
- ``gpu``: (a) and (b) in bfloat16 at Bi = Bt = 4096, every provider.

Examples::

    python -m bench run --preset cpu --out bench/results/micro_cpu.json
    python -m bench run --configs B/16 L/14 --batch 512 --ops sigmoid_loss --modes fwd+bwd --providers reference torch
"""

from __future__ import annotations

import argparse
import shlex
import sys
from itertools import product
from pathlib import Path

import torch

from .common import CONFIGS, RESULTS
from .harness import TABLE_HEADER, fill_memory, fmt_row, run_cases, save, text_table
from .providers import MODES, OPS, POOLED_OPS, PROVIDERS, Case, applicable

COMMAND = "python -m bench run "  # recorded in the result file, as the way to reproduce it
ALL_PROVIDERS = list(PROVIDERS)
PAPER = ["B/32", "B/16", "L/14", "H/14", "G/14"]

# torch.compile costs tens of seconds per new graph on 2 cores, so the compiled reference runs in one table only.
NO_COMPILE = [p for p in ALL_PROVIDERS if p != "reference_compile"]
PRESETS: dict[str, list[dict]] = {
    "quick": [dict(configs=["tiny"], batch=[(16, 16)], ops=list(OPS), modes=list(MODES), providers=ALL_PROVIDERS)],
    # Bi = Bt = 256: the smallest batch where the per-image / per-text work of the fused backends stops
    # mattering on 2 cores (python -m bench scaling shows the per-pair cost flattening there), still seconds per row.
    "cpu": [
        dict(configs=["B/16"], batch=[(256, 256)], ops=["sigmoid_loss"], modes=list(MODES), providers=ALL_PROVIDERS),
        dict(
            configs=["B/16"],
            batch=[(256, 256)],
            ops=["logits", "softmax_loss", *POOLED_OPS],
            modes=list(MODES),
            providers=NO_COMPILE,
        ),
        dict(configs=PAPER, batch=[(128, 128)], ops=["sigmoid_loss"], modes=["fwd+bwd"], providers=NO_COMPILE),
    ],
    "gpu": [
        dict(configs=["B/16"], batch=[(4096, 4096)], ops=list(OPS), modes=list(MODES), providers=ALL_PROVIDERS),
        dict(configs=PAPER, batch=[(4096, 4096)], ops=["sigmoid_loss"], modes=["fwd+bwd"], providers=ALL_PROVIDERS),
    ],
}


def parse_batch(s: str) -> tuple[int, int]:
    """``"256"`` -> (256, 256); ``"256x1024"`` -> (Bi=256, Bt=1024)."""
    parts = s.lower().split("x")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[0]), int(parts[1])
    raise argparse.ArgumentTypeError(f"batch must be N or BixBt, got {s!r}")


def build_cases(args: argparse.Namespace) -> list[Case]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("gpu" if device == "cuda" else "cpu")
    dtype = args.dtype or ("bfloat16" if preset == "gpu" else "float32")
    cases: list[Case] = []
    for table in PRESETS[preset]:
        configs = args.configs or table["configs"]
        batch = args.batch or table["batch"]
        ops = args.ops or table["ops"]
        modes = args.modes or table["modes"]
        providers = args.providers or table["providers"]
        for op, mode, cfg, (bi, bt), prov in product(ops, modes, configs, batch, providers):
            if applicable(op, prov):
                case = Case(op, mode, prov, cfg, bi, bt, dtype, device)
                if case not in cases:
                    cases.append(case)
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench run", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu on a CUDA machine, else cpu")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="paper shapes (docs/design.md section 2)")
    p.add_argument("--batch", nargs="+", type=parse_batch, help="N (Bi = Bt = N) or BixBt; several for a sweep")
    p.add_argument("--ops", nargs="+", choices=list(OPS))
    p.add_argument("--modes", nargs="+", choices=list(MODES))
    p.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the whole run (CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (faster)")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timed work per row, at least")
    p.add_argument("--max-time", type=float, default=10.0, help="stop repeating a row after this many seconds")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the whole list this many times and pool the samples (evens out a shared machine)",
    )
    p.add_argument(
        "--fill-memory",
        metavar="JSON",
        help="only measure the missing peak memory of a saved result file's rows, in place "
        "(restricted by --providers / --modes / --ops / --configs when given)",
    )
    p.add_argument("--out", help="JSON result file (default bench/results/micro_<preset>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = argv if argv is not None else sys.argv[1:]
    if args.fill_memory:
        only = {"provider": args.providers, "mode": args.modes, "op": args.ops, "config": args.configs}
        fill_memory(args.fill_memory, only, COMMAND + " ".join(map(shlex.quote, given)))
        return 0
    cases = build_cases(args)
    if not cases:
        p.error("no (op, provider) pair applies: the pooled ops have only provider 'pooled', the Llip ops all others")
    preset = args.preset or ("gpu" if cases[0].device == "cuda" else "cpu")
    out = Path(args.out) if args.out else RESULTS / f"micro_{preset}.json"
    command = COMMAND + " ".join(shlex.quote(a) for a in given)

    print(text_table(TABLE_HEADER, []), flush=True)

    def progress(r, i, n, row):
        print(f"[round {r + 1}/{args.rounds}, {i + 1}/{n}] " + "  ".join(fmt_row(row)), flush=True)

    result = run_cases(
        cases,
        memory=not args.no_memory,
        timing=dict(min_time_s=args.min_time, max_time_s=args.max_time),
        command=command,
        progress=progress,
        rounds=args.rounds,
        partial_path=out,
    )
    save(result, out)
    print()
    for dt, mm in result["matmul"].items():
        print(f"yardstick: torch.mm {mm['n']}^3 {dt}: {mm['tflops'] * 1e3:.1f} GFLOP/s")
    print(text_table(TABLE_HEADER, [fmt_row(r) for r in result["rows"]]))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

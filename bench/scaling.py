"""Scaling curves: time and peak memory against batch size (Bi = Bt), per provider -> JSON + PNG.

``python -m bench scaling [--config B/16] [--op sigmoid_loss] [--mode fwd+bwd] [--providers ...]``

Each provider's batch doubles from ``--start`` until ``--max-batch``, or until it fails (out of memory), or the
next point is *predicted* (x4 pairs) to
pass ``--time-limit`` or ``--mem-limit`` GiB. The memory prediction protects a shared machine: the
reference materialises Bi * Bt * (H*K + D) numbers and its backward a few times that. Why each curve stopped is
recorded in the JSON (``stops``). A fused backend should show a flat time per pair and a peak memory that grows
like Bi + Bt, not Bi * Bt.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from .common import CONFIGS, DTYPES, RESULTS, matmul_tflops, run_metadata
from .harness import TABLE_HEADER, fmt_bytes, fmt_row, run_case, save, text_table
from .memory import measure_subprocess
from .providers import LLIP_OPS, MODES, PROVIDERS, Case, applicable

DEFAULT_PROVIDERS = ["reference", "reference_compile", "torch", "cpu", "triton", "cuda", "sdpa", "xformers"]


def sweep(provider: str, args, matmul: dict, device: str, progress=print) -> tuple[list[dict], str]:
    """One provider's curve: rows and the reason it stopped."""
    rows: list[dict] = []
    B = args.start
    while True:
        case = Case(args.op, args.mode, provider, args.config, B, B, args.dtype, device)
        row = run_case(
            case,
            matmul=matmul,
            memory=not args.no_memory,
            timing=dict(min_reps=3, min_time_s=0.5, max_time_s=args.time_limit),
        )
        progress(f"B={B:6d}  " + "  ".join(fmt_row(row)))
        if row["status"] != "ok":
            return rows + [row], f"{row['status']} at B={B}: " + "; ".join(row["reasons"])
        rows.append(row)
        secs = row["time_ms"]["median"] / 1e3
        if args.max_batch < 2 * B:
            return rows, f"reached --max-batch {args.max_batch}"
        if 4 * secs > args.time_limit:  # pairs grow 4x per doubling
            return rows, f"B={2 * B} predicted {4 * secs:.1f} s per call > --time-limit {args.time_limit} s"
        peak = row.get("peak_mem_bytes")
        if peak is not None and 4 * peak > args.mem_limit * 2**30:
            return rows, f"B={2 * B} predicted peak {fmt_bytes(4 * peak)} > --mem-limit {args.mem_limit} GiB"
        B *= 2


def plot(result: dict, path: Path) -> Path:
    """Three panels against Bi = Bt, one line per provider: time per call, time per (image, text) pair, and
    peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_c, ax_t, ax_m) = plt.subplots(1, 3, figsize=(15, 4.2))
    by_provider: dict[str, list[dict]] = {}
    for r in result["rows"]:
        if r["status"] == "ok":
            by_provider.setdefault(r["provider"], []).append(r)
    for prov, rows in sorted(by_provider.items()):
        B = [r["Bi"] for r in rows]
        ax_c.plot(B, [r["time_ms"]["median"] for r in rows], "o-", label=prov)
        ax_t.plot(B, [r["time_ms"]["median"] * 1e6 / (r["Bi"] * r["Bt"]) for r in rows], "o-", label=prov)
        mem = [(r["Bi"], r["peak_mem_bytes"]) for r in rows if r.get("peak_mem_bytes")]
        if mem:
            ax_m.plot([b for b, _ in mem], [m / 2**20 for _, m in mem], "o-", label=prov)
    m = result["meta"]
    s = result["setup"]
    title = f"{s['op']} {s['mode']}, {s['config']} (K{s['K']} H{s['H']} D{s['D']}), {s['dtype']}, {m['device_name']}"
    for ax, ylabel in (
        (ax_c, "ms per call (median)"),
        (ax_t, "ns per (image, text) pair"),
        (ax_m, "peak memory above inputs (MiB)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch Bi = Bt")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def remeasure_memory(path: Path, providers: list[str] | None, command: str) -> Path:
    """Measure peak memory again for the ``ok`` rows of a saved curve (all, or ``providers``' rows), in place,
    and redraw the plot; the file records when and by which command."""
    result = json.loads(path.read_text())
    for row in result["rows"]:
        if row["status"] == "ok" and (not providers or row["provider"] in providers):
            case = Case(**{f: row[f] for f in ("op", "mode", "provider", "config", "Bi", "Bt", "dtype", "device")})
            mem = measure_subprocess(case, threads=torch.get_num_threads())
            row["peak_mem_bytes"] = mem.get("peak_bytes")
            row["mem_method"] = mem.get("method", mem.get("error"))
            print(
                f"{row['provider']} B={row['Bi']}: {fmt_bytes(row['peak_mem_bytes'])} ({row['mem_method']})", flush=True
            )
    result["meta"].setdefault("memory_remeasured", []).append(
        {"timestamp": run_metadata("cpu")["timestamp"], "command": command}
    )
    save(result, path)
    plot(result, path.with_suffix(".png"))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="B/16", choices=list(CONFIGS))
    p.add_argument("--op", default="sigmoid_loss", choices=list(LLIP_OPS) + ["pooled_sigmoid_loss"])
    p.add_argument("--mode", default="fwd+bwd", choices=list(MODES))
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS))
    p.add_argument("--dtype", choices=list(DTYPES))
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--start", type=int, default=128)
    p.add_argument("--max-batch", type=int, help="default 4096 on CPU, 65536 on GPU")
    p.add_argument("--time-limit", type=float, help="seconds per call; default 5 on CPU, 2 on GPU")
    p.add_argument("--mem-limit", type=float, help="GiB; default 4 on CPU (a shared machine), 100 on GPU")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the whole run (CPU)")
    p.add_argument(
        "--remeasure-memory",
        metavar="JSON",
        help="only measure peak memory again for the rows of a "
        "saved curve (restricted to --providers if given), then redraw its plot",
    )
    p.add_argument("--out", help="JSON path (default bench/results/scaling_<cpu|gpu>.json; the PNG beside it)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = argv if argv is not None else sys.argv[1:]
    command = "python -m bench scaling " + " ".join(shlex.quote(a) for a in given)
    if args.remeasure_memory:
        remeasure_memory(Path(args.remeasure_memory), args.providers, command)
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.max_batch = args.max_batch or (65536 if gpu else 4096)
    args.time_limit = args.time_limit or (2.0 if gpu else 5.0)
    args.mem_limit = args.mem_limit or (100.0 if gpu else 4.0)
    providers = args.providers or (["pooled"] if args.op.startswith("pooled") else DEFAULT_PROVIDERS)
    providers = [pr for pr in providers if applicable(args.op, pr)]

    cfg = CONFIGS[args.config]
    result = {
        "meta": run_metadata(device, command),
        "matmul": {args.dtype: matmul_tflops(device, DTYPES[args.dtype])},
        "setup": dict(
            op=args.op,
            mode=args.mode,
            config=args.config,
            K=cfg.K,
            H=cfg.H,
            D=cfg.D,
            dtype=args.dtype,
            time_limit_s=args.time_limit,
            mem_limit_gib=args.mem_limit,
            max_batch=args.max_batch,
        ),
        "rows": [],
        "stops": {},
    }
    print(text_table(TABLE_HEADER, []), flush=True)
    for prov in providers:
        rows, why = sweep(prov, args, result["matmul"], device, progress=lambda s: print(s, flush=True))
        result["rows"] += rows
        result["stops"][prov] = why
        print(f"  {prov}: stopped: {why}", flush=True)
    out = save(result, args.out or RESULTS / f"scaling_{'gpu' if gpu else 'cpu'}.json")
    png = plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write ``bench/results/REPORT.md`` from the saved result files: ``python -m bench report``.

Reads (whichever exist) ``NOTES.md`` (hand-written findings and caveats, placed first), ``micro_cpu.json``,
``scaling_cpu.json`` (+ ``.png``), ``e2e_cpu.json`` and their ``_gpu`` twins under ``bench/results/``.
Every table names the command that produced it and the machine, versions and git revision it ran on.
Speed-ups are ratios of rows measured side by side in the same run (the only comparison that survives noisy
shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .common import RESULTS
from .harness import fmt_bytes, markdown_table

MODE_ORDER = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _meta_line(result: dict) -> str:
    m = result["meta"]
    mm = "; ".join(f"torch.mm {v['n']}^3 {k}: {v['tflops'] * 1e3:.0f} GFLOP/s" for k, v in result["matmul"].items())
    line = (
        f"Measured {m['timestamp']} on {m['device_name']} ({m['cpu_threads']} torch threads), torch {m['torch']}, "
        f"triton {m['triton']}, Python {m['python']}, git {m['git']}. Yardstick in the same run: {mm}.\n\n"
        f"Reproduce: `{m['command']}`"
    )
    # Peak memory measured afterwards, by a separate command (python -m bench run --fill-memory / python -m bench
    # scaling --remeasure-memory), and free-text notes recorded in the file.
    for cmd in m.get("memory_filled_by", []):
        line += f"; peak memory: `{cmd}`"
    for entry in m.get("memory_remeasured", []):
        line += f"; peak memory re-measured {entry['timestamp']}: `{entry['command']}`"
    if m.get("note"):
        line += f"\n\nNote: {m['note']}"
    return line


def _skipped(rows: list[dict]) -> str:
    """Each provider's distinct reasons for not running (``softmax needs Bi == Bt`` rows are left out)."""
    seen: dict[str, list[str]] = {}
    for r in rows:
        why = f"{r['status']}: " + "; ".join(r["reasons"])
        if r["status"] != "ok" and "needs Bi == Bt" not in why and why not in seen.setdefault(r["provider"], []):
            seen[r["provider"]].append(why)
    return "\n".join(f"- `{p}`: " + " / ".join(whys) for p, whys in seen.items() if whys)


def micro_section(result: dict) -> str:
    rows = result["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    ref = {
        (r["op"], r["mode"], r["config"], r["Bi"], r["Bt"], r["dtype"]): r["time_ms"]["median"]
        for r in ok
        if r["provider"] == "reference"
    }
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault((r["config"], r["Bi"], r["Bt"], r["dtype"]), []).append(r)
    parts = [
        "### Microbenchmarks",
        _meta_line(result),
        "Columns: median and interquartile range of the time per call; GFLOP/s of the algebraic form the "
        "provider computes (docs/design.md section 4; `flop_form` in the JSON); effective GFLOP/s = form-1 FLOPs "
        "/ time (comparable across algorithms); % of the matmul yardstick (form used); peak memory of one call "
        "above the inputs (fresh process, peak RSS); x ref = reference time / this time, same run.",
    ]
    for (cfg, bi, bt, dt), grp in groups.items():
        grp.sort(key=lambda r: (r["op"], MODE_ORDER[r["mode"]], r["time_ms"]["median"]))
        table = []
        for r in grp:
            t = r["time_ms"]
            base = ref.get((r["op"], r["mode"], cfg, bi, bt, dt))
            table.append(
                [
                    r["op"],
                    r["mode"],
                    r["provider"],
                    f"{t['median']:.2f}",
                    f"{t['p25']:.2f}-{t['p75']:.2f}",
                    f"{r['tflops'] * 1e3:.1f}",
                    f"{r['tflops_effective'] * 1e3:.1f}",
                    "-" if r["frac_matmul"] is None else f"{100 * r['frac_matmul']:.1f}%",
                    fmt_bytes(r["peak_mem_bytes"]),
                    "-" if base is None or r["op"].startswith("pooled") else f"{base / t['median']:.2f}",
                ]
            )
        c = grp[0]
        parts.append(f"**{cfg}** (K {c['K']}, H {c['H']}, D {c['D']}), Bi = {bi}, Bt = {bt}, {dt}")
        parts.append(
            markdown_table(
                [
                    "op",
                    "mode",
                    "provider",
                    "median ms",
                    "IQR ms",
                    "GFLOP/s",
                    "eff. GFLOP/s",
                    "% matmul",
                    "peak mem",
                    "x ref",
                ],
                table,
            )
        )
    skipped = _skipped(rows)
    if skipped:
        parts.append("Not run on this machine:\n\n" + skipped)
    return "\n\n".join(parts)


def scaling_section(result: dict, png: Path, report_dir: Path) -> str:
    s = result["setup"]
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    batches = sorted({r["Bi"] for r in ok})
    provs = list(dict.fromkeys(r["provider"] for r in ok))
    cell = {(r["provider"], r["Bi"]): r for r in ok}
    time_rows, mem_rows = [], []
    for p in provs:
        time_rows.append(
            [p] + [f"{cell[p, b]['time_ms']['median'] * 1e6 / b**2:.0f}" if (p, b) in cell else "-" for b in batches]
        )
        mem_rows.append([p] + [fmt_bytes(cell[p, b]["peak_mem_bytes"]) if (p, b) in cell else "-" for b in batches])
    header = ["provider"] + [f"B={b}" for b in batches]
    parts = [
        f"### Scaling: {s['op']} {s['mode']}, {s['config']} (K {s['K']}, H {s['H']}, D {s['D']}), {s['dtype']}",
        _meta_line(result),
    ]
    if png.exists():
        parts.append(f"![scaling]({os.path.relpath(png, report_dir)})")
    parts += [
        "Time per (image, text) pair, ns (flat = the cost is all pair work):",
        markdown_table(header, time_rows),
        "Peak memory of one call above the inputs:",
        markdown_table(header, mem_rows),
        "Why each curve stops:\n\n" + "\n".join(f"- `{p}`: {why}" for p, why in result["stops"].items()),
    ]
    return "\n\n".join(parts)


def e2e_section(result: dict) -> str:
    table = []
    for r in result["rows"]:
        if r["status"] != "ok":
            table.append([r["setup"], r["model"], r["backend"], str(r["batch"]), r["status"], "", ""])
            continue
        t = r["time_ms"]
        table.append(
            [
                r["setup"],
                r["model"],
                r["backend"],
                str(r["batch"]),
                f"{t['median']:.0f}",
                f"{t['p25']:.0f}-{t['p75']:.0f}",
                f"{r.get('vs_siglip', float('nan')):.2f}x",
            ]
        )
    overrides = "; ".join(f"{r['setup']}: {r['overrides']}" for r in result["rows"] if r["kind"] == "siglip")
    return "\n\n".join(
        [
            "### End to end: training step, Llip vs SigLIP (identical towers)",
            _meta_line(result),
            "One step = both towers forward, loss, backward, AdamW step. Tower reductions used here "
            f"(same widths and mixer sizes as the named config): {overrides or 'none'}.",
            markdown_table(["setup", "model", "loss backend", "batch", "step ms", "IQR ms", "vs SigLIP"], table),
        ]
    )


def build_report(results: Path = RESULTS, out: Path | None = None) -> Path:
    out = out or results / "REPORT.md"
    notes = results / "NOTES.md"
    parts = [
        "## Performance",
        *([notes.read_text().strip()] if notes.exists() else []),
        "All numbers below come from the JSON files beside this report "
        "(`bench/results/`) and were produced by the command printed under each table. "
        "Regenerate the report with `python -m bench report`; compare a new run against a saved one with "
        "`python -m bench compare NEW.json bench/results/micro_cpu.json --threshold 0.15`.",
    ]
    for dev in ("cpu", "gpu"):
        found = False
        for name, section in (("micro", micro_section), ("e2e", e2e_section)):
            res = _load(results / f"{name}_{dev}.json")
            if res is not None:
                if not found:
                    parts.append(f"## {'CPU' if dev == 'cpu' else 'GPU'}")
                    found = True
                parts.append(section(res))
                if name == "micro":
                    sc = _load(results / f"scaling_{dev}.json")
                    if sc is not None:
                        parts.append(scaling_section(sc, results / f"scaling_{dev}.png", out.parent))
    out.write_text("\n\n".join(parts) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--out")
    args = p.parse_args(argv)
    out = build_report(Path(args.results), Path(args.out) if args.out else None)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regression guard: ``python -m bench compare NEW.json BASELINE.json [--threshold 0.15]``.

Matches the rows of two result files (:mod:`bench.harness` format) on (op, mode, provider, config, Bi, Bt, H,
K, d, dtype, device), prints a table of baseline vs new time and their ratio, and exits

- 1 when any matched row is slower than ``baseline * (1 + threshold)`` (on the chosen statistic), or a row
  that ran in the baseline now fails (``error``/``oom``), or, with ``--mem-threshold``, its peak memory grew
  beyond that fraction;
- 2 when no row matches at all (a guard that compares nothing must not pass silently);
- 0 otherwise. Rows skipped in either file, or present in only one, are listed but do not fail the run.

Compare files measured on the same machine; on shared CPUs prefer ``--stat min`` and a generous threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEY_FIELDS = ("op", "mode", "provider", "config", "Bi", "Bt", "H", "K", "d", "dtype", "device")


def row_key(row: dict) -> tuple:
    return tuple(row.get(f) for f in KEY_FIELDS)


def load_rows(path: str | Path) -> dict[tuple, dict]:
    data = json.loads(Path(path).read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    return {row_key(r): r for r in rows}


def compare(
    new: dict[tuple, dict],
    base: dict[tuple, dict],
    threshold: float,
    stat: str = "median",
    mem_threshold: float | None = None,
) -> tuple[list[dict], int]:
    """Per-row verdicts and the exit code (see module doc)."""
    verdicts = []
    matched = 0
    failed = False
    for key in sorted(set(base) | set(new), key=lambda k: tuple(str(x) for x in k)):
        b, n = base.get(key), new.get(key)
        v = {"key": key, "base_ms": None, "new_ms": None, "ratio": None, "verdict": ""}
        if b is None or n is None:
            v["verdict"] = "only in baseline" if n is None else "only in new"
        elif b["status"] != "ok":
            v["verdict"] = f"baseline {b['status']}"
        elif n["status"] != "ok":
            v["base_ms"] = b["time_ms"][stat]
            if n["status"] in ("error", "oom"):
                v["verdict"], failed = f"FAIL: now {n['status']}", True
            else:
                v["verdict"] = f"new {n['status']}"
        else:
            matched += 1
            v["base_ms"], v["new_ms"] = b["time_ms"][stat], n["time_ms"][stat]
            v["ratio"] = v["new_ms"] / v["base_ms"] if v["base_ms"] > 0 else float("inf")
            v["verdict"] = "ok"
            if v["ratio"] > 1 + threshold:
                v["verdict"], failed = f"FAIL: {100 * (v['ratio'] - 1):.0f}% slower", True
            elif v["ratio"] < 1 / (1 + threshold):
                v["verdict"] = f"faster ({100 * (1 - v['ratio']):.0f}%)"
            bm, nm = b.get("peak_mem_bytes"), n.get("peak_mem_bytes")
            if mem_threshold is not None and bm and nm is not None and nm > bm * (1 + mem_threshold):
                v["verdict"], failed = f"FAIL: peak memory {nm / bm:.2f}x", True
        verdicts.append(v)
    if matched == 0:
        return verdicts, 2
    return verdicts, 1 if failed else 0


def format_table(verdicts: list[dict], stat: str) -> str:
    header = [
        "op",
        "mode",
        "provider",
        "shape",
        "dtype",
        "device",
        f"base {stat} ms",
        f"new {stat} ms",
        "new/base",
        "verdict",
    ]
    rows = []
    for v in verdicts:
        op, mode, prov, cfg, bi, bt, _h, _k, _d, dtype, dev = v["key"]
        rows.append(
            [
                op,
                mode,
                prov,
                f"{cfg} Bi{bi} Bt{bt}",
                dtype,
                dev,
                "-" if v["base_ms"] is None else f"{v['base_ms']:.3f}",
                "-" if v["new_ms"] is None else f"{v['new_ms']:.3f}",
                "-" if v["ratio"] is None else f"{v['ratio']:.2f}",
                v["verdict"],
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench compare", description=__doc__.split("\n\n")[0])
    p.add_argument("new", help="result JSON of the run under test")
    p.add_argument("baseline", help="saved result JSON to compare against")
    p.add_argument("--threshold", type=float, default=0.15, help="allowed slowdown as a fraction (0.15 = 15%%)")
    p.add_argument("--stat", choices=["median", "min", "p25", "p75"], default="median")
    p.add_argument("--mem-threshold", type=float, help="also fail when peak memory grows by more than this fraction")
    args = p.parse_args(argv)
    if args.threshold < 0:
        p.error("--threshold must be >= 0")
    verdicts, code = compare(
        load_rows(args.new), load_rows(args.baseline), args.threshold, args.stat, args.mem_threshold
    )
    print(format_table(verdicts, args.stat))
    fails = sum(v["verdict"].startswith("FAIL") for v in verdicts)
    if code == 2:
        print("\nno row of the new file matches a measured row of the baseline: nothing compared")
    else:
        print(
            f"\n{fails} regression(s) beyond {100 * args.threshold:.0f}%"
            if fails
            else f"\nno regression beyond {100 * args.threshold:.0f}%"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Run benchmark cases into result rows, and result files into readable tables.

A result file is JSON: ``{"meta": run_metadata, "matmul": {dtype: yardstick}, "rows": [row, ...]}``; a row
holds the case (op, mode, provider, config, Bi, Bt, H, K, d, D, dtype, device), ``status`` (``ok``,
``skipped``, ``oom`` or ``error``) with ``reasons``, and for ``ok`` rows ``time_ms`` (median, p25, p75, min,
max, n), ``flop_form``, ``flops``, ``tflops`` (of the form used), ``tflops_effective`` (form-1 FLOPs / time),
``frac_matmul`` (``tflops`` over the same run's large-matmul FLOP/s, same device and dtype),
``frac_matmul_effective``, ``peak_mem_bytes`` and ``mem_method`` (memory may be None when not measured).
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict
from pathlib import Path

import torch

from .common import DTYPES, Timing, matmul_tflops, measure, run_metadata
from .memory import measure_cuda, measure_subprocess
from .providers import Case, Unavailable, build, flop_model

ROW_METRICS = (
    "time_ms",
    "flop_form",
    "flops",
    "tflops",
    "tflops_effective",
    "frac_matmul",
    "frac_matmul_effective",
    "peak_mem_bytes",
    "mem_method",
)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(e).lower()


def case_row(case: Case) -> dict:
    c = case.cfg
    row = asdict(case)
    row.update(H=c.H, K=c.K, d=c.d, D=c.D, tau=c.tau)
    return row


def time_case(case: Case, timing: dict | None = None) -> Timing | dict:
    """The case's :class:`Timing`, or a failed row (``skipped`` with reasons, ``oom`` or ``error``): a provider
    that cannot run never raises."""
    row = case_row(case)
    try:
        built = build(case)
        return measure(built.fn, built.setup, device=case.device, **(timing or {}))
    except Unavailable as e:
        return {**row, "status": "skipped", "reasons": e.reasons}
    except Exception as e:  # one broken provider must not end the run
        status = "oom" if _is_oom(e) else "error"
        return {**row, "status": status, "reasons": [f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"]}
    finally:
        built = None
        gc.collect()
        if case.device == "cuda":
            torch.cuda.empty_cache()


def run_case(case: Case, *, matmul: dict[str, dict], memory: bool = True, timing: dict | None = None) -> dict:
    """Measure one case into a row (see module doc). ``matmul`` maps dtype name -> :func:`matmul_tflops`."""
    t = time_case(case, timing)
    return t if isinstance(t, dict) else finish_row(case, t, matmul, memory)


def finish_row(case: Case, t: Timing, matmul: dict[str, dict], memory: bool) -> dict:
    """A measured row: time statistics, FLOP model and rates, and (``memory``) the peak memory."""
    row = case_row(case)
    fm = flop_model(case)
    secs = t.median * 1e-3
    peak = matmul.get(case.dtype, {}).get("tflops")
    tflops = fm["flops"] / secs / 1e12
    eff = fm["flops_form1"] / secs / 1e12
    row.update(
        status="ok",
        reasons=[],
        time_ms=t.as_dict(),
        flop_form=fm["form"],
        flops=fm["flops"],
        flops_form1=fm["flops_form1"],
        tflops=tflops,
        tflops_effective=eff,
        frac_matmul=tflops / peak if peak else None,
        frac_matmul_effective=eff / peak if peak else None,
        peak_mem_bytes=None,
        mem_method=None,
    )
    if memory:
        mem = _measure_memory(case)
        if "error" in mem:
            row["mem_method"] = mem["error"]
        else:
            row["peak_mem_bytes"], row["mem_method"] = mem["peak_bytes"], mem["method"]
    return row


def fill_memory(path: str | Path, only: dict[str, list] | None = None, command: str | None = None) -> Path:
    """Measure peak memory for the ``ok`` rows of a saved result file that lack it (restricted to rows whose
    fields take the listed values, e.g. ``{"mode": ["fwd+bwd"]}``), saving after each row, so that a long CPU
    run can time first and measure memory afterwards."""
    path = Path(path)
    result = json.loads(path.read_text())
    todo = [
        r
        for r in result["rows"]
        if r["status"] == "ok"
        and r.get("peak_mem_bytes") is None
        and all(r[f] in vals for f, vals in (only or {}).items() if vals)
    ]
    for i, row in enumerate(todo):
        case = Case(**{f: row[f] for f in ("op", "mode", "provider", "config", "Bi", "Bt", "dtype", "device")})
        mem = _measure_memory(case)
        row["peak_mem_bytes"], row["mem_method"] = mem.get("peak_bytes"), mem.get("method", mem.get("error"))
        print(f"[{i + 1}/{len(todo)}] " + "  ".join(fmt_row(row)), flush=True)
        save(result, path)
    result["meta"].setdefault("memory_filled_by", []).append(command)
    save(result, path)
    return path


def _measure_memory(case: Case) -> dict:
    if case.device == "cuda":
        try:
            built = build(case)
            out = measure_cuda(built)
            del built
            return out
        except Exception as e:
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    return measure_subprocess(case, threads=torch.get_num_threads())


def run_cases(
    cases: list[Case],
    *,
    memory: bool = True,
    timing: dict | None = None,
    command: str | None = None,
    progress=None,
    matmul_n: int | None = None,
    rounds: int = 1,
    partial_path: str | Path | None = None,
) -> dict:
    """Measure every case plus the matmul yardstick of each (device, dtype) used, in one process
    (``matmul_n``: its square size; default 2048 on CPU, 8192 on GPU).

    ``rounds > 1`` measures the whole list that many times and pools each case's samples, so that load from
    other processes, which comes and goes, falls on every provider alike (the side-by-side ratios are what a
    shared machine can measure). The yardstick is measured once per round; the best round is kept.
    ``progress(round, i, n, row)`` is called after each measurement with the samples pooled so far; with
    ``partial_path`` the rows so far (no memory yet, ``meta.partial`` true) are saved after every measurement."""
    devices = sorted({c.device for c in cases}) or ["cpu"]
    meta = run_metadata(devices[0], command)
    meta["rounds"] = rounds
    dtypes = sorted({c.dtype for c in cases})
    yardsticks: dict[str, list[dict]] = {dt: [] for dt in dtypes}
    samples: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    failed: dict[int, dict] = {}
    for r in range(rounds):
        for dt in dtypes:
            yardsticks[dt].append(matmul_tflops(devices[0], DTYPES[dt], matmul_n))
        for i, case in enumerate(cases):
            if i in failed:
                continue
            t = time_case(case, timing)
            if isinstance(t, dict):
                failed[i] = t
            else:
                samples[i] += t.samples
            if progress is not None:
                progress(r, i, len(cases), failed.get(i) or _provisional(case, samples[i]))
            if partial_path is not None:  # an interrupted run still leaves its measurements behind
                save(_collect(cases, meta | {"partial": True}, yardsticks, samples, failed, False), partial_path)
    return _collect(cases, meta, yardsticks, samples, failed, memory)


def _collect(cases, meta, yardsticks, samples, failed, memory: bool) -> dict:
    matmul = {dt: max(ys, key=lambda y: y["tflops"]) for dt, ys in yardsticks.items()}
    rows = [
        failed[i] if i in failed else finish_row(case, Timing.from_samples(samples[i]), matmul, memory)
        for i, case in enumerate(cases)
        if i in failed or samples[i]
    ]
    return {"meta": meta, "matmul": matmul, "rows": rows}


def _provisional(case: Case, samples: list[float]) -> dict:
    """A row for progress output, before memory and the final yardstick are known."""
    return finish_row(case, Timing.from_samples(samples), {}, memory=False)


def save(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


# ---- readable output ----------------------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_row(row: dict) -> list[str]:
    shape = f"{row['config']} Bi{row['Bi']} Bt{row['Bt']}"
    head = [row["op"], row["mode"], row["provider"], shape, row["dtype"]]
    if row["status"] != "ok":
        return head + [row["status"] + ": " + "; ".join(row["reasons"])[:60], "", "", "", "", ""]
    t = row["time_ms"]
    frac = row["frac_matmul"]
    return head + [
        f"{t['median']:.3f}",
        f"{t['p25']:.3f}-{t['p75']:.3f}",
        f"{row['tflops'] * 1e3:.1f}",
        f"{row['tflops_effective'] * 1e3:.1f}",
        "-" if frac is None else f"{100 * frac:.1f}%",
        fmt_bytes(row["peak_mem_bytes"]),
    ]


TABLE_HEADER = [
    "op",
    "mode",
    "provider",
    "shape",
    "dtype",
    "median ms",
    "IQR ms",
    "GFLOP/s",
    "eff. GFLOP/s",
    "% matmul",
    "peak mem",
]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join(out)

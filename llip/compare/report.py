"""The tables and plots of ``llip compare``: markdown tables of means, standard deviations and paired differences
from SigLIP with 95% intervals; bar charts, ablation curves and the zero-shot temperature sweep with error bars."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

BASELINE = "siglip"  # the kind the paired differences are taken against (llip/compare/study.py)

MAIN_COLUMNS = (
    ("image_to_text_R@1", "I->T R@1"),
    ("text_to_image_R@1", "T->I R@1"),
    ("image_to_text_R@5", "I->T R@5"),
    ("text_to_image_R@5", "T->I R@5"),
    ("zero_shot_colour_top1", "ZS colour"),
    ("zero_shot_shape_top1", "ZS shape"),
    ("zero_shot_count_top1", "ZS count"),
)
PROBE_COLUMNS = (
    ("probe_multi_R@1", "multi R@1"),
    ("probe_multi_mean_rank", "multi mean rank"),
    ("probe_single_R@1", "single R@1"),
    ("probe_single_mean_rank", "single mean rank"),
    ("probe_gap_R@1", "R@1 gap (multi - single)"),
)


def _cell(d: dict) -> str:
    return f"{d['mean']:.1f}" if d["sd"] is None else f"{d['mean']:.1f} ± {d['sd']:.1f}"


def _difference(v: dict | None) -> str:
    if v is None:
        return "n/a"
    low, high = v["ci95"]
    return f"{v['mean']:+.1f} [{low:+.1f}, {high:+.1f}]" + ("*" if v["significant"] else "")


def markdown_table(summary: dict, columns=MAIN_COLUMNS, names=None, timing: bool = True) -> str:
    """Mean ± standard deviation over the seeds per model (``names``: these rows, in this order); then the paired
    differences from SigLIP with their 95% intervals, marked * where the interval excludes 0."""
    names = list(summary) if names is None else names
    chance_of = {}
    for name in names:
        chance_of.update(summary[name]["chance"])
    tail = " final loss | step time (ms) |" if timing else ""
    lines = ["| model | seeds | " + " | ".join(label for _, label in columns) + " |" + tail,
             "|" + "---|" * (len(columns) + 2 + 2 * timing)]  # fmt: skip
    for name in names:
        m = summary[name]["metrics"]
        cells = [_cell(m[key]) if key in m else "n/a" for key, _ in columns]
        row = f"| {name} | {len(summary[name]['seeds'])} | " + " | ".join(cells) + " |"
        if timing:
            row += f" {m['final_loss']['mean']:.4f} | {1000 * m['step_time_s']['mean']:.0f} |"
        lines.append(row)
    chance = [f"{chance_of[key]:.1f}" if key in chance_of else "" for key, _ in columns]
    lines.append("| chance | | " + " | ".join(chance) + " |" + (" | |" if timing else ""))
    diffs = [(n, summary[n].get("vs_" + BASELINE)) for n in names if summary[n].get("vs_" + BASELINE)]
    if any(d.get(key) is not None for _, d in diffs for key, _ in columns):
        lines += ["", f"Paired difference from {BASELINE} (same seeds), mean [95% interval]; * : the interval "
                  "excludes 0", "", "| model | " + " | ".join(label for _, label in columns) + " |",
                  "|" + "---|" * (len(columns) + 1)]  # fmt: skip
        for name, d in diffs:
            lines.append(f"| {name} - {BASELINE} | " + " | ".join(_difference(d.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def scored(row: dict) -> dict[str, float]:
    """A run's evaluation and probe metrics, one dict (percent; the probe's mean ranks in places)."""
    return {**row["eval"], **row.get("probe", {})}


def varied_fields(runs: dict) -> list[str]:
    """The config fields some run of the study overrides (its ablations)."""
    return sorted({k for by_seed in runs.values() for row in by_seed.values() for k in row.get("overrides", {})})


def _ablation_rows(runs: dict, field: str) -> list[tuple[object, str]]:
    """``[(value, run name)]`` of the Llip runs that vary ``field``, sorted by value; the plain run stands for the
    config's own value."""
    import llip

    rows = []
    for name, by_seed in runs.items():
        overrides = next(iter(by_seed.values())).get("overrides", {})
        if field in overrides:
            rows.append((overrides[field], name))
        elif not overrides and name.startswith("llip-"):
            rows.append((getattr(llip.get_config(name), field), name))
    return sorted(rows, key=lambda r: r[0])


def markdown_report(summary: dict, runs: dict) -> str:
    """Every table of a study: the models (the main metrics), the caption-diversity probe, each ablation, and the
    zero-shot temperature sweep."""
    plain = [n for n in summary if " " not in n]
    parts = ["## Models", "", markdown_table(summary, names=plain)]
    if any("probe_multi_R@1" in summary[n]["metrics"] for n in summary):
        probed = [n for n in summary if "probe_multi_R@1" in summary[n]["metrics"]]
        parts += ["", "## Caption-diversity probe (llip/compare/probe.py)", "",
                  markdown_table(summary, PROBE_COLUMNS, probed, timing=False)]  # fmt: skip
    for field in varied_fields(runs):
        names = [name for _, name in _ablation_rows(runs, field)]
        columns = MAIN_COLUMNS + PROBE_COLUMNS[:2]
        parts += ["", f"## Ablation: {field}", "", markdown_table(summary, columns, names), "",
                  _paired_from_first(runs, names, columns), "", _trend_row(runs, field, columns)]  # fmt: skip
    swept = [n for n in summary if "zero_shot_tau" in summary[n]]
    if swept:
        taus = list(summary[swept[0]]["zero_shot_tau"])
        parts += ["", "## Zero-shot top-1 against the evaluation tau (mean ± sd over seeds)", "",
                  "| model | task | " + " | ".join(f"tau {float(t):g}" for t in taus) + " |",
                  "|" + "---|" * (len(taus) + 2)]  # fmt: skip
        for name in swept:
            sweep = summary[name]["zero_shot_tau"]
            for task in sweep[taus[0]]:
                parts.append(f"| {name} | {task} | " + " | ".join(_cell(sweep[t][task]) for t in taus) + " |")
    return "\n".join(parts)


def _paired_from_first(runs: dict, names: list[str], columns) -> str:
    """Each ablation row's paired difference (same seeds) from the first row, with its 95% interval."""
    from ..stats import paired_difference

    def per_seed(name: str, key: str) -> dict[int, float]:
        by_seed = {int(s): scored(r) for s, r in runs[name].items()}
        return {s: v[key] for s, v in by_seed.items() if key in v}

    base = names[0]
    head = "| model | " + " | ".join(label for _, label in columns) + " |"
    lines = [f"Paired difference from {base} (same seeds), mean [95% interval]; * : the interval excludes 0", "",
             head, "|" + "---|" * (len(columns) + 1)]  # fmt: skip
    for name in names[1:]:
        cells = [_difference(paired_difference(per_seed(name, key), per_seed(base, key))) for key, _ in columns]
        lines.append(f"| {name} - {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _trend_row(runs: dict, field: str, columns) -> str:
    """The least-squares trend of each metric over the ablation's runs (every seed a point), per doubling of the
    field where its values span a factor of 8 or more (K), else per unit (tau), with 95% intervals."""
    from ..stats import linear_trend

    rows = _ablation_rows(runs, field)
    values = [v for v, _ in rows]
    log = all(isinstance(v, (int, float)) and v > 0 for v in values) and max(values) / min(values) >= 8
    unit = f"per doubling of {field}" if log else f"per unit of {field}"
    cells = []
    for key, _ in columns:
        xs, ys = [], []
        for value, name in rows:
            for r in runs[name].values():
                metrics = scored(r)
                if key in metrics:
                    xs.append(math.log2(value) if log else float(value))
                    ys.append(metrics[key])
        trend = linear_trend(xs, ys)
        if trend is None:
            cells.append("n/a")
        else:
            low, high = trend["ci95"]
            cells.append(f"{trend['slope']:+.2f} [{low:+.2f}, {high:+.2f}]" + ("*" if trend["significant"] else ""))
    return "\n".join([f"Least-squares trend {unit} over every run (seeds as replicates), slope [95% interval]", "",
                      "| | " + " | ".join(label for _, label in columns) + " |", "|" + "---|" * (len(columns) + 1),
                      f"| {unit} | " + " | ".join(cells) + " |"])  # fmt: skip


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


ABLATION_METRICS = (
    ("image_to_text_R@1", "I->T R@1"),
    ("text_to_image_R@5", "T->I R@5"),
    ("zero_shot_colour_top1", "ZS colour"),
    ("zero_shot_count_top1", "ZS count"),
    ("probe_multi_mean_rank", "probe multi mean rank (lower: better)"),
)


def plot_ablation(runs: dict, summary: dict, field: str, size: str, path: Path) -> None:
    """One panel per metric: the mean over seeds against the value of ``field`` with the 95% interval of the mean
    as error bars; SigLIP's mean (dashed) where the study has it."""
    plt = _pyplot()
    rows = _ablation_rows(runs, field)
    fig, axes = plt.subplots(1, len(ABLATION_METRICS), figsize=(4 * len(ABLATION_METRICS), 3.6))
    baseline = summary.get(f"{BASELINE}-{size}")
    for ax, (key, label) in zip(axes, ABLATION_METRICS):
        xs, ys, errs = [], [], []
        for value, name in rows:
            d = summary[name]["metrics"].get(key)
            if d is not None:
                xs.append(value)
                ys.append(d["mean"])
                errs.append(0.0 if d["ci95"] is None else d["ci95"][1] - d["mean"])
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=f"llip-{size}")
        if baseline is not None and key in baseline["metrics"]:
            ax.axhline(baseline["metrics"][key]["mean"], color="k", linestyle="--", linewidth=0.8, label="siglip")
        if all(isinstance(x, (int, float)) and x > 0 for x in xs) and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel(field)
        ax.set_title(label if "rank" in key else f"{label} (%)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Llip ablation over {field}: mean over seeds, 95% interval of the mean")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tau_sweep(runs: dict, path: Path) -> None:
    """Zero-shot top-1 against the evaluation tau, one panel per task, one line per Llip model (mean and sd)."""
    plt = _pyplot()
    swept = {n: [r["zero_shot_tau"] for r in by_seed.values() if "zero_shot_tau" in r] for n, by_seed in runs.items()}
    swept = {n: s for n, s in swept.items() if s}
    tasks = list(next(iter(next(iter(swept.values()))[0].values())))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6))
    for ax, task in zip(axes, tasks):
        for name, sweeps in swept.items():
            taus = list(sweeps[0])
            values = [[sw[t][task] for sw in sweeps] for t in taus]
            means = [statistics.fmean(v) for v in values]
            sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar([float(t) for t in taus], means, yerr=sds, marker="o", capsize=3, label=name)
        ax.set_xlabel("evaluation tau")
        ax.set_title(f"zero-shot {task} top-1 (%)")
        ax.legend(fontsize=7)
    fig.suptitle("Zero-shot accuracy against the mixer temperature used at evaluation (mean, sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(runs: dict, summary: dict, path: Path) -> None:
    """Bars of the mean with the standard deviation as error bars, dotted chance levels, the mean training loss
    over the seeds against the step, and the step time."""
    plt = _pyplot()
    names = [n for n in summary if " " not in n]  # the models; ablation variants have their own plots
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    groups = (
        (("image_to_text_R@1", "text_to_image_R@1"), "retrieval R@1 (%)"),
        (("zero_shot_colour_top1", "zero_shot_shape_top1", "zero_shot_count_top1"), "zero-shot top-1 (%)"),
    )
    for ax, (keys, title) in zip(axes[:2], groups):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            m = summary[name]["metrics"]
            ax.bar([j + i * width for j in range(len(keys))], [m[k]["mean"] if k in m else 0.0 for k in keys], width,
                   yerr=[(m[k]["sd"] or 0.0) if k in m else 0.0 for k in keys], capsize=3, label=name)  # fmt: skip
        for j, k in enumerate(keys):
            c = summary[names[0]]["chance"].get(k, 0.0)
            ax.hlines(c, j - width / 2, j + width * (len(names) - 0.5), colors="k", linestyles="dotted")
        labels = [k.replace("zero_shot_", "").replace("_top1", "").replace("image_to_text", "I->T")
                  .replace("text_to_image", "T->I").replace("_R@", " R@") for k in keys]  # fmt: skip
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))], labels)
        ax.set_title(title + " (mean, sd; dotted: chance)")
        ax.legend()
    for name in names:
        curves = [r["losses"] for r in runs[name].values()]
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        axes[2].plot(range(1, n + 1), mean, label=name, linewidth=0.8)
    axes[2].set_title("training loss, mean over seeds (each model's own loss)")
    axes[2].set_xlabel("step")
    axes[2].set_yscale("log")
    axes[2].legend()
    axes[3].bar(names, [1000 * summary[n]["metrics"]["step_time_s"]["mean"] for n in names])
    axes[3].set_title("median step time (ms), mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

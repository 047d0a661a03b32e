"""``llip compare``: CLIP, SigLIP and Llip (and the register / avg ablations) trained with identical towers, data,
steps, batch and lr on the built-in scenes, over one or more seeds; then a table (markdown + JSON) and a plot.

The towers are those of ``<kind>-<size>`` (the configs share them per size); only the head and the loss differ.
Seed ``s`` gives every model the same data order and the same tower initialisation, so two models are compared
seed by seed: the table reports each model's mean and standard deviation over the seeds, and each model's paired
difference from SigLIP with its 95% interval (llip/stats.py).

Runs live in ``OUTPUT/<model>/seed<s>/`` and their results in ``OUTPUT/results.json``, written after every run:
``resume=True`` keeps the runs already there (same setup), continues an interrupted one from its last checkpoint
and trains the rest, so a study can be run in parts.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .errors import UsageError
from .stats import describe, paired_difference
from .train.loop import TrainConfig, train
from .train.metrics import read_metrics

COLUMNS = (
    ("image_to_text_R@1", "I->T R@1"),
    ("text_to_image_R@1", "T->I R@1"),
    ("image_to_text_R@5", "I->T R@5"),
    ("text_to_image_R@5", "T->I R@5"),
    ("zero_shot_colour_top1", "ZS colour"),
    ("zero_shot_shape_top1", "ZS shape"),
    ("zero_shot_count_top1", "ZS count"),
)
BASELINE = "siglip"  # the paired differences are taken against this kind


def compare(
    *,
    size: str = "tiny",
    kinds=("clip", "siglip", "llip"),
    steps: int = 600,
    batch_size: int = 128,
    lr: float | None = None,
    warmup: int = 60,
    workers: int = 1,
    seed: int = 0,
    seeds: int = 1,
    eval_images: int = 500,
    output: str = "runs/compare",
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
) -> dict:
    """Train each kind with seeds ``seed .. seed + seeds - 1``; write ``results.json``, ``results.md`` and
    ``compare.png`` under ``output``; return the summary (:func:`summarize`). Runs already in ``output`` are
    refused unless ``overwrite`` (retrain them) or ``resume`` (keep them)."""
    if overwrite and resume:
        raise UsageError("--overwrite and --resume exclude each other")
    out = Path(output)
    setup = {"size": size, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
             "eval_images": eval_images}  # fmt: skip
    runs = _previous_runs(out, setup) if resume else {}
    for s in range(seed, seed + seeds):
        for kind in kinds:
            name = f"{kind}-{size}"
            if str(s) in runs.get(name, {}):
                print(f"compare: {name} seed {s}: kept from {out / 'results.json'}")
                continue
            folder = out / name / f"seed{s}"
            cfg = TrainConfig(model=name, batch_size=batch_size, steps=steps, lr=lr, warmup=warmup, workers=workers,
                              seed=s, eval_images=eval_images, output=str(folder), save_every=max(1, steps // 4),
                              keep=1, progress=progress, tensorboard=False, overwrite=overwrite,
                              resume="auto" if resume and (folder / "config.json").exists() else None)  # fmt: skip
            runs.setdefault(name, {})[str(s)] = _run_row(train(cfg), folder)
            (out / "results.json").write_text(json.dumps({"setup": setup, "runs": runs}, indent=2))
    summary = summarize(runs, size)
    (out / "results.json").write_text(json.dumps({"setup": setup, "runs": runs, "summary": summary}, indent=2))
    table = markdown_table(summary)
    (out / "results.md").write_text(table + "\n")
    print(table)
    plot(runs, summary, out / "compare.png")
    return summary


def _previous_runs(out: Path, setup: dict) -> dict:
    """The runs of an earlier ``compare`` into ``out``, refused if it used another setup."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    previous = json.loads(path.read_text())
    if previous.get("setup") != setup:
        differ = sorted(k for k in setup if previous.get("setup", {}).get(k) != setup[k])
        raise UsageError(f"cannot resume {out}: its runs used other settings ({', '.join(differ)}); "
                         "use another --output")  # fmt: skip
    return previous.get("runs", {})


def _run_row(result: dict, folder: Path) -> dict:
    records = read_metrics(folder)
    times = [r["step_time"] for r in records[len(records) // 10 :]]  # skip the warm-up tenth
    return {
        "eval": {k: v for k, (v, _) in result["eval"].items()},
        "chance": {k: c for k, (_, c) in result["eval"].items()},
        "final_loss": result["loss"],
        "step_time_s": statistics.median(times),
        "losses": [r["loss"] for r in records],
    }


def summarize(runs: dict, size: str) -> dict:
    """Per model: ``n`` seeds, and per metric (the eval metrics, ``final_loss``, ``step_time_s``) the
    :func:`~llip.stats.describe` of its values; per model other than the baseline, ``vs_siglip``: the paired
    difference of every eval metric (None with fewer than two common seeds)."""
    baseline = runs.get(f"{BASELINE}-{size}", {})
    summary = {}
    for name, by_seed in runs.items():
        rows = list(by_seed.values())
        metrics = {key: describe([r["eval"][key] for r in rows]) for key in rows[0]["eval"]}
        for key in ("final_loss", "step_time_s"):
            metrics[key] = describe([r[key] for r in rows])
        entry = {"seeds": sorted(int(s) for s in by_seed), "metrics": metrics, "chance": rows[0]["chance"]}
        if baseline and name != f"{BASELINE}-{size}":
            entry["vs_" + BASELINE] = {
                key: paired_difference(
                    {int(s): r["eval"][key] for s, r in by_seed.items()},
                    {int(s): r["eval"][key] for s, r in baseline.items()},
                )
                for key in metrics
                if key in rows[0]["eval"]
            }
        summary[name] = entry
    return summary


def _cell(d: dict) -> str:
    return f"{d['mean']:.1f}" if d["sd"] is None else f"{d['mean']:.1f} ± {d['sd']:.1f}"


def markdown_table(summary: dict) -> str:
    """Mean ± standard deviation over the seeds per model; then the paired differences from SigLIP with their 95%
    intervals, marked * where the interval excludes 0."""
    first = next(iter(summary.values()))
    head = "| model | seeds | " + " | ".join(label for _, label in COLUMNS) + " | final loss | step time (ms) |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for name, entry in summary.items():
        m = entry["metrics"]
        cells = [_cell(m[key]) if key in m else "n/a" for key, _ in COLUMNS]
        loss, step = m["final_loss"], m["step_time_s"]
        lines.append(f"| {name} | {len(entry['seeds'])} | " + " | ".join(cells)
                     + f" | {loss['mean']:.4f} | {1000 * step['mean']:.0f} |")  # fmt: skip
    chance = [f"{first['chance'].get(key, float('nan')):.1f}" for key, _ in COLUMNS]
    lines.append("| chance | | " + " | ".join(chance) + " | | |")
    diffs = [(name, e["vs_" + BASELINE]) for name, e in summary.items() if e.get("vs_" + BASELINE)]
    if any(any(v is not None for v in d.values()) for _, d in diffs):
        lines += ["", f"Paired difference from {BASELINE} (same seeds), mean [95% interval]; * : the interval "
                  "excludes 0", "", "| model | " + " | ".join(label for _, label in COLUMNS) + " |",
                  "|" + "---|" * (len(COLUMNS) + 1)]  # fmt: skip
        for name, d in diffs:
            cells = []
            for key, _ in COLUMNS:
                v = d.get(key)
                if v is None:
                    cells.append("n/a")
                else:
                    low, high = v["ci95"]
                    cells.append(f"{v['mean']:+.1f} [{low:+.1f}, {high:+.1f}]" + ("*" if v["significant"] else ""))
            lines.append(f"| {name} - {BASELINE} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict, summary: dict, path: Path) -> None:
    """Bars of the mean with the standard deviation as error bars, dotted chance levels, the mean training loss
    over the seeds against the step, and the step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
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

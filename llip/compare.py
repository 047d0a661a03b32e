"""``llip compare``: CLIP, SigLIP and Llip trained with identical towers, data, steps, batch, lr and seed on the
built-in scenes, then one table (markdown + JSON) and one plot.

The towers are those of ``<kind>-<size>`` (the configs share them per size); only the head and the loss differ.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

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
    eval_images: int = 500,
    output: str = "runs/compare",
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train each kind, write ``results.md``, ``results.json`` and ``compare.png`` under ``output``. Runs already
    in ``output`` are refused unless ``overwrite`` (see :mod:`llip.train.run_folder`)."""
    out = Path(output)
    rows = {}
    for kind in kinds:
        name = f"{kind}-{size}"
        cfg = TrainConfig(
            model=name,
            batch_size=batch_size,
            steps=steps,
            lr=lr,
            warmup=warmup,
            workers=workers,
            seed=seed,
            eval_images=eval_images,
            output=str(out / name),
            save_every=steps,
            keep=1,
            progress=progress,
            tensorboard=False,
            overwrite=overwrite,
        )
        result = train(cfg)
        records = read_metrics(out / name)
        times = [r["step_time"] for r in records[len(records) // 10 :]]  # skip the warm-up tenth
        rows[name] = {
            "eval": {k: v for k, (v, _) in result["eval"].items()},
            "chance": {k: c for k, (_, c) in result["eval"].items()},
            "final_loss": result["loss"],
            "step_time_s": statistics.median(times),
            "losses": [r["loss"] for r in records],
        }
    setup = {
        "size": size,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "seed": seed,
        "eval_images": eval_images,
    }
    (out / "results.json").write_text(json.dumps({"setup": setup, "runs": rows}, indent=2))
    table = markdown_table(rows)
    (out / "results.md").write_text(table + "\n")
    print(table)
    plot(rows, out / "compare.png")
    return rows


def markdown_table(rows: dict) -> str:
    first = next(iter(rows.values()))
    head = "| model | " + " | ".join(label for _, label in COLUMNS) + " | final loss | step time (ms) |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for name, row in rows.items():
        cells = [f"{row['eval'].get(key, float('nan')):.1f}" for key, _ in COLUMNS]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {row['final_loss']:.4f} | {1000 * row['step_time_s']:.0f} |"
        )
    chance = [f"{first['chance'].get(key, float('nan')):.1f}" for key, _ in COLUMNS]
    lines.append("| chance | " + " | ".join(chance) + " | | |")
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (keys, title) in zip(
        axes[:2],
        (
            (("image_to_text_R@1", "text_to_image_R@1"), "retrieval R@1 (%)"),
            (("zero_shot_colour_top1", "zero_shot_shape_top1", "zero_shot_count_top1"), "zero-shot top-1 (%)"),
        ),
    ):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar(
                [j + i * width for j in range(len(keys))],
                [rows[name]["eval"].get(k, 0.0) for k in keys],
                width,
                label=name,
            )
        chance = [rows[names[0]]["chance"].get(k, 0.0) for k in keys]
        for j, c in enumerate(chance):
            ax.hlines(c, j - width / 2, j + width * (len(names) - 0.5), colors="k", linestyles="dotted")
        ax.set_xticks(
            [j + width * (len(names) - 1) / 2 for j in range(len(keys))],
            [
                k.replace("zero_shot_", "")
                .replace("_top1", "")
                .replace("image_to_text", "I->T")
                .replace("text_to_image", "T->I")
                for k in keys
            ],
        )
        ax.set_title(title + " (dotted: chance)")
        ax.legend()
    for name in names:
        axes[2].plot(range(1, len(rows[name]["losses"]) + 1), rows[name]["losses"], label=name, linewidth=0.8)
    axes[2].set_title("training loss (each model's own loss)")
    axes[2].set_xlabel("step")
    axes[2].set_yscale("log")
    axes[2].legend()
    axes[3].bar(names, [1000 * rows[n]["step_time_s"] for n in names])
    axes[3].set_title("median step time (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

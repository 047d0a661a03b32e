"""``llip compare``: CLIP, SigLIP and Llip (and the register / avg ablations) trained with identical towers, data,
steps, batch and lr on the built-in scenes, over one or more seeds; then tables (markdown + JSON) and plots.

The towers are those of ``<kind>-<size>`` (the configs share them per size); only the head and the loss differ.
Seed ``s`` gives every model the same data order and the same tower initialisation, so two models are compared
seed by seed: the table reports each model's mean and standard deviation over the seeds, and each model's paired
difference from SigLIP with its 95% interval (llip/stats.py).

``vary=("K", [1, 4, 16, 32])`` trains each kind once per value of a model config field (an ablation): the run
named ``llip-tiny K=4``; the config's own value keeps the plain name, so those runs are shared with a plain
comparison in the same folder. Every run is also scored by the caption-diversity probe and, for Llip, the
zero-shot temperature sweep (llip/compare/probe.py), computed from its final checkpoint.

Runs live in ``OUTPUT/<model>/seed<s>/`` and their results in ``OUTPUT/results.json``, written after every run:
``resume=True`` keeps the runs already there (same setup), continues an interrupted one from its last checkpoint,
adds the probe and sweep to kept runs that lack them, and trains the rest, so a study can be run in parts.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..errors import UsageError
from ..stats import describe, paired_difference
from ..train.loop import TrainConfig, train
from ..train.metrics import read_metrics
from .report import BASELINE, markdown_report, plot, plot_ablation, plot_tau_sweep, scored, varied_fields


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
    vary: tuple[str, list] | None = None,
    output: str = "runs/compare",
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
) -> dict:
    """Train each kind (at each value of ``vary``) with seeds ``seed .. seed + seeds - 1``; write ``results.json``,
    ``results.md``, ``compare.png`` (and ``ablation_<field>.png``, ``zero_shot_tau.png``) under ``output``; return
    the summary (:func:`summarize`). Runs already in ``output`` are refused unless ``overwrite`` (retrain them) or
    ``resume`` (keep them)."""
    if overwrite and resume:
        raise UsageError("--overwrite and --resume exclude each other")
    variants = _variants(size, kinds, vary)
    out = Path(output)
    setup = {"size": size, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
             "eval_images": eval_images}  # fmt: skip
    runs = _previous_runs(out, setup) if resume else {}
    extra = _ExtraEvals(eval_images)
    for s in range(seed, seed + seeds):
        for name, (model, overrides, folder_name) in variants.items():
            folder = out / folder_name / f"seed{s}"
            kept = runs.get(name, {}).get(str(s))
            if kept is not None:
                print(f"compare: {name} seed {s}: kept from {out / 'results.json'}")
                if "probe" not in kept:  # a run from before the probe: score its final checkpoint
                    kept.update(extra(folder))
                    _write(out, setup, runs)
                continue
            cfg = TrainConfig(model=model, overrides=dict(overrides), batch_size=batch_size, steps=steps, lr=lr,
                              warmup=warmup, workers=workers, seed=s, eval_images=eval_images, output=str(folder),
                              save_every=max(1, steps // 4), keep=1, progress=progress, tensorboard=False,
                              overwrite=overwrite,
                              resume="auto" if resume and (folder / "config.json").exists() else None)  # fmt: skip
            row = _run_row(train(cfg), folder)
            row.update(extra(folder))
            row["overrides"] = dict(overrides)
            runs.setdefault(name, {})[str(s)] = row
            _write(out, setup, runs)
    summary = summarize(runs, size)
    _write(out, setup, runs, summary)
    report = markdown_report(summary, runs)
    (out / "results.md").write_text(report + "\n")
    print(report)
    plot(runs, summary, out / "compare.png")
    for field in varied_fields(runs):
        plot_ablation(runs, summary, field, size, out / f"ablation_{field}.png")
    if any("zero_shot_tau" in row for by_seed in runs.values() for row in by_seed.values()):
        plot_tau_sweep(runs, out / "zero_shot_tau.png")
    return summary


def _variants(size: str, kinds, vary: tuple[str, list] | None) -> dict[str, tuple[str, dict, str]]:
    """``{run name: (model name, config overrides, folder name)}`` for every kind and value of ``vary``; the
    config's own value keeps the plain model name (and folder)."""
    import llip

    variants = {}
    for kind in kinds:
        model = f"{kind}-{size}"
        config = llip.get_config(model)  # an unknown kind or size: a ValueError naming the registered models
        if vary is None:
            variants[model] = (model, {}, model)
            continue
        field, values = vary
        if not hasattr(config, field) or field == "name":
            raise UsageError(f"--vary {field}: not a field of the {model} config")
        for value in values:
            llip.get_config(model, **{field: value})  # a value the config refuses: refused before any training
            if value == getattr(config, field):
                variants[model] = (model, {}, model)
            else:
                variants[f"{model} {field}={value}"] = (model, {field: value}, f"{model}-{field}{value}")
    return variants


def _write(out: Path, setup: dict, runs: dict, summary: dict | None = None) -> None:
    saved = {"setup": setup, "runs": runs}
    if summary is not None:
        saved["summary"] = summary
    (out / "results.json").write_text(json.dumps(saved, indent=2))


class _ExtraEvals:
    """The probe and the tau sweep of a run folder's final checkpoint, with the evaluation sets built once."""

    def __init__(self, eval_images: int):
        self.eval_images = eval_images
        self.sets: dict[tuple, tuple[dict, dict]] = {}

    def __call__(self, folder: Path) -> dict:
        import llip

        from ..data import builtin
        from ..eval_command import load_model
        from ..train.checkpoint import find_resume
        from .probe import caption_diversity_probe, probe_set, zero_shot_tau_sweep

        model, _ = load_model(find_resume(str(folder), folder, what="compare"), "cpu", None)
        tokenizer = llip.tokenizer_for(model.config)
        key = (model.image_size, model.config.tokenizer, model.config.context_length)
        if key not in self.sets:
            transform = llip.image_transform(model.image_size, train=False)
            self.sets[key] = (
                probe_set(model.image_size, transform, tokenizer, self.eval_images),
                builtin.eval_set(model.image_size, transform, tokenizer, n_images=self.eval_images),
            )
        pset, evalset = self.sets[key]
        probe = caption_diversity_probe(model, pset)
        extra = {"probe": {k: v for k, (v, _) in probe.items()}, "probe_chance": {k: c for k, (_, c) in probe.items()}}
        if model.kind == "llip":
            extra["zero_shot_tau"] = zero_shot_tau_sweep(model, evalset, tokenizer)
        return extra


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
    """Per model: its ``seeds``, and per metric (the eval and probe metrics, ``final_loss``, ``step_time_s``) the
    :func:`~llip.stats.describe` of its values over the seeds; ``chance`` per metric; per model other than the
    baseline, ``vs_siglip``: the paired difference of every eval and probe metric (None with fewer than two common
    seeds); for Llip runs, ``zero_shot_tau``: ``{tau: {task: describe}}``. Metrics that only some seeds have (the
    probe of a study that is being filled in) are summarised over the seeds that have them."""
    baseline = {int(s): scored(r) for s, r in runs.get(f"{BASELINE}-{size}", {}).items()}
    summary = {}
    for name, by_seed in runs.items():
        per_seed = {int(s): scored(r) for s, r in by_seed.items()}
        keys = list(dict.fromkeys(k for values in per_seed.values() for k in values))
        metrics = {k: describe([v[k] for v in per_seed.values() if k in v]) for k in keys}
        for key in ("final_loss", "step_time_s"):
            metrics[key] = describe([r[key] for r in by_seed.values()])
        chance = {}
        for r in by_seed.values():
            chance.update({**r["chance"], **r.get("probe_chance", {})})
        entry = {"seeds": sorted(per_seed), "metrics": metrics, "chance": chance}
        if baseline and name != f"{BASELINE}-{size}":
            entry["vs_" + BASELINE] = {
                k: paired_difference(
                    {s: v[k] for s, v in per_seed.items() if k in v}, {s: v[k] for s, v in baseline.items() if k in v}
                )
                for k in keys
            }
        sweeps = [r["zero_shot_tau"] for r in by_seed.values() if "zero_shot_tau" in r]
        if sweeps:
            entry["zero_shot_tau"] = {
                tau: {task: describe([sw[tau][task] for sw in sweeps]) for task in by_task}
                for tau, by_task in sweeps[0].items()
            }
        summary[name] = entry
    return summary

"""Zero-shot and retrieval evaluation on the built-in validation scenes, with the chance level of each metric."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import builtin
from ..eval_tasks import retrieval_chance


@torch.no_grad()
def evaluate_builtin(model, evalset: dict, tokenizer, *, backend: str | None = None, batch_size: int = 256) -> dict:
    """``{metric: (result, chance)}`` in percent: zero-shot top-1 per task, retrieval R@1/5/10 both ways."""
    from .. import evaluation  # the model package's evaluation helpers

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images, tokens = evalset["images"].to(device), evalset["tokens"].to(device)
    try:
        results: dict[str, tuple[float, float]] = {}
        for task, (classnames, templates) in builtin.zero_shot_tasks().items():
            classifier = evaluation.build_zero_shot_classifier(
                model, tokenizer, classnames, templates, batch_size=batch_size
            )
            acc = evaluation.zero_shot_accuracy(
                model, classifier, images, evalset["labels"][task].to(device), batch_size=batch_size, backend=backend
            )
            results[f"zero_shot_{task}_top1"] = (_pct(acc["top1"]), 100.0 / len(classnames))
        retrieval = evaluation.retrieval_metrics(
            model,
            images,
            tokens,
            evalset["caption_to_image"].to(device),
            batch_size=batch_size,
            backend=backend,
        )
        chance = retrieval_chance(evalset["caption_to_image"], len(evalset["images"]))
        for key, value in chance.items():
            results[key] = (_pct(retrieval[key]), value)
        return results
    finally:
        model.train(was_training)


def _pct(x: float) -> float:
    """The evaluation helpers return fractions in [0, 1]; tables are in percent."""
    return 100.0 * float(x)


def format_table(results: dict[str, tuple[float, float]]) -> str:
    """A small aligned table: metric, result, chance (all in percent)."""
    width = max(len(k) for k in results)
    lines = [f"{'metric':<{width}}  {'result':>7}  {'chance':>7}", "-" * (width + 18)]
    lines += [f"{k:<{width}}  {v:7.2f}  {c:7.2f}" for k, (v, c) in results.items()]
    return "\n".join(lines)


def evaluate_checkpoint(path: str, *, eval_images: int = 500, backend: str | None = None, device: str = "auto") -> dict:
    """Rebuild the model a checkpoint was trained with, load its weights, evaluate on the built-in scenes. ``path``:
    a checkpoint file, or a run folder (its newest checkpoint)."""
    import llip

    from ..eval_command import load_model
    from .checkpoint import find_resume
    from .placement import pick_device

    model, _ = load_model(find_resume(str(path), Path(path), what="llip eval"), pick_device(device), backend)
    tokenizer = llip.tokenizer_for(model.config)
    evalset = builtin.eval_set(
        model.image_size, llip.image_transform(model.image_size, train=False), tokenizer, n_images=eval_images
    )
    return evaluate_builtin(model, evalset, tokenizer, backend=backend)

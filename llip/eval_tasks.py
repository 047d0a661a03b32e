"""Evaluating a model on the user's data: zero-shot classification of an image folder and image-text retrieval on
held-out pairs, each at one or several Llip mixer temperatures; ``llip eval --zeroshot/--data`` and ``llip train
--val-zeroshot/--val-data`` both run these.

Results are percentages. A :class:`SweepResult` holds one row per temperature (``{"tau": 5.0, "top1": 41.7, ...}``;
``tau`` is None for the pooled CLIP/SigLIP kinds), the chance level of each metric and what was evaluated.
The official Llip evaluation sweeps tau over {1, 3, 5, 8, 10}: the mixer's sharpness can be chosen after training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import evaluation
from .data.skips import SkipLog
from .errors import DataError, UsageError
from .eval_data import (
    ImageFolder,
    RetrievalSet,
    check_retrieval_source,
    class_names,
    labelled_batches,
    read_retrieval_set,
    read_templates,
    scan_image_folder,
)

TOP5_MIN_CLASSES = 5  # top-5 is reported only where it is not trivially 100%
# retrieval_metrics' order: R@1, R@5, R@10 image->text, then text->image
_RECALL_ORDER = [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in evaluation.RECALL_AT]


@dataclass
class ZeroShotTask:
    """An image folder with its class names (in label order) and prompt templates, checked up front."""

    folder: ImageFolder
    classnames: list[str]
    templates: list[str]
    classnames_spec: str | None  # None (folder names), "imagenet" or the file they came from
    templates_spec: str  # "imagenet", "simple" or the file they came from


def prepare_zero_shot(root: str, classnames: str | None, templates: str, *, prefix: str = "") -> ZeroShotTask:
    """Scan ``root`` and read the class names and templates (see :mod:`llip.eval_data`); every error names the
    option, ``--<prefix>zeroshot`` and so on (``prefix="val-"`` for ``llip train``)."""
    folder = scan_image_folder(root, what=f"--{prefix}zeroshot")
    names = class_names(folder, classnames, what=f"--{prefix}classnames")
    templates_list = read_templates(templates, what=f"--{prefix}templates")
    return ZeroShotTask(folder, names, templates_list, classnames, templates)


@dataclass
class SweepResult:
    """One evaluation's rows (one per tau, metrics in percent), chance levels and description."""

    task: str  # "zeroshot" or "retrieval"
    rows: list[dict]  # [{"tau": float | None, metric: percent, ...}]
    chance: dict[str, float]  # metric -> percent
    info: dict = field(default_factory=dict)  # what was evaluated: paths, counts, skips

    @property
    def metrics(self) -> list[str]:
        return list(self.chance)

    @property
    def ranked_by(self) -> str:
        return "top1" if self.task == "zeroshot" else "mean recall"

    def score(self, row: dict) -> float:
        """What :meth:`best` ranks by: top-1 for zero-shot; for retrieval the mean recall over both directions
        and all k (the retrieval literature's R-sum, divided by 6), so no single k or direction decides."""
        if self.task == "zeroshot":
            return row["top1"]
        return sum(row[m] for m in self.metrics) / len(self.metrics)

    def best(self) -> dict:
        """The best row by :meth:`score` (zero-shot ties broken by top-5); the first (lowest tau) on a tie."""
        return max(self.rows, key=lambda r: (self.score(r), r.get("top5", 0.0)))

    def to_json(self) -> dict:
        return {**self.info, "results": self.rows, "chance": self.chance, "best": self.best()}


def _taus_for(model, taus: list[float] | None) -> list[float | None]:
    """The temperatures to evaluate: the given ones, or the model's own; pooled kinds have none."""
    if model.kind != "llip":
        return [None]
    return list(taus) if taus else [model.tau]


def evaluate_zero_shot(
    model,
    tokenizer: Callable,
    task: ZeroShotTask,
    transform: Callable,
    skips: SkipLog,
    *,
    taus: list[float] | None = None,
    backend: str | None = None,
    batch_size: int = 256,
    workers: int = 0,
) -> SweepResult:
    """Top-1 (and top-5 with at least 5 classes) of the template-averaged classifier on every readable image of
    the folder, at each tau. Images are decoded ``batch_size`` at a time (bounded memory), each encoded once."""
    skipped_before = skips.total
    classifier = evaluation.build_zero_shot_classifier(
        model, tokenizer, task.classnames, task.templates, batch_size=batch_size
    )
    batches = _CountedBatches(
        labelled_batches(
            task.folder.samples, transform, task.folder.root, skips, batch_size=batch_size, workers=workers
        )
    )
    taus = _taus_for(model, taus)
    try:
        accuracy = evaluation.zero_shot_accuracy_sweep(
            model, classifier, batches, taus, batch_size=batch_size, backend=backend
        )
    except ValueError:
        if batches.count:
            raise
        n = len(task.folder.samples)
        raise DataError(f"{task.folder.root}: none of its {n} image files decodes (see the warnings)") from None
    C = len(task.classnames)
    keys = ["top1", "top5"] if C >= TOP5_MIN_CLASSES else ["top1"]
    rows = [{"tau": tau, **{k: 100.0 * accuracy[tau][k] for k in keys}} for tau in taus]
    chance = {"top1": 100.0 / C, "top5": 100.0 * TOP5_MIN_CLASSES / C}
    info = {
        "folder": str(task.folder.root),
        "classes": C,
        "images": batches.count,
        "skipped": skips.total - skipped_before,
        "classnames": task.classnames_spec or "folder names",
        "templates": len(task.templates),
        "template_source": task.templates_spec,
        "empty_classes": task.folder.empty_classes(),
    }
    return SweepResult("zeroshot", rows, {k: chance[k] for k in keys}, info)


class _CountedBatches:
    """Passes ``(images, labels)`` batches through and counts the images."""

    def __init__(self, batches):
        self.batches, self.count = batches, 0

    def __iter__(self):
        for images, labels in self.batches:
            self.count += images.shape[0]
            yield images, labels


def evaluate_retrieval(
    model,
    tokenizer: Callable,
    pairs: RetrievalSet,
    *,
    taus: list[float] | None = None,
    backend: str | None = None,
    batch_size: int = 256,
) -> SweepResult:
    """Image->text and text->image R@1/5/10 over the held-out pairs, at each tau."""
    taus = _taus_for(model, taus)
    tokens = tokenizer(pairs.captions)
    recall = evaluation.retrieval_metrics_sweep(
        model, pairs.images, tokens, pairs.caption_to_image, taus, batch_size=batch_size, backend=backend
    )
    rows = [{"tau": tau, **{k: 100.0 * v for k, v in recall[tau].items()}} for tau in taus]
    info = {
        "data": pairs.source,
        "images": pairs.images.shape[0],
        "captions": len(pairs.captions),
        "skipped": pairs.skipped,
        "truncated": pairs.truncated,
        "rows_left_out": pairs.dropped,
    }
    return SweepResult("retrieval", rows, retrieval_chance(pairs.caption_to_image, pairs.images.shape[0]), info)


def retrieval_chance(caption_to_image: torch.Tensor, n_images: int) -> dict[str, float]:
    """Expected R@k (percent) of a random ranking: text->image ``k / N``; image->text ``1 - C(M - c_i, k) / C(M, k)``
    averaged over the images, ``c_i`` of the ``M`` captions being image i's. Small held-out sets have fewer than
    10 captions: there k counts as M (a list of every caption holds each image's own)."""
    m = len(caption_to_image)
    counts = torch.bincount(caption_to_image, minlength=n_images).tolist()
    out = {}
    for k in evaluation.RECALL_AT:
        kk = min(k, m)
        out[f"image_to_text_R@{k}"] = (
            100.0 * sum(1.0 - math.comb(m - c, kk) / math.comb(m, kk) for c in counts) / n_images
        )
        out[f"text_to_image_R@{k}"] = 100.0 * min(1.0, k / n_images)
    return {key: out[key] for key in _RECALL_ORDER}


def as_train_metrics(result: SweepResult, prefix: str) -> dict[str, tuple[float, float]]:
    """``{"<prefix>/<metric>": (result, chance)}`` of the first row, the shape the training loop logs and
    tabulates (``val/image_to_text_R@1``, ``val_zeroshot/top1``)."""
    row = result.rows[0]
    return {f"{prefix}/{m}": (row[m], result.chance[m]) for m in result.metrics}


# ------------------------------------------------------------------------------------------- printing
_SHORT = {"image_to_text_": "I->T ", "text_to_image_": "T->I "}


def _header(metric: str) -> str:
    for long, short in _SHORT.items():
        metric = metric.replace(long, short)
    return metric


def format_sweep(result: SweepResult, title: str, model_tau: float | None = None) -> str:
    """A title line, one row per tau (``*`` marks the model's own), the chance row and, for a sweep, the best."""
    cols = [(m, max(7, len(_header(m)))) for m in result.metrics]
    head = f"{'tau':<8}" + "".join(f"  {_header(m):>{w}}" for m, w in cols)
    lines = [title, head, "-" * len(head)]
    for row in result.rows:
        label = "-" if row["tau"] is None else f"{row['tau']:g}" + (" *" if row["tau"] == model_tau else "")
        lines.append(f"{label:<8}" + "".join(f"  {row[m]:{w}.2f}" for m, w in cols))
    lines.append(f"{'chance':<8}" + "".join(f"  {result.chance[m]:{w}.2f}" for m, w in cols))
    if len(result.rows) > 1:
        best = result.best()
        lines.append(f"best tau: {best['tau']:g} ({result.ranked_by} {result.score(best):.2f})")
    if model_tau is not None:
        lines.append(f"* the model's own tau ({model_tau:g})")
    return "\n".join(lines)


def zero_shot_title(result: SweepResult) -> str:
    i = result.info
    skipped = f", {i['skipped']} skipped" if i["skipped"] else ""
    return (
        f"zero-shot classification of {i['folder']}: {i['classes']} classes, {i['images']} images{skipped}, "
        f"{i['templates']} templates"
    )


def retrieval_title(result: SweepResult, max_samples: int) -> str:
    i = result.info
    cut = f" (the first {max_samples}: --max-samples)" if i["truncated"] else ""
    skipped = f", {i['skipped']} skipped" if i["skipped"] else ""
    return f"image-text retrieval on {i['data']}: {i['images']} images{cut}, {i['captions']} captions{skipped}"


# ------------------------------------------------------------------------------------------- during training
def check_val_options(cfg) -> None:
    """``llip train``'s ``--val-data`` and ``--val-zeroshot`` (with their class names and templates) must be
    readable: checked before the run writes anything. ``cfg``: a :class:`~llip.train.loop.TrainConfig`."""
    if cfg.val_data is not None:
        check_retrieval_source(cfg.val_data, what="--val-data")
    if cfg.val_zeroshot is not None:
        prepare_zero_shot(cfg.val_zeroshot, cfg.val_classnames, cfg.val_templates, prefix="val-")
    elif cfg.val_classnames is not None:
        raise UsageError("--val-classnames names the classes of --val-zeroshot: give --val-zeroshot DIR too")


def make_val_evaluator(cfg, model, tokenizer: Callable) -> Callable[[], dict[str, tuple[float, float]]]:
    """``evaluate() -> {"val/<metric>" | "val_zeroshot/<metric>": (result, chance)}`` for the run's validation
    data, at the model's own tau (``{}`` without any). The pairs are read once, on first use, and kept; the
    image folder is read again at each evaluation (decoded in batches)."""
    import llip

    transform = llip.image_transform(model.image_size, train=False)
    skips = SkipLog()  # one for the run: a bad file is warned about a bounded number of times, not at every eval
    task = None
    pairs = None

    def evaluate() -> dict[str, tuple[float, float]]:
        nonlocal task, pairs
        out: dict[str, tuple[float, float]] = {}
        if cfg.val_data is not None:
            if pairs is None:
                pairs = read_retrieval_set(
                    cfg.val_data, transform, skips, max_samples=cfg.val_samples, workers=cfg.workers, what="--val-data"
                )
            out |= as_train_metrics(evaluate_retrieval(model, tokenizer, pairs, backend=cfg.backend), "val")
        if cfg.val_zeroshot is not None:
            if task is None:
                task = prepare_zero_shot(cfg.val_zeroshot, cfg.val_classnames, cfg.val_templates, prefix="val-")
            result = evaluate_zero_shot(
                model, tokenizer, task, transform, skips, backend=cfg.backend, workers=cfg.workers
            )
            out |= as_train_metrics(result, "val_zeroshot")
        return out

    return evaluate

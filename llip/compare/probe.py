"""Evaluations ``llip compare`` adds to every run: the caption-diversity probe and the zero-shot temperature sweep.

The caption-diversity probe (fixed before any result was seen; the README states it the same way)
--------------------------------------------------------------------------------------------------
Question: when the captions of an image describe different objects, how well does a caption that names one object
retrieve its image? A pooled model (CLIP, SigLIP) has one image embedding that must sit near every such caption at
once; Llip mixes one per caption, so the paper's claim ("the gain comes from modelling caption diversity") predicts
that Llip ranks the image higher for these partial captions, and more so than where the caption describes the
whole picture.

- Queries: the object captions ("a large red circle", :func:`llip.data.builtin.object_caption`) of the validation
  scenes ``0 .. N-1`` (the evaluation images), grouped by scene: ``multi``, scenes with at least two different
  object captions; ``single``, scenes with one object (the control: the caption describes the whole picture).
  Scenes whose several objects all read the same are in neither group.
- Rank, filtered: other images that hold an object of the same description are right answers too, so only images
  without one count against the query: ``rank = 1 + #{images with no such object that score higher}``.
- Metrics per group: R@1 (percent of queries with rank 1) and the mean rank; ``probe_gap_R@1`` = multi R@1 minus
  single R@1. Chance (random scores): R@1 = mean of ``1 / (1 + wrong)``, mean rank = mean of ``1 + wrong / 2``,
  ``wrong`` being the number of images that count against the query.
- Read-out: the paired Llip - SigLIP difference over seeds with its 95% interval (``llip compare``'s table) for
  multi R@1 and multi mean rank (primary), and for the gap (secondary: positive if the gain is specific to
  diverse captions).

The zero-shot temperature sweep
-------------------------------
The mixer temperature tau can be chosen after training; the official evaluation reports zero-shot accuracy at
tau in {1, 3, 5, 8, 10}. Every Llip run's zero-shot top-1 on the built-in tasks at each of them.
"""

from __future__ import annotations

import torch

from .. import evaluation
from ..data import builtin

GROUPS = ("multi", "single")
SWEEP_TAUS = (1.0, 3.0, 5.0, 8.0, 10.0)


def probe_set(image_size: int, transform, tokenizer, n_images: int = 500, split: str = "val") -> dict:
    """The probe's queries over validation scenes ``0 .. n_images - 1``: ``images [N, 3, S, S]``, ``tokens [M, L]``
    and ``captions`` (M object captions), ``caption_to_image [M]``, ``group`` (M names from :data:`GROUPS`),
    ``right [M, N]`` bool (image ``j`` holds an object that caption ``m`` describes)."""
    scenes = [builtin.make_scene(split, n) for n in range(n_images)]
    described = [list(dict.fromkeys(builtin.object_caption(o) for o in s.objects)) for s in scenes]
    captions, owner, group = [], [], []
    for i, (scene, caps) in enumerate(zip(scenes, described)):
        if len(scene.objects) == 1:
            name = "single"
        elif len(caps) >= 2:
            name = "multi"
        else:
            continue  # several objects that all read the same: neither a diverse scene nor a one-object one
        captions += caps
        owner += [i] * len(caps)
        group += [name] * len(caps)
    sets = [set(c) for c in described]
    return {
        "images": torch.stack([transform(builtin.render(s, image_size)) for s in scenes]),
        "tokens": tokenizer(captions),
        "captions": captions,
        "caption_to_image": torch.tensor(owner, dtype=torch.int64),
        "group": group,
        "right": torch.tensor([[c in s for s in sets] for c in captions], dtype=torch.bool).view(len(captions), -1),
    }


def filtered_ranks(scores: torch.Tensor, caption_to_image: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``scores [M, N]`` (caption m against image j) -> ``[M]`` int64: 1 + the number of images that are not right
    answers for caption m and score above its own image. Ties go to the query."""
    own = scores.gather(1, caption_to_image[:, None])  # [M, 1]
    return 1 + ((scores > own) & ~right).sum(dim=1)


def caption_diversity_probe(model, pset: dict, *, backend: str | None = None, batch_size: int = 256) -> dict:
    """``{metric: (result, chance)}``: ``probe_<group>_R@1`` (percent), ``probe_<group>_mean_rank`` for each group,
    and ``probe_gap_R@1`` (multi minus single)."""
    scores = evaluation.score_matrix(model, pset["images"], pset["tokens"], batch_size, backend).t()  # [M, N]
    ranks = filtered_ranks(scores, pset["caption_to_image"], pset["right"])
    wrong = (~pset["right"]).sum(dim=1).double()  # [M] images that count against each query
    group = pset["group"]
    out: dict[str, tuple[float, float]] = {}
    for name in GROUPS:
        rows = torch.tensor([g == name for g in group])
        if not rows.any():
            raise ValueError(f"the probe has no {name!r} scenes among its images; evaluate on more of them")
        r, w = ranks[rows].double(), wrong[rows]
        out[f"probe_{name}_R@1"] = (100.0 * (r == 1).double().mean().item(), 100.0 * (1 / (1 + w)).mean().item())
        out[f"probe_{name}_mean_rank"] = (r.mean().item(), (1 + w / 2).mean().item())
    multi, single = out["probe_multi_R@1"], out["probe_single_R@1"]
    out["probe_gap_R@1"] = (multi[0] - single[0], multi[1] - single[1])
    return out


@torch.no_grad()
def zero_shot_tau_sweep(model, evalset: dict, tokenizer, *, backend: str | None = None, batch_size: int = 256) -> dict:
    """``{tau: {task: top-1 percent}}`` on the built-in zero-shot tasks at every tau of :data:`SWEEP_TAUS` (a Llip
    model; the evaluation set of :func:`llip.data.builtin.eval_set`). Keys are strings (JSON)."""
    if model.kind != "llip":
        raise ValueError(f"the tau sweep needs a Llip model, got a {model.kind!r} one")
    out: dict[str, dict[str, float]] = {str(tau): {} for tau in SWEEP_TAUS}
    for task, (classnames, templates) in builtin.zero_shot_tasks().items():
        classifier = evaluation.build_zero_shot_classifier(model, tokenizer, classnames, templates, batch_size)
        accuracy = evaluation.zero_shot_accuracy_sweep(
            model, classifier, evalset["images"], list(SWEEP_TAUS), evalset["labels"][task], batch_size, backend
        )
        for tau, acc in accuracy.items():
            out[str(tau)][task] = 100.0 * acc["top1"]
    return out

"""Resuming a run: load a checkpoint into the model and optimiser, refuse one of another model (naming both), and
list every setting the resumed run changes (the rules: :data:`RESUME_FREE_FIELDS` and
:data:`RESUME_MODEL_FIELDS`)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import UsageError
from .checkpoint import find_resume, is_sharded, load_checkpoint, load_sharded

if TYPE_CHECKING:
    from llip.model import LlipModel

    from .loop import TrainConfig

# Configuration fields a resumed run may change without a word: where and how it runs, not what it trains.
RESUME_FREE_FIELDS = {
    "resume", "output", "overwrite", "progress", "tensorboard", "workers", "eval_every", "eval_images", "log_every",
    "save_every", "keep", "device", "compile", "backend", "grad_checkpointing", "hang_after", "hang_in_checkpoint",
    "fsdp",  # sharded or replicated, the same training (a sharded checkpoint resumes either way)
    "overrides",  # compared through the model configuration instead
    "pretrained",  # where the weights started: a resumed run continues from its checkpoint
    "val_data", "val_samples", "val_zeroshot", "val_classnames", "val_templates",  # what is measured, not trained
}  # fmt: skip
# Model fields a resumed run may change (with a warning): they change the training, not the model's parameters.
RESUME_MODEL_FIELDS = {"tau", "lr", "loss", "init_logit_scale", "init_logit_bias"}


def _saved_model_config(state: dict) -> dict:
    """The checkpoint's model config, with fields added since it was written at their defaults (which is what the
    model it holds was built with: e.g. ``towers`` "openai")."""
    from ..configs import ModelConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    return {**defaults, **state.get("model_config", {})}


def load_resume_state(
    cfg: TrainConfig, ckpt_dir: Path, model: LlipModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> dict | None:
    """The checkpoint ``cfg.resume`` points at, with the model, optimiser and scaler already restored from it;
    None when not resuming (``--resume auto`` with no checkpoint yet starts from step 0, and says so). A checkpoint
    of another model is refused, naming both. The optimiser keeps this run's hyper-parameters (lr, weight decay:
    a changed value applies, and is listed by :func:`resume_changes`) and the checkpoint's moments. The scheduler
    and the RNG state are restored later, by the caller."""
    resume_path = find_resume(cfg.resume, ckpt_dir) if cfg.resume else None
    if cfg.resume == "auto" and resume_path is None:
        print(f"llip train: no checkpoint in {ckpt_dir} yet: starting from step 0", file=sys.stderr)
    if resume_path is None:
        return None
    sharded = is_sharded(resume_path)
    if cfg.fsdp and not sharded:
        raise UsageError(
            f"cannot resume {resume_path} under --fsdp: it is a single-file checkpoint of a run without --fsdp; "
            "resume it without --fsdp (runs under --fsdp write sharded step_*.dcp checkpoints)"
        )
    fresh = [{k: group[k] for k in ("lr", "weight_decay", "betas", "eps")} for group in optimizer.param_groups]
    if sharded:  # written under --fsdp: the model and optimiser are read in this run's layout, whatever it is
        state = load_checkpoint(resume_path, assemble=False)
        check_same_model(state, model, resume_path, load=lambda: load_sharded(resume_path, model, optimizer))
    else:
        state = load_checkpoint(resume_path)
        check_same_model(state, model, resume_path)
        optimizer.load_state_dict(state["optimizer"])
    for group, hyper in zip(optimizer.param_groups, fresh):
        group.update(hyper, initial_lr=hyper["lr"])
    scaler.load_state_dict(state["scaler"])
    return state


def check_same_model(state: dict, model: LlipModel, path: Path, load: Callable[[], object] | None = None) -> None:
    """Load the checkpoint's weights into ``model`` (by ``load()`` if given, else from ``state["model"]``), or
    refuse with the configuration fields that differ."""
    saved = _saved_model_config(state)
    now = dataclasses.asdict(model.config)
    differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k) and k not in RESUME_MODEL_FIELDS]
    mismatch = None
    if differ:
        mismatch = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} here" for k in differ)
    else:
        try:
            if load is not None:
                load()
            else:
                model.load_state_dict(state["model"])
        except RuntimeError as e:
            mismatch = " ".join(str(e).split())[:300]
    if mismatch is not None:
        raise UsageError(
            f"cannot resume {path}: it holds a {saved.get('name', 'different')} model and this run builds a "
            f"{now['name']} model that differs ({mismatch}); resume with the checkpoint's --model and --set values, "
            f"or start a new run in another --output"
        )


def resume_changes(state: dict, cfg: TrainConfig, model: LlipModel) -> list[str]:
    """``"field: old -> new"`` for every setting that differs from the checkpoint's and changes what is trained:
    the training configuration (but not where or how it runs) and the model fields a resume may change."""
    saved, now = state.get("config", {}), dataclasses.asdict(cfg)
    changes = [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if k not in RESUME_FREE_FIELDS and saved.get(k) != now.get(k)
    ]
    saved_model, now_model = _saved_model_config(state), dataclasses.asdict(model.config)
    changes += [
        f"model.{k}: {saved_model.get(k)!r} -> {now_model.get(k)!r}"
        for k in sorted(RESUME_MODEL_FIELDS)
        if k in saved_model and saved_model.get(k) != now_model.get(k)
    ]
    return changes

"""The training loop: :func:`train` reads top to bottom as the steps of a run; each step is a short function below it.

Recipe (docs/design.md section 2): AdamW (0.9, 0.95, eps 1e-6, decay 0.2 through ``model.param_groups``), linear
warm-up then cosine to zero, bf16 autocast optional, logit scale clamped after each step. Runs on one process or under
``torchrun`` (DDP, or sharded with ``--fsdp``: :mod:`.fsdp`; the model's loss covers the global batch). Step ``s``
always trains on the same samples (see :mod:`llip.data.datasets`), so a run resumed from a checkpoint continues
bitwise like an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from ..data.skips import describe
from ..errors import DataError, UsageError
from ..eval_tasks import check_val_options, make_val_evaluator
from .accumulate import accumulated_backward
from .checkpoint import (
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)
from .metrics import MetricsLog, wandb_available
from .placement import Ranks, check_backend, pick_device, setup_distributed
from .resume import load_resume_state, resume_changes
from .run_folder import check_writable, claim
from .schedule import WarmupCosine

if TYPE_CHECKING:
    from llip.data import TrainData
    from llip.model import LlipModel


@dataclass
class TrainConfig:
    """Every knob of a run; the CLI fills it, ``llip compare`` builds several."""

    model: str = "llip-tiny"
    overrides: dict = field(default_factory=dict)  # ModelConfig fields, e.g. {"K": 16, "tau": 3.0}
    data: str = "builtin"  # "builtin", a .csv/.tsv file, or .tar shards (brace patterns allowed)
    batch_size: int = 128  # global batch (split evenly across ranks)
    steps: int | None = None  # total optimiser steps (default: from epochs, else 800)
    epochs: float | None = None  # alternative to steps for map-style data
    lr: float | None = None  # peak lr (default: the model config's)
    warmup: int | None = None  # linear warm-up steps (default: WARMUP_FRACTION of the run, at most WARMUP_MAX)
    weight_decay: float = 0.2
    precision: str = "auto"  # fp32 | bf16 | fp16 (with a gradient scaler) | auto (bf16 on CUDA, fp32 on CPU)
    backend: str | None = None  # llip_kernels backend for the loss and evaluation
    output: str = "runs/llip-tiny"
    resume: str | None = None  # a checkpoint, a folder of them, or "auto" (newest in output/checkpoints)
    overwrite: bool = False  # replace the run already in ``output`` (else a new run there is refused)
    save_every: int = 200
    keep: int = 3
    eval_every: int = 0  # 0: evaluate only at the end
    eval_images: int = 500
    val_data: str | None = None  # held-out pairs (.csv/.tsv or .tar shards): retrieval metrics "val/..." at each eval
    val_samples: int = 1000  # at most this many images of val_data (held in memory)
    val_zeroshot: str | None = None  # an image folder DIR/<class>/<images>: zero-shot metrics "val_zeroshot/..."
    val_classnames: str | None = None  # class names of val_zeroshot: a file, "imagenet", or None (folder names)
    val_templates: str = "imagenet"  # prompt templates of val_zeroshot: a file, "imagenet" (80) or "simple" (1)
    seed: int = 0
    workers: int = 1
    grad_clip: float | None = None
    fsdp: bool = False  # shard parameters, gradients and optimiser state across the ranks (fsdp.py); needs torchrun
    accum_freq: int = 1  # micro-batches per step, features cached so the loss sees the whole batch (accumulate.py)
    lock_image: bool = False  # freeze the image tower (LiT-style); the Llip mixture tokens and head keep training
    lock_text: bool = False  # freeze the text tower
    lock_image_unlocked_layers: int = 0  # with lock_image: the last N vision blocks (and ln_post) keep training
    lock_text_unlocked_layers: int = 0  # with lock_text: the last N text blocks (and ln_final) keep training
    grad_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"
    log_every: int = 10
    tensorboard: bool = True
    wandb: bool = False  # also log to Weights & Biases (needs the wandb package; WANDB_MODE=offline works)
    wandb_project: str = "llip"
    progress: bool = True
    pretrained: str | None = None  # an open_clip ViT CLIP checkpoint the towers start from (llip/model/pretrained.py)
    builtin_length: int = 100_000
    hang_after: int | None = None  # fault injection for the resume test: sleep forever after this step
    hang_in_checkpoint: int | None = None  # fault injection: sleep forever inside this step's checkpoint write


WARMUP_FRACTION = 0.1  # default warm-up: this fraction of the run (80 steps of the 800-step main job)...
WARMUP_MAX = 2000  # ...but never more than the paper recipe's 2,000 steps


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compute_loss(net, model, images, tokens, *, backend=None, autocast=None) -> tuple[torch.Tensor, dict]:
    """Forward through ``net`` (the model, or its DDP/compiled wrapper) and the model's loss -> ``[]`` float32.
    Under DDP the loss covers the global batch (``model.loss`` picks the distributed op)."""
    with autocast if autocast is not None else contextlib.nullcontext():
        out = net(images, tokens)
        # In the region too: under autocast the ops cast the model's mixed-dtype outputs (bf16 activations, float32
        # w_out) to one dtype themselves; the backward pass runs after the region, as PyTorch advises.
        return model.loss(out, backend=backend), out


def total_steps(cfg: TrainConfig, samples_per_epoch: int | None) -> int:
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        if samples_per_epoch is None:
            raise ValueError("--epochs needs data of known size (builtin or CSV); give --steps for tar shards")
        return max(1, math.ceil(cfg.epochs * samples_per_epoch / cfg.batch_size))
    return 800


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns ``{"step", "loss", "eval": {metric: (result, chance)}, "checkpoint", "curves"}``
    (the paths as strings, None where not written).
    Raises :class:`TrainingDiverged` on a NaN/inf loss (no checkpoint is written after it)."""
    run = _setup_run(cfg)  # device, ranks, model, optimiser, data, schedule; restored from a checkpoint if resuming
    log = _open_log(run)  # rank 0 only (None elsewhere); also writes config.json
    evaluate, checkpoint = _make_evaluator(run, log), _make_checkpointer(run)
    _announce(run)
    bar = _progress_bar(run)

    run.model.train()
    skips = _Skips(run.skipped)
    loss_value, last_ckpt, results = float("nan"), None, {}
    throughput = _Throughput(cfg.batch_size)
    step = run.start_step
    while step < run.steps:
        batch = _next_batch(run, skips)
        try:
            done = _train_step(run, batch, step)
        except TrainingDiverged:
            if bar is not None:
                bar.close()
            raise
        step, loss_value = step + 1, done.loss
        skips.total += done.skipped
        if run.dd.main:
            _log_step(run, log, bar, throughput, step, done, skips.total)
        if step % cfg.save_every == 0 or step == run.steps:
            last_ckpt = checkpoint(step, skips.total) or last_ckpt
        eval_due = cfg.eval_every and step % cfg.eval_every == 0 and step != run.steps
        if eval_due and (run.dd.main or cfg.fsdp):  # under --fsdp every rank gathers the weights rank 0 evaluates
            results = evaluate(step)
            if bar is not None:
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.1f}" for k, (v, _) in results.items()))
        if run.dd.world > 1 and (step % cfg.save_every == 0 or (cfg.eval_every and step % cfg.eval_every == 0)):
            dist.barrier()  # keep ranks together while rank 0 writes or evaluates
        if cfg.hang_after is not None and step >= cfg.hang_after:
            while True:  # the resume test SIGKILLs us here, mid-run, with steps logged past the checkpoint
                time.sleep(1)
    if bar is not None:
        bar.close()
    if step == run.steps and run.dd.main:
        results = _final_evaluation(evaluate, step, last_ckpt, skips)
    elif step == run.steps and cfg.fsdp:
        evaluate(step)  # this rank's share of gathering the weights rank 0 evaluates
    if log is not None:
        log.close()
    curves = _draw_curves(run.out_dir) if log is not None else None  # rank 0, from the metrics just written
    if run.dd.world > 1:
        dist.barrier()
    return {
        "step": step,
        "loss": loss_value,
        "eval": results,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "curves": str(curves) if curves else None,
    }


# ------------------------------------------------------------------------------------------------------ set-up
@dataclass
class _Run:
    """What :func:`_setup_run` builds and the steps of :func:`train` share."""

    cfg: TrainConfig
    device: str
    dd: Ranks
    precision: str  # "fp32", "bf16" or "fp16"
    autocast: contextlib.AbstractContextManager
    out_dir: Path
    ckpt_dir: Path
    model: LlipModel  # under --fsdp, sharded in place (fsdp.py)
    net: torch.nn.Module  # the model, or its DDP / compiled wrapper: what the forward pass runs through
    lr: float
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: WarmupCosine
    tokenizer: Callable
    kind: str  # data_kind(cfg.data): "builtin", "csv" or "wds"
    data: TrainData
    steps: int  # total optimiser steps
    warmup: int  # warm-up steps of the schedule
    start_step: int  # 0, or the step of the checkpoint resumed from
    resumed: bool
    skipped: int  # samples skipped before start_step (all ranks; restored on resume)
    resume_changes: list[str]  # configuration fields that differ from the checkpoint's, "field: old -> new"
    # tar shards: each loader worker's place in its stream after the batches consumed so far (llip/data/webdata.py)
    stream_places: dict = field(default_factory=dict)


def _setup_run(cfg: TrainConfig) -> _Run:
    """Everything a run needs before its first step, in an order that matters: every check that can refuse the run
    before anything is written; the seed before the model is created (the initial weights depend on it); and a
    resumed run's saved RNG state restored last, after everything that might draw random numbers, so that it
    continues bitwise like an uninterrupted run."""
    import llip
    from llip.data import data_kind

    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"--precision must be fp32, bf16, fp16 or auto, got {cfg.precision!r}")
    _check_step_options(cfg, precision)
    kind = data_kind(cfg.data)
    check_val_options(cfg)  # --val-data / --val-zeroshot readable, before anything is written
    out_dir, ckpt_dir = Path(cfg.output), Path(cfg.output) / "checkpoints"
    dd = setup_distributed(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    pretrained = _read_pretrained(cfg)
    tokenizer = llip.tokenizer_for(llip.get_config(cfg.model, **cfg.overrides))  # a missing file: refused here
    _claim_output(cfg, dd, out_dir, ckpt_dir)
    if dd.world > 1:  # every rank has checked the folder before rank 0 writes the new run into it
        dist.barrier()

    seed_everything(cfg.seed)  # before the model: its initial weights depend on it
    model, optimizer, scaler, lr = _build_model(cfg, device, pretrained, precision)
    check_backend(cfg.backend, model, device, precision)
    # Built-in scenes are drawn at the model's size and carry their own variety: no random crop (it would
    # also cut objects out and falsify captions); real data gets the training augmentation.
    transform = llip.image_transform(model.image_size, train=kind != "builtin")
    state = load_resume_state(cfg, ckpt_dir, model, optimizer, scaler)
    start_step = state["step"] if state is not None else 0

    data = _build_data(cfg, model, transform, tokenizer, dd, start_step, _saved_places(state, dd))
    steps = total_steps(cfg, data.length)
    if start_step >= steps:
        raise UsageError(
            f"the checkpoint resumed from is at step {start_step} and the run has {steps} steps: nothing left to "
            f"train; pass --steps above {start_step} to continue it (llip eval {cfg.output} evaluates it)"
        )
    warmup = _warmup_steps(cfg, steps)
    scheduler = WarmupCosine(optimizer, warmup=warmup, total=steps)
    changes = resume_changes(state, cfg, model) if state is not None else []
    if state is not None:
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])  # last, after everything that might draw random numbers

    net = _wrap_model(model, cfg, dd, device)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.split(":")[0], dtype=half) if half is not None else contextlib.nullcontext()
    return _Run(
        cfg=cfg, device=device, dd=dd, precision=precision, autocast=autocast, out_dir=out_dir, ckpt_dir=ckpt_dir,
        model=model, net=net, lr=lr, optimizer=optimizer, scaler=scaler, scheduler=scheduler, tokenizer=tokenizer,
        kind=kind, data=data, steps=steps, warmup=warmup, start_step=start_step, resumed=state is not None,
        skipped=state.get("skipped", 0) if state is not None else 0, resume_changes=changes,
    )  # fmt: skip


def _claim_output(cfg: TrainConfig, dd: Ranks, out_dir: Path, ckpt_dir: Path) -> None:
    """Refuse to mix this run into another one in ``out_dir`` (see :mod:`.run_folder`), make sure the folder can be
    written, and clear what interrupted checkpoint writes left. Rank 0 does the writing; every rank refuses."""
    if not dd.main and cfg.overwrite:
        return  # rank 0 replaces the old run; the others must not race it
    removed = claim(out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    if not dd.main:
        return
    check_writable(out_dir)
    if removed:
        print(f"llip train: --overwrite: removed the previous run in {out_dir} ({', '.join(removed)})", file=sys.stderr)
    stale = remove_stale_temp_files(ckpt_dir)
    if stale:
        print(
            f"llip train: removed {stale} temporary file(s) left by interrupted checkpoint writes in {ckpt_dir}",
            file=sys.stderr,
        )


def _check_step_options(cfg: TrainConfig, precision: str) -> None:
    """Step options that cannot work together, refused before anything is written."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.fsdp and world < 2:
        raise UsageError("--fsdp shards the model across processes: launch with torchrun --nproc-per-node N (N of "
                         "at least 2), or train one process without --fsdp")  # fmt: skip
    if cfg.fsdp:
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401 - public from PyTorch 2.6 on
        except ImportError:
            raise UsageError(f"--fsdp needs PyTorch 2.6 or newer (FSDP2), this is {torch.__version__}") from None
    if cfg.fsdp and precision == "fp16":
        # The fp16 gradient scaler decides per rank whether a step overflowed; with sharded gradients each rank
        # sees only its shards and the ranks could disagree (skip the step on one, take it on another).
        raise UsageError("--fsdp does not support --precision fp16 (its gradient scaler); use --precision bf16")
    local_batch = cfg.batch_size // max(world, 1)
    if cfg.accum_freq > local_batch:
        raise UsageError(f"--accum-freq {cfg.accum_freq} is more than the {local_batch} samples each rank gets per "
                         "step (--batch-size / ranks); lower it or raise --batch-size")  # fmt: skip
    if cfg.wandb and not wandb_available():
        raise UsageError("--report-to wandb needs the wandb package: pip install wandb (or pip install 'llip[wandb]')")
    for tower in ("image", "text"):
        if getattr(cfg, f"lock_{tower}_unlocked_layers") and not getattr(cfg, f"lock_{tower}"):
            raise UsageError(f"--lock-{tower}-unlocked-layers applies to --lock-{tower}; give --lock-{tower} too")


def _warmup_steps(cfg: TrainConfig, steps: int) -> int:
    """``--warmup``, or by default WARMUP_FRACTION of the run (at most WARMUP_MAX); a warning when an explicit
    warm-up takes more than half of the run (the learning rate then barely reaches its peak)."""
    if cfg.warmup is None:
        return min(WARMUP_MAX, round(WARMUP_FRACTION * steps))
    if cfg.warmup > steps // 2:
        print(
            f"llip train: warning: --warmup {cfg.warmup} is more than half of the {steps} steps; the learning rate "
            f"reaches its peak only at step {min(cfg.warmup, steps)}",
            file=sys.stderr,
        )
    return min(cfg.warmup, steps)


def _read_pretrained(cfg: TrainConfig) -> dict | None:
    """The ``--pretrained`` checkpoint's tensors, checked against the model's names and shapes (on the meta
    device) so that a wrong file is refused before the run folder is touched."""
    if cfg.pretrained is None:
        return None
    import llip
    from llip.model.pretrained import convert_open_clip, read_state_dict

    state = read_state_dict(cfg.pretrained)
    convert_open_clip(llip.create_model(cfg.model, device="meta", **cfg.overrides), state)
    return state


def _build_model(
    cfg: TrainConfig, device: str, pretrained: dict | None = None, precision: str = "fp32"
) -> tuple[LlipModel, torch.optim.Optimizer, torch.amp.GradScaler, float]:
    """The model on ``device`` (its towers from ``pretrained``, open_clip tensors, if given; locked towers frozen),
    its AdamW optimiser over the trainable parameters (the recipe's betas and eps), the grad scaler (enabled for
    fp16 only) and the peak learning rate."""
    import llip

    model = llip.create_model(cfg.model, pretrained=pretrained, **cfg.overrides).to(device)
    if cfg.lock_image:
        model.lock_image_tower(unlocked_layers=cfg.lock_image_unlocked_layers)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.fsdp:  # before the optimiser: sharding replaces the parameters it would hold
        from .fsdp import shard_model

        shard_model(model)
    lr = cfg.lr if cfg.lr is not None else model.config.lr
    optimizer = torch.optim.AdamW(
        model.param_groups(cfg.weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-6, weight_decay=cfg.weight_decay
    )
    # fp16 gradients underflow without loss scaling; bf16 has float32's exponent range and needs none
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=precision == "fp16")
    return model, optimizer, scaler, lr


def _saved_places(state: dict | None, dd: Ranks) -> dict | None:
    """This rank's stream places saved in the checkpoint resumed from (None: not resuming, not tar shards, or saved
    with another number of ranks; the stream is then replayed)."""
    saved = (state or {}).get("stream")
    if not saved or len(saved["ranks"]) != dd.world:
        return None
    return {"workers": saved["workers"], "places": saved["ranks"][dd.rank]}


def _build_data(
    cfg: TrainConfig, model: LlipModel, transform: Callable, tokenizer: Callable, dd: Ranks, start_step: int,
    stream_places: dict | None = None,
) -> TrainData:  # fmt: skip
    """This rank's share of the global batches, from ``start_step`` on (step ``s`` always gets the same samples)."""
    from llip.data import build_train_loader

    return build_train_loader(
        cfg.data,
        image_size=model.image_size,
        transform=transform,
        tokenizer=tokenizer,
        global_batch=cfg.batch_size,
        seed=cfg.seed,
        rank=dd.rank,
        world=dd.world,
        start_step=start_step,
        workers=cfg.workers,
        builtin_length=cfg.builtin_length,
        stream_places=stream_places,
    )


def _wrap_model(model: LlipModel, cfg: TrainConfig, dd: Ranks, device: str) -> torch.nn.Module:
    """What the forward pass runs through: the model itself, in DDP across ranks (unless sharded: ``--fsdp``
    shards the model itself), compiled on request. The loss, the optimiser and the checkpoints keep using the bare
    (or sharded) model."""
    net = model
    if dd.world > 1 and not cfg.fsdp:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dd.local_rank] if device != "cpu" else None)
    if cfg.compile:
        net = torch.compile(net)
    return net


def _open_log(run: _Run) -> MetricsLog | None:
    """Rank 0's metrics log (None on other ranks), cut back to the resumed step when resuming so the file reads
    as one uninterrupted run, and the run's ``config.json`` next to it."""
    if not run.dd.main:
        return None
    resume_step = run.start_step if run.cfg.resume is not None else None
    wandb = None
    if run.cfg.wandb:
        config = {"train": dataclasses.asdict(run.cfg), "model": dataclasses.asdict(run.model.config)}
        wandb = {"project": run.cfg.wandb_project, "config": config}
    log = MetricsLog(run.out_dir, tensorboard=run.cfg.tensorboard, resume_step=resume_step, wandb=wandb)
    _write_run_config(run)
    return log


def _write_run_config(run: _Run) -> None:
    """``<output>/config.json``: the train and model configs and how the run was actually placed (precision,
    device, world size, data), so a run folder says what produced it."""
    (run.out_dir / "config.json").write_text(
        json.dumps(
            {
                "train": dataclasses.asdict(run.cfg),
                "model": dataclasses.asdict(run.model.config),
                "precision": run.precision,
                "device": run.device,
                "world": run.dd.world,
                "data": run.data.description,
                "warmup": run.warmup,
            },
            indent=2,
        )
    )


def _make_evaluator(run: _Run, log: MetricsLog | None) -> Callable[[int], dict]:
    """``evaluate(step) -> {metric: (result, chance)}`` on the built-in validation scenes (when training on them)
    and on ``--val-data`` / ``--val-zeroshot`` (keys ``val/...``, ``val_zeroshot/...``), logged under ``eval``
    (rank 0 only); ``{}`` with none of them. Validation sets are read on first use, not before they are needed.

    Under ``--fsdp`` every rank calls it: the ranks gather the whole weights into a copy of the model on rank 0,
    which evaluates it alone (as without ``--fsdp``) and frees the copy again; the other ranks get ``{}``."""
    import llip
    from llip.data import builtin

    from .evaluate import evaluate_builtin

    model = run.model
    if run.cfg.fsdp:  # an empty (meta) copy, filled at each evaluation: no memory and no random numbers until then
        model = llip.create_model(run.cfg.model, device="meta", **run.cfg.overrides) if run.dd.main else None
    evalset = None
    evaluate_val = make_val_evaluator(run.cfg, model, run.tokenizer) if model is not None else None
    # The same on every rank: under --fsdp no rank then gathers a whole copy of the weights that nobody evaluates
    nothing_to_evaluate = run.kind != "builtin" and run.cfg.val_data is None and run.cfg.val_zeroshot is None

    def evaluate(step: int) -> dict:
        nonlocal evalset
        if nothing_to_evaluate:
            return {}
        if run.cfg.fsdp:
            from .fsdp import gather_full_state

            whole = gather_full_state(run.model)  # every rank takes part; rank 0 gets the tensors
            if not run.dd.main:
                return {}
            model.load_state_dict(whole, assign=True)
            model.to(run.device)
        try:
            results = {}
            if run.kind == "builtin":
                if evalset is None:
                    eval_tf = llip.image_transform(model.image_size, train=False)
                    evalset = builtin.eval_set(model.image_size, eval_tf, run.tokenizer, n_images=run.cfg.eval_images)
                results = evaluate_builtin(model, evalset, run.tokenizer, backend=run.cfg.backend)
            results.update(evaluate_val())
        finally:
            if run.cfg.fsdp:
                model.to("meta")  # the whole copy lives only while it is evaluated
        if results:
            log.log({"step": step, **{k: v for k, (v, _) in results.items()}}, prefix="eval")
        return results

    return evaluate


def _make_checkpointer(run: _Run) -> Callable[[int], Path | None]:
    """``checkpoint(step, skipped) -> path``: rank 0 saves everything an exact resume needs (model, optimiser,
    scheduler, scaler, RNG state, configs, the skipped-sample count), keeping the newest ``cfg.keep``; other ranks
    save nothing and get None. Under ``--fsdp`` every rank writes its shards of the model and optimiser into a
    sharded checkpoint (:func:`~.checkpoint.save_sharded_checkpoint`) and rank 0 the rest."""

    def checkpoint(step: int, skipped: int) -> Path | None:
        stream = None
        if run.kind == "wds":  # every rank's loader places: a collective, so every rank comes here
            ranks = [dict(run.stream_places)]
            if run.dd.world > 1:
                ranks = [None] * run.dd.world
                dist.all_gather_object(ranks, dict(run.stream_places))
            stream = {"workers": max(run.cfg.workers, 1), "ranks": ranks}
        state = {
            "step": step,
            "skipped": skipped,
            "stream": stream,
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": rng_state(),
            "config": dataclasses.asdict(run.cfg),
            "model_config": dataclasses.asdict(run.model.config),
        }
        hang = run.cfg.hang_in_checkpoint == step
        if run.cfg.fsdp:
            return save_sharded_checkpoint(
                state, run.model, run.optimizer, run.ckpt_dir, step, run.cfg.keep, hang_before_rename=hang
            )
        if not run.dd.main:
            return None
        state.update(model=run.model.state_dict(), optimizer=run.optimizer.state_dict())
        return save_checkpoint(state, run.ckpt_dir, step, run.cfg.keep, hang_before_rename=hang)

    return checkpoint


def _announce(run: _Run) -> None:
    """Rank 0 prints one line saying what is about to train, where, and from which step."""
    if not run.dd.main:
        return
    cfg = run.cfg
    print(
        f"llip: {cfg.model} on {run.data.description}, {run.steps} steps of {cfg.batch_size}, {run.precision}, "
        f"{run.device}, world {run.dd.world}, lr {run.lr:g}, output {run.out_dir}"
        + (f", resumed from step {run.start_step}" if run.resumed else "")
    )
    if run.resume_changes:
        print(
            "llip train: warning: resuming with a changed configuration: " + "; ".join(run.resume_changes),
            file=sys.stderr,
        )
    if run.data.dropped:
        print(f"llip train: warning: {cfg.data}: left out {describe(run.data.dropped)}", file=sys.stderr)


def _progress_bar(run: _Run):
    """Rank 0's tqdm bar (starting at the resumed step), or None without ``cfg.progress`` and on other ranks."""
    if not (run.dd.main and run.cfg.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=run.steps, initial=run.start_step, desc=f"train {run.cfg.model}", unit="step", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------------ a step
@dataclass
class _StepDone:
    """What one optimiser step reports for logging."""

    loss: float  # averaged over ranks
    logit_scale: torch.Tensor  # the multiplier t used in the forward pass (0-dim)
    grad_norm: float | None  # before clipping; None without cfg.grad_clip
    step_time: float  # seconds: forward, loss, backward and update
    skipped: int  # samples the data skipped for this step's batch, summed over ranks
    logit_bias: torch.Tensor | None = None  # the bias b used in the forward pass (0-dim; None: softmax loss)


class _Skips:
    """Samples skipped so far: ``total`` over all ranks (the run's count, restored on resume) and this rank's
    reasons (for messages)."""

    def __init__(self, total: int):
        self.total = total
        self.reasons: Counter[str] = Counter()


def _next_batch(run: _Run, skips: _Skips) -> dict:
    """The next batch of this rank's data stream. A stream of tar shards with no readable sample ends, its last
    item carrying the final skip counts: that is an error naming what was skipped and why."""
    while True:
        try:
            batch = next(run.data.batches)
        except StopIteration:
            what = describe(skips.reasons) or "no sample at all"
            raise DataError(
                f"the data stream {run.cfg.data!r} ran dry: no readable samples (skipped on this rank: {what})"
            ) from None
        skips.reasons.update(batch.get("skip_reasons", {}))
        if not batch.get("end"):
            if "stream_place" in batch:
                worker, *place = batch["stream_place"]
                run.stream_places[int(worker)] = tuple(int(x) for x in place)
            return batch


def _train_step(run: _Run, batch: dict, step: int) -> _StepDone:
    """One optimiser step on ``batch`` (``step`` steps already done): forward and loss, a finite check that every
    rank agrees on, backward, optional gradient clipping, optimiser and scheduler step, logit-scale clamp.
    Raises :class:`TrainingDiverged` before touching the weights if the loss is NaN or infinite."""
    cfg, model, optimizer, scaler = run.cfg, run.model, run.optimizer, run.scaler
    images = batch["images"].to(run.device, non_blocking=True)
    tokens = batch["tokens"].to(run.device, non_blocking=True)
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    if cfg.accum_freq > 1:  # backward inside: only gradients are written before the finite check below
        loss, out = accumulated_backward(
            run.net, model, images, tokens, accum=cfg.accum_freq, backend=cfg.backend, autocast=run.autocast,
            backward=lambda x: scaler.scale(x).backward(),
        )  # fmt: skip
    else:
        loss, out = compute_loss(run.net, model, images, tokens, backend=cfg.backend, autocast=run.autocast)
    # Every rank must agree to stop, or the others would hang in the next collective; the same reduction sums the
    # samples each rank skipped for this batch.
    skipped_here = torch.tensor(float(batch["skipped"]), dtype=torch.float64, device=loss.device)
    report = torch.stack([loss.detach().double().reshape(()), skipped_here])
    if run.dd.world > 1:
        dist.all_reduce(report)
    loss_value, skipped = float(report[0]) / run.dd.world, int(report[1])
    if not math.isfinite(loss_value):
        raise TrainingDiverged(
            f"loss is {loss_value} at step {step + 1}; stopping. The last good checkpoint is kept in "
            f"{run.ckpt_dir} (resume with --resume auto, perhaps with a lower --lr or --grad-clip)."
        )
    if cfg.accum_freq == 1:
        scaler.scale(loss).backward()
    if cfg.fsdp:  # FSDP reduced the sharded gradients; the few replicated parameters' are averaged here
        from .fsdp import reduce_replicated_grads

        reduce_replicated_grads(model)
    grad_norm = None
    if cfg.grad_clip:
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
    scaler.step(optimizer)
    scaler.update()
    run.scheduler.step()
    model.clamp_logit_scale()
    bias = out["logit_bias"] if model.logit_bias is not None else None
    return _StepDone(loss_value, out["logit_scale"], grad_norm, time.perf_counter() - t0, skipped, bias)


@dataclass
class _Throughput:
    """Samples per second over the steps since the last measurement, measured every ``log_every`` steps."""

    batch_size: int
    t_last: float | None = None
    n_since: int = 0

    def measure(self, due: bool) -> float | None:
        """Count one more step; the rate when ``due`` (else None). The first step includes start-up (workers,
        allocations): it only starts the clock and is not measured."""
        self.n_since += 1
        if self.t_last is None:
            self.t_last, self.n_since = time.perf_counter(), 0
            return None
        if not due:
            return None
        now = time.perf_counter()
        rate = self.n_since * self.batch_size / (now - self.t_last)
        self.t_last, self.n_since = now, 0
        return rate


def _log_step(
    run: _Run, log: MetricsLog, bar, throughput: _Throughput, step: int, done: _StepDone, skipped: int
) -> None:
    """Rank 0: the step's metrics record (``samples_per_s`` every ``log_every`` steps and at the end) and the
    progress bar's postfix."""
    record = {
        "step": step,
        "loss": done.loss,
        "lr": run.optimizer.param_groups[0]["lr"],
        "logit_scale": float(done.logit_scale.detach()),
        **({} if done.logit_bias is None else {"logit_bias": float(done.logit_bias.detach())}),
        "step_time": done.step_time,
        "skipped": skipped,
    }
    if done.grad_norm is not None:
        record["grad_norm"] = done.grad_norm
    rate = throughput.measure(step % run.cfg.log_every == 0 or step == run.steps)
    if rate is not None:
        record["samples_per_s"] = rate
    log.log(record)
    if bar is not None:
        post = {"loss": f"{done.loss:.4f}"}
        if "samples_per_s" in record:
            post["samples/s"] = f"{record['samples_per_s']:.0f}"
        if skipped:
            post["skipped"] = skipped
        bar.set_postfix(post, refresh=False)
        bar.update(1)


# ----------------------------------------------------------------------------------------------------- the end
def _final_evaluation(evaluate: Callable[[int], dict], step: int, last_ckpt: Path | None, skips: _Skips) -> dict:
    """Rank 0 at the end of the run: evaluate, print the results table, the skipped samples and the last
    checkpoint's path."""
    from .evaluate import format_table

    results = evaluate(step)
    if results:
        print(format_table(results))
    if skips.total:
        why = f" (on this rank: {describe(skips.reasons)})" if skips.reasons else ""
        print(f"skipped samples: {skips.total}{why}")
    if last_ckpt is not None:
        print(f"checkpoint: {last_ckpt}")
    return results


def _draw_curves(out_dir: Path) -> Path | None:
    """Rank 0 at the end of the run: draw ``curves.png`` from the run's metrics and print its path below the
    checkpoint's. The picture is a convenience: a failure to draw it is one warning line, and the finished run
    (its checkpoints and metrics) stands."""
    from ..errors import error_line
    from .curves import plot_run

    try:
        path = plot_run(out_dir)
    except Exception as e:  # whatever goes wrong (a missing matplotlib, a full disk), the run itself succeeded
        print(f"llip train: warning: could not draw the curves: {error_line(e)}", file=sys.stderr)
        return None
    print(f"curves: {path}")
    return path

"""The training loop: one function, :func:`train`, readable top to bottom.

Recipe (SPEC section 2): AdamW (0.9, 0.95, eps 1e-6, decay 0.2 through ``model.param_groups``), linear warm-up
then cosine to zero, bf16 autocast optional, logit scale clamped after each step. Runs on one process or under
``torchrun`` (DDP; the model's loss covers the global batch). Step ``s`` always trains on the same samples (see
:mod:`llip.data.datasets`), so a run resumed from a checkpoint continues bitwise like an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import find_resume, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .metrics import MetricsLog
from .schedule import WarmupCosine


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
    warmup: int = 80
    weight_decay: float = 0.2
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 on CUDA, fp32 on CPU)
    backend: str | None = None  # llip_kernels backend for the loss and evaluation
    output: str = "runs/llip-tiny"
    resume: str | None = None  # a checkpoint, a folder of them, or "auto" (newest in output/checkpoints)
    save_every: int = 200
    keep: int = 3
    eval_every: int = 0  # 0: evaluate only at the end
    eval_images: int = 500
    seed: int = 0
    workers: int = 1
    grad_clip: float | None = None
    grad_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    builtin_length: int = 100_000
    hang_after: int | None = None  # fault injection for the resume test: sleep forever after this step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _pick_device(requested: str, local_rank: int) -> str:
    if requested != "auto":
        return requested
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compute_loss(net, model, images, tokens, *, backend=None, autocast=None) -> tuple[torch.Tensor, dict]:
    """Forward through ``net`` (the model, or its DDP/compiled wrapper) and the model's loss -> ``[]`` float32.
    Under DDP the loss covers the global batch (``model.loss`` picks the distributed op)."""
    with autocast if autocast is not None else contextlib.nullcontext():
        out = net(images, tokens)
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
    """Train as configured; returns ``{"step", "loss", "eval": {metric: (result, chance)}, "checkpoint"}``.
    Raises :class:`TrainingDiverged` on a NaN/inf loss (no checkpoint is written after it)."""
    import llip
    from llip.data import build_train_loader, builtin, data_kind

    from .evaluate import evaluate_builtin, format_table

    device = _pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dd = _setup_distributed(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32, bf16 or auto, got {cfg.precision!r}")
    out_dir, ckpt_dir = Path(cfg.output), Path(cfg.output) / "checkpoints"

    seed_everything(cfg.seed)
    model = llip.create_model(cfg.model, **cfg.overrides).to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    lr = cfg.lr if cfg.lr is not None else model.config.lr
    optimizer = torch.optim.AdamW(
        model.param_groups(cfg.weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-6, weight_decay=cfg.weight_decay
    )
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=False)  # bf16 needs no loss scaling
    tokenizer = llip.get_tokenizer(context_length=model.context_length)
    # Built-in scenes are drawn at the model's size and carry their own variety: no random crop (it would
    # also cut objects out and falsify captions); real data gets the training augmentation.
    kind = data_kind(cfg.data)
    transform = llip.image_transform(model.image_size, train=kind != "builtin")

    start_step = 0
    resume_path = find_resume(cfg.resume, ckpt_dir) if cfg.resume else None
    state = load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step = state["step"]

    data = build_train_loader(
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
    )
    steps = total_steps(cfg, data.length)
    scheduler = WarmupCosine(optimizer, warmup=min(cfg.warmup, steps), total=steps)
    if state is not None:
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])  # last, after everything that might draw random numbers

    net = model
    if dd.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dd.local_rank] if device != "cpu" else None)
    if cfg.compile:
        net = torch.compile(net)

    log = MetricsLog(out_dir, tensorboard=cfg.tensorboard) if dd.main else None
    evalset = None
    if dd.main:
        log.truncate_after(start_step)
        (out_dir / "config.json").write_text(
            json.dumps(
                {
                    "train": dataclasses.asdict(cfg),
                    "model": dataclasses.asdict(model.config),
                    "precision": precision,
                    "device": device,
                    "world": dd.world,
                    "data": data.description,
                },
                indent=2,
            )
        )

    def run_eval(step: int) -> dict:
        nonlocal evalset
        if kind != "builtin":
            return {}
        if evalset is None:
            eval_tf = llip.image_transform(model.image_size, train=False)
            evalset = builtin.eval_set(model.image_size, eval_tf, tokenizer, n_images=cfg.eval_images)
        results = evaluate_builtin(model, evalset, tokenizer, backend=cfg.backend)
        log.log({"step": step, **{k: v for k, (v, _) in results.items()}}, prefix="eval")
        return results

    def checkpoint(step: int) -> Path | None:
        if not dd.main:
            return None
        return save_checkpoint(
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_state(),
                "config": dataclasses.asdict(cfg),
                "model_config": dataclasses.asdict(model.config),
            },
            ckpt_dir,
            step,
            cfg.keep,
        )

    autocast = (
        torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    if dd.main:
        print(
            f"llip: {cfg.model} on {data.description}, {steps} steps of {cfg.batch_size}, {precision}, {device}, "
            f"world {dd.world}, lr {lr:g}, output {out_dir}" + (f", resumed from step {start_step}" if state else "")
        )
    bar = None
    if dd.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start_step, desc=f"train {cfg.model}", unit="step", dynamic_ncols=True)

    model.train()
    skipped, loss_value, last_ckpt, results = 0, float("nan"), None, {}
    t_last, n_since = None, 0
    step = start_step
    while step < steps:
        try:
            batch = next(data.batches)
        except StopIteration:
            raise RuntimeError(
                f"the data stream {cfg.data!r} ran dry (no readable samples?); skipped {skipped}"
            ) from None
        skipped += batch["skipped"]
        images = batch["images"].to(device, non_blocking=True)
        tokens = batch["tokens"].to(device, non_blocking=True)
        t0 = time.perf_counter()
        loss, out = compute_loss(net, model, images, tokens, backend=cfg.backend, autocast=autocast)
        # Every rank must agree to stop, or the others would hang in the next collective.
        report = loss.detach().float().reshape(1).clone()
        if dd.world > 1:
            dist.all_reduce(report)
            report /= dd.world
        loss_value = float(report)
        if not math.isfinite(loss_value):
            msg = (
                f"loss is {loss_value} at step {step + 1}; stopping. The last good checkpoint is kept in "
                f"{ckpt_dir} (resume with --resume auto, perhaps with a lower --lr or --grad-clip)."
            )
            if bar is not None:
                bar.close()
            raise TrainingDiverged(msg)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        grad_norm = None
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        model.clamp_logit_scale()
        step += 1
        step_time = time.perf_counter() - t0
        n_since += 1

        if dd.main:
            record = {
                "step": step,
                "loss": loss_value,
                "lr": optimizer.param_groups[0]["lr"],
                "logit_scale": float(out["logit_scale"].detach()),
                "step_time": step_time,
                "skipped": skipped,
            }
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if t_last is None:  # the first step includes start-up (workers, allocations): not measured
                t_last, n_since = time.perf_counter(), 0
            elif step % cfg.log_every == 0 or step == steps:
                now = time.perf_counter()
                record["samples_per_s"] = n_since * cfg.batch_size / (now - t_last)
                t_last, n_since = now, 0
            log.log(record)
            if bar is not None:
                post = {"loss": f"{loss_value:.4f}"}
                if "samples_per_s" in record:
                    post["samples/s"] = f"{record['samples_per_s']:.0f}"
                if skipped:
                    post["skipped"] = skipped
                bar.set_postfix(post, refresh=False)
                bar.update(1)
        if step % cfg.save_every == 0 or step == steps:
            last_ckpt = checkpoint(step) or last_ckpt
        if cfg.eval_every and step % cfg.eval_every == 0 and step != steps and dd.main:
            results = run_eval(step)
            if bar is not None:
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.1f}" for k, (v, _) in results.items()))
        if dd.world > 1 and (step % cfg.save_every == 0 or (cfg.eval_every and step % cfg.eval_every == 0)):
            dist.barrier()  # keep ranks together while rank 0 writes or evaluates
        if cfg.hang_after is not None and step >= cfg.hang_after:
            while True:  # the resume test SIGKILLs us here, mid-run, with steps logged past the checkpoint
                time.sleep(1)
    if bar is not None:
        bar.close()
    if step == steps and dd.main:
        results = run_eval(step)
        if results:
            print(format_table(results))
        if last_ckpt is not None:
            print(f"checkpoint: {last_ckpt}")
    if log is not None:
        log.close()
    if dd.world > 1:
        dist.barrier()
    return {"step": step, "loss": loss_value, "eval": results, "checkpoint": str(last_ckpt) if last_ckpt else None}

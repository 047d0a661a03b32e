"""Distributed training on CPU (gloo, 2 processes): one DDP step's loss and every parameter gradient equal those of a
single process on the concatenated batch; and ``torchrun -m llip train`` logs the same losses as one process.

"Equal" is judged by the rule of docs/design.md section 6 with float32 as the low precision: both float32 runs are
compared with a float64 run of the same step, and DDP's error may be at most twice the single process's (plus a
small floor). DDP sums in another order, so a bare tolerance that holds on one machine fails on another.

The lower-level equivalence of the global-batch ops is tested with ``llip_kernels.distributed`` itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llip_kernels.testing import check_rule
from tests.mini import MINI

pytest.importorskip("llip_kernels.distributed", reason="llip_kernels.distributed (global-batch losses) not present")

REPO = Path(__file__).resolve().parents[2]
BATCH = 12  # global; 6 per rank


def _step(
    model_name: str, rank: int, world: int, out: Path, dtype: torch.dtype = torch.float32, accum: int = 1
) -> None:
    """One forward + backward of the trainer's own code path (``accum`` > 1: in that many micro-batches with cached
    features, llip/train/accumulate.py); saves the loss and the (DDP-averaged) grads. In float64 the loss runs on
    the torch backend, which keeps float64 (the fused kernels compute in float32)."""
    import llip
    from llip.data import build_train_loader
    from llip.train.accumulate import accumulated_backward
    from llip.train.loop import compute_loss, seed_everything

    seed_everything(0)
    model = llip.create_model(model_name, **MINI).to(dtype)
    tokenizer = llip.get_tokenizer(context_length=model.context_length)
    data = build_train_loader(
        "builtin", image_size=model.image_size, transform=llip.image_transform(model.image_size, train=False),
        tokenizer=tokenizer, global_batch=BATCH, seed=0, rank=rank, world=world,
    )  # fmt: skip
    batch = next(data.batches)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    backend = "torch" if dtype == torch.float64 else None
    if accum > 1:
        loss, _ = accumulated_backward(net, model, batch["images"].to(dtype), batch["tokens"], accum=accum)
    else:
        loss, _ = compute_loss(net, model, batch["images"].to(dtype), batch["tokens"], backend=backend)
        loss.backward()
    report = loss.detach().clone()
    if world > 1:
        dist.all_reduce(report)
        report /= world
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": report.reshape(1), "grads": grads}, out / f"rank{rank}.pt")


def _worker(rank: int, world: int, model_name: str, out: str, accum: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    try:
        _step(model_name, rank, world, Path(out), accum=accum)
    finally:
        dist.destroy_process_group()


def _same_step(name: str, ddp: torch.Tensor, single: torch.Tensor, ref64: torch.Tensor) -> None:
    """The rule with float32 as the low precision; the floor is relative to the tensor's own magnitude (not to 1),
    so that small gradients (rare tokens' embeddings) are held to their own scale."""
    floor = 2e-5 * ref64.abs().max().item()
    check_rule(name, ddp, ref64, single, torch.float32, floor=floor)


@pytest.mark.parametrize("model_name, accum", [("llip-tiny", 1), ("siglip-tiny", 1), ("llip-tiny", 3)])
def test_two_process_step_matches_one_process(tmp_path, model_name, accum):
    """accum 3: each rank runs its 6 pairs as 3 micro-batches under DDP (no_sync but for the last) and still gets
    the single process's gradients of the whole 12-pair batch."""
    mp.spawn(_worker, args=(2, model_name, str(tmp_path), accum), nprocs=2, join=True)
    torch.set_num_threads(1)
    for run, dtype in (("single", torch.float32), ("single64", torch.float64)):
        (tmp_path / run).mkdir()
        _step(model_name, 0, 1, tmp_path / run, dtype)
    single = torch.load(tmp_path / "single" / "rank0.pt")
    ref64 = torch.load(tmp_path / "single64" / "rank0.pt")
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"rank{rank}.pt")
        _same_step("loss", ddp["loss"], single["loss"], ref64["loss"])
        assert ddp["grads"].keys() == single["grads"].keys() == ref64["grads"].keys()
        for name, g in single["grads"].items():
            _same_step(name, ddp["grads"][name], g, ref64["grads"][name])
    # The comparison can fail: a gradient off by one part in a thousand (a wrong normalisation would be far more).
    name, g = max(single["grads"].items(), key=lambda item: item[1].abs().max().item())
    with pytest.raises(AssertionError, match=name):
        _same_step(name, g * (1 + 1e-3), g, ref64["grads"][name])


def _losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_torchrun_cli_matches_one_process(tmp_path):
    sets = [x for k, v in MINI.items() for x in ("--set", f"{k}={v}")]
    common = [
        "-m", "llip", "train", *sets, "--steps", "3", "--batch-size", "8", "--warmup", "1", "--lr", "2e-3",
        "--workers", "0", "--no-tensorboard", "--no-progress", "--eval-images", "8",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run([*torchrun, *common, "--output", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world 2" in two.stdout
    one = subprocess.run([sys.executable, *common, "--output", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    # Same global batch, same initial weights, equal gradients: the same trajectory up to float reordering.
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)

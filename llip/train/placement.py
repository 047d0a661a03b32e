"""Where a run runs: its rank among the processes, its device, and whether the requested kernel backend can run
there. Every check fails before the run writes anything, with one line saying what to change."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..errors import UsageError

if TYPE_CHECKING:
    from llip.model import LlipModel


@dataclass
class Ranks:
    """This process's place in the run: its rank, the world size and its GPU index on the node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Ranks:
    """Join the process group ``torchrun`` describes (NCCL on GPUs, gloo on CPUs); one rank without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(requested: str, local_rank: int = 0) -> str:
    """``auto``: this rank's GPU, else the CPU; ``cuda`` (no index): this rank's GPU; else the device named, checked
    to exist here."""
    if requested == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {requested!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {requested}: no CUDA device is available here (torch {torch.__version__}, "
                f"CUDA {torch.version.cuda or 'none: a CPU-only build'})"
            )
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: cuda:{index} does not exist ({torch.cuda.device_count()} GPUs)")
        return f"cuda:{index}"
    if device.type != "cpu":
        raise UsageError(f"--device {requested}: only cpu and cuda devices are supported")
    return "cpu"


def check_backend(backend: str | None, model: LlipModel, device: str, precision: str = "fp32") -> None:
    """``--backend`` must be able to run this model's Llip loss here (its reasons otherwise), before step 1."""
    if backend in (None, "auto") or model.config.kind != "llip":
        return
    from llip_kernels import dispatch
    from llip_kernels._validate import LlipProblem
    from llip_kernels.algebra import Op

    if backend not in dispatch.BACKEND_MODULES:
        raise UsageError(f"--backend {backend!r}: choose one of {', '.join(sorted(dispatch.BACKEND_MODULES))}")
    c = model.config
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    op = Op.SIGMOID_LOSS if c.loss == "sigmoid" else Op.SOFTMAX_LOSS
    problem = LlipProblem(op, 2, 2, c.H, c.K, c.D // c.H, dtype, torch.device(device), c.tau, True)
    why = dispatch.reasons_for(backend, problem)
    if why:
        raise UsageError(f"--backend {backend} cannot run {c.name}'s mixer on {device}: " + "; ".join(why))

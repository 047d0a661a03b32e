"""Sharded data parallel (``llip train --fsdp``): each of N ranks holds 1/N of every parameter, gradient and AdamW
moment (PyTorch's FSDP2, ``fully_shard``), where DDP holds all of them on every rank. The batch is split across
ranks as under DDP and the loss still covers the global batch, so a run trains as one process would, to rounding.

Units: each transformer block of both towers is sharded on its own (gathered just before its forward and again
before its backward, freed after each), and the root holds the rest (embeddings, final norms, the Llip head and
projections). The root is gathered for the whole forward and stays gathered until the backward has run
(``reshard_after_forward=False``): the loss reads ``w_out`` from the forward's output dict after the forward has
returned, and needs its full value and its gradient there.

FSDP2 cannot shard 0-dim parameters (the logit scale and bias). They stay replicated on every rank, outside
FSDP, and :func:`reduce_replicated_grads` averages their gradients across ranks after the backward, as DDP would.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from llip.model import LlipModel


def shard_model(model: LlipModel) -> None:
    """Shard ``model`` in place across the default process group (call before building the optimiser: sharding
    replaces every parameter with a sharded ``DTensor`` one)."""
    from torch.distributed.fsdp import fully_shard

    # FSDP warns that the root returns views (the heads' k, v, q reshaped) because an in-place op on one would skip
    # its gradient hook; the outputs here are only read (by the loss), never modified in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
    for tower in (model.visual, model.text):
        for block in tower.transformer.blocks:
            fully_shard(block)
    scalars = {p for p in model.parameters() if p.ndim == 0}
    fully_shard(model, reshard_after_forward=False, ignored_params=scalars)


def replicated_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters FSDP left whole on every rank (the 0-dim ones), trainable or not."""
    from torch.distributed.tensor import DTensor

    return [p for p in model.parameters() if not isinstance(p, DTensor)]


def reduce_replicated_grads(model: torch.nn.Module) -> None:
    """Average the replicated parameters' gradients over the ranks (FSDP reduces only the sharded ones). One
    all-reduce for all of them; a parameter without a gradient on this rank counts as a zero gradient, so that every
    rank sends the same number of values."""
    params = [p for p in replicated_params(model) if p.requires_grad]
    if not params:
        return
    flat = torch.stack([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(()) for p in params])
    dist.all_reduce(flat)  # a sum: gloo has no average
    flat /= dist.get_world_size()
    for p, g in zip(params, flat):
        p.grad = g.reshape(p.shape).clone()


@contextlib.contextmanager
def no_gradient_sync(model: torch.nn.Module) -> Iterator[None]:
    """FSDP2's counterpart of DDP's ``no_sync``: backward passes in this region accumulate unsharded gradients
    locally, without the reduce-scatter; the next pass outside it reduces everything accumulated."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def gather_full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state dict, on the CPU of rank 0 (an empty dict on the other ranks). A collective: every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

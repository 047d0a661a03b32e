"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss``: change the import, keep the training script.

    from llip_kernels.open_clip import ClipLoss, SigLipLoss   # was: from open_clip.loss import ...
    loss = SigLipLoss(rank=args.rank, world_size=args.world_size)
    total = loss(**model_out, output_dict=True)["contrastive_loss"]

Same constructor arguments, same ``forward(image_features, text_features, logit_scale, logit_bias, output_dict)``
(extra keys of open_clip's model output, such as ``image_embs``, are not accepted, as in open_clip), same values
and gradients to float32 rounding (tests/kernels/test_open_clip_losses.py runs both). What changes:

- The ``[B, B]`` logits are never held: the blocked losses of :mod:`llip_kernels.pooled` keep ``block`` rows of
  them at a time (``block=None``: the plain ``[B, B]`` path of :mod:`llip_kernels.baselines`).
- Several processes (``world_size > 1``): the texts (and, for CLIP, the images) are all-gathered with their
  gradients summed back to their owner (:mod:`llip_kernels.distributed`), which gives every rank open_clip's
  per-rank loss value and DDP the exact gradients of the global batch. For SigLIP this is what every
  ``dist_impl`` of open_clip computes, so the argument is accepted and only checked. For CLIP it is open_clip's
  ``local_loss=True, gather_with_grad=True``; its other settings scale the gradients by ``1 / world_size`` or drop
  the other ranks' terms, so they are refused rather than silently changed. Horovod is not supported.
- ``rank`` / ``world_size`` must agree with the initialised ``torch.distributed`` process group.
- Both normalise the features. open_clip's models already did, so the loss value changes by rounding only; the
  gradient with respect to the (unit) features loses its radial part, which the model's own normalisation
  removes anyway: the gradients of the parameters are open_clip's.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from . import baselines, distributed
from .pooled import DEFAULT_BLOCK, check_block, fused_sigmoid_loss, fused_softmax_loss

SIGLIP_DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")


def _check_world(rank: int, world_size: int, what: str) -> None:
    """``rank`` / ``world_size`` as open_clip takes them, checked against the process group the losses use."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{what}: {name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{what}: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size == 1:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{what}: world_size={world_size} needs an initialised torch.distributed process group")
    if (dist.get_world_size(), dist.get_rank()) != (world_size, rank):
        raise ValueError(
            f"{what}: rank={rank}, world_size={world_size} disagree with the process group "
            f"(rank {dist.get_rank()} of {dist.get_world_size()})"
        )


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss(cache_labels, rank, world_size, dist_impl)``: ``-(1/B) sum log sigmoid(l (t cos + b))``
    over this rank's images against every rank's texts; ``block`` image rows are scored at a time."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 *, block: int | None = DEFAULT_BLOCK):  # fmt: skip
        super().__init__()
        if dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {SIGLIP_DIST_IMPLS}, got {dist_impl!r}")
        self.cache_labels = cache_labels  # accepted for open_clip's signature; labels are never materialised here
        self.rank, self.world_size, self.dist_impl = rank, world_size, dist_impl
        self.block = None if block is None else check_block(block)

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        _check_world(self.rank, self.world_size, "SigLipLoss")
        if self.world_size > 1:
            loss = distributed.sigmoid_loss_distributed(
                image_features, text_features, logit_scale, logit_bias, block=self.block
            )
        elif self.block is None:
            loss = baselines.sigmoid_loss(image_features, text_features, logit_scale, logit_bias)
        else:
            loss = fused_sigmoid_loss(image_features, text_features, logit_scale, logit_bias, block=self.block)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, block={self.block}"


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod)``: the
    mean of the image->text and text->image cross-entropies (``logit_bias`` is accepted and, as the loss is
    shift-invariant, changes nothing); ``block`` image rows are scored at a time on one process."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False,
                 *, block: int | None = DEFAULT_BLOCK):  # fmt: skip
        super().__init__()
        if use_horovod:
            raise ValueError("ClipLoss: use_horovod is not supported; use torch.distributed (torchrun)")
        if world_size > 1 and not (local_loss and gather_with_grad):
            raise ValueError(
                "ClipLoss: with world_size > 1 these losses compute open_clip's local_loss=True, "
                "gather_with_grad=True (the exact gradients of the global batch); pass both (open_clip's other "
                "settings scale the gradients by 1/world_size or drop the other ranks' terms)"
            )
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size = rank, world_size
        self.block = None if block is None else check_block(block)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        _check_world(self.rank, self.world_size, "ClipLoss")
        if self.world_size > 1:
            loss = distributed.softmax_loss_distributed(image_features, text_features, logit_scale)
        elif self.block is None:
            loss = baselines.softmax_loss(image_features, text_features, logit_scale)
        else:
            loss = fused_softmax_loss(image_features, text_features, logit_scale, block=self.block)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, block={self.block}"

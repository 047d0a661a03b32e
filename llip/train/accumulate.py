"""Gradient accumulation with feature caching (``llip train --accum-freq N``): the contrastive batch stays the whole
batch while the towers see ``N`` micro-batches at a time, and the gradients are exactly those of one large batch.

A contrastive loss couples every image with every caption, so summing the gradients of ``N`` micro-batch losses
would change the loss (each micro-batch would only see its own negatives). Instead (as open_clip's
``--accum-freq``):

1. every micro-batch is run forward without gradients and its per-sample outputs are kept (``k, v, q, y`` for
   Llip, ``image, text`` for the pooled kinds: a few numbers per sample, not the towers' activations);
2. micro-batch ``j`` is run forward again with gradients, its outputs replace its cached ones, the loss of the
   whole batch is computed and back-propagated. Only micro-batch ``j``'s features are live, so this pass adds
   ``dL/dtheta`` through micro-batch ``j``; over ``j = 1..N`` that sums to the full gradient.

Outputs that are not per-sample (``logit_scale``, ``logit_bias``, ``w_out``: the same tensor in every pass) enter
the loss directly; they are live in the last pass only, so their direct gradient is added once, not ``N`` times.
The last pass is the one DDP synchronises (the others run under ``no_sync``, or without FSDP's gradient sync under
``--fsdp``), so every parameter has its gradient there, as DDP requires. The price: each micro-batch's towers run
forward twice (about 1.3x the compute of a step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

SHARED_OUTPUTS = ("logit_scale", "logit_bias", "w_out")  # not per-sample: live in one pass only


def accumulated_backward(
    net, model, images: torch.Tensor, tokens: torch.Tensor, *, accum: int, backend: str | None = None,
    autocast=None, backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Forward and backward of ``images [B, 3, S, S]``, ``tokens [B, L]`` in ``accum`` micro-batches (sizes as
    ``torch.tensor_split`` gives them); gradients accumulate into the parameters' ``.grad`` as one batch's would.
    ``backward(loss)`` runs each pass's backward (the trainer passes its grad scaler's). Returns the loss of the
    whole batch (detached) and the outputs of the last pass."""
    if accum < 1 or accum > images.shape[0]:
        raise ValueError(f"accum must be between 1 and the batch size {images.shape[0]}, got {accum}")
    region = autocast if autocast is not None else contextlib.nullcontext()
    chunks = list(zip(images.tensor_split(accum), tokens.tensor_split(accum)))
    with torch.no_grad(), region:
        cached = [net(i, t) for i, t in chunks]
    per_sample = [key for key in cached[0] if key not in SHARED_OUTPUTS]
    loss_value = None
    for j, (i, t) in enumerate(chunks):
        last = j == len(chunks) - 1
        with contextlib.nullcontext() if last else _no_sync(net):
            with region:
                out = net(i, t)
                merged = {key: torch.cat([out[key] if m == j else cached[m][key] for m in range(len(chunks))])
                          for key in per_sample}  # fmt: skip
                for key in SHARED_OUTPUTS:
                    if key in out:
                        merged[key] = out[key] if last else out[key].detach()
                loss = model.loss(merged, backend=backend)
            backward(loss)
        if loss_value is None:
            loss_value = loss.detach()
    return loss_value, out


def _no_sync(net) -> contextlib.AbstractContextManager:
    """A region whose backward passes only accumulate gradients locally: DDP's ``no_sync``, its equivalent for a
    model sharded with FSDP, nothing for a single process. (Duck-typed: a compiled wrapper forwards both.)"""
    if hasattr(net, "set_requires_gradient_sync"):
        from .fsdp import no_gradient_sync

        return no_gradient_sync(net)
    return net.no_sync() if hasattr(net, "no_sync") else contextlib.nullcontext()

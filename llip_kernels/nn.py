"""``nn.Module`` wrappers of the losses, for code that composes modules."""

from __future__ import annotations

import torch
from torch import nn

from . import baselines, functional
from ._validate import check_tau


class LlipSigmoidLoss(nn.Module):
    """``forward(k, v, q, y, w_out, logit_scale, logit_bias, pos_offset=0)`` -> SigLIP loss on Llip scores. The
    keywords are those of an llip model's output: ``LlipSigmoidLoss(model.tau)(**model(images, tokens))``."""

    def __init__(self, tau: float, backend: str | None = None):
        super().__init__()
        self.tau = check_tau(tau)
        self.backend = backend

    def forward(self, k, v, q, y, w_out, logit_scale, logit_bias, pos_offset: int | None = 0) -> torch.Tensor:
        return functional.llip_sigmoid_loss(
            k, v, q, y, w_out, logit_scale, logit_bias, tau=self.tau, pos_offset=pos_offset, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"tau={self.tau}, backend={self.backend!r}"


class LlipSoftmaxLoss(nn.Module):
    """``forward(k, v, q, y, w_out, logit_scale)`` -> symmetric InfoNCE on Llip scores (``Bi == Bt``).

    ``logit_bias`` is accepted and ignored (InfoNCE is shift-invariant per row and column), so the output dict of
    an llip model can be passed as is: ``LlipSoftmaxLoss(model.tau)(**model(images, tokens))``."""

    def __init__(self, tau: float, backend: str | None = None):
        super().__init__()
        self.tau = check_tau(tau)
        self.backend = backend

    def forward(self, k, v, q, y, w_out, logit_scale, logit_bias=None) -> torch.Tensor:
        return functional.llip_softmax_loss(k, v, q, y, w_out, logit_scale, tau=self.tau, backend=self.backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, backend={self.backend!r}"


class SigmoidLoss(nn.Module):
    """``forward(img, txt, logit_scale, logit_bias, pos_offset=0)`` -> SigLIP loss on pooled embeddings."""

    def forward(self, img, txt, logit_scale, logit_bias, pos_offset: int | None = 0) -> torch.Tensor:
        return baselines.sigmoid_loss(img, txt, logit_scale, logit_bias, pos_offset=pos_offset)


class SoftmaxLoss(nn.Module):
    """``forward(img, txt, logit_scale)`` -> CLIP loss on pooled embeddings."""

    def forward(self, img, txt, logit_scale) -> torch.Tensor:
        return baselines.softmax_loss(img, txt, logit_scale)

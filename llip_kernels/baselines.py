"""CLIP and SigLIP losses on pooled embeddings: the baselines Llip is compared with.

``img: [Bi, D]``, ``txt: [Bt, D]`` in any floating dtype; both are L2-normalised inside (F.normalize,
eps 1e-12) and the loss is returned in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import autocast_off, check_pooled_inputs, check_pos_offset, check_scalar
from .algebra import sigmoid_loss_from_logits, softmax_loss_from_logits


def pooled_logits(img: torch.Tensor, txt: torch.Tensor, logit_scale=None, logit_bias=None) -> torch.Tensor:
    """``logit_scale * cos(img_i, txt_j) + logit_bias`` -> ``[Bi, Bt]`` float32."""
    check_pooled_inputs(img, txt, square=False)
    t = check_scalar("logit_scale", logit_scale, img.device, 1.0)
    b = check_scalar("logit_bias", logit_bias, img.device, 0.0)
    acc = torch.float64 if torch.float64 in (img.dtype, txt.dtype) else torch.float32
    with autocast_off(img.device):  # float32 (or float64) as documented, whatever an enclosing autocast says
        cos = F.normalize(img.to(acc), dim=-1) @ F.normalize(txt.to(acc), dim=-1).t()
        return t * cos + b


def sigmoid_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale, logit_bias, *, pos_offset: int | None = 0):
    """SigLIP (Zhai et al. 2023): ``-(1/Bi) sum_ij log sigmoid(l_ij (t cos_ij + b))``, ``l_ij = +1`` iff
    ``j == i + pos_offset``; ``pos_offset=None``: all pairs negative."""
    pos_offset = check_pos_offset(pos_offset)
    if logit_scale is None or logit_bias is None:
        raise TypeError("sigmoid_loss needs logit_scale and logit_bias (numbers or 0-dim tensors)")
    return sigmoid_loss_from_logits(pooled_logits(img, txt, logit_scale, logit_bias), pos_offset)


def softmax_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale) -> torch.Tensor:
    """CLIP (Radford et al. 2021): mean of the image->text and text->image cross-entropies over
    ``t * cos``, diagonal positives; needs ``Bi == Bt``."""
    check_pooled_inputs(img, txt, square=True)
    if logit_scale is None:
        raise TypeError("softmax_loss needs logit_scale (a number or a 0-dim tensor)")
    return softmax_loss_from_logits(pooled_logits(img, txt, logit_scale, None))

"""The two towers: a pre-LN ViT with K prepended mixture tokens and the CLIP text transformer.

Layout and parameter shapes follow OpenAI CLIP / OpenCLIP (fused ``in_proj`` of ``[3W, W]`` with bias, MLP
``c_fc``/``c_proj``, QuickGELU), so parameter counts match the published ViT/CLIP sizes. Attention runs through
``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation the OpenAI CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (``in_proj_weight [3W, W]``, as CLIP)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, L, W = x.shape
        qkv = self.in_proj(x).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, h, L, hw]
        q, k, v = qkv.unbind(0)  # unbind, not qkv[0..2]: three selects would each backprop a full-size zero tensor
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, h, L, hw]
        return self.out_proj(out.transpose(1, 2).reshape(B, L, W))


class Block(nn.Module):
    """Pre-LN residual block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), QuickGELU(), nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`Block`; ``grad_checkpointing`` recomputes each block's activations in the backward."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList([Block(width, heads, mlp_width) for _ in range(layers)])
        self._init_weights(width, layers)

    def _init_weights(self, width: int, layers: int) -> None:
        # CLIP's init: std W^-0.5 for attention inputs, scaled down with depth for the residual projections.
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for blk in self.blocks:
            nn.init.normal_(blk.attn.in_proj.weight, std=attn_std)
            nn.init.zeros_(blk.attn.in_proj.bias)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(blk.attn.out_proj.bias)
            nn.init.normal_(blk.mlp[0].weight, std=fc_std)
            nn.init.normal_(blk.mlp[2].weight, std=proj_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, self.causal, use_reentrant=False)
            else:
                x = blk(x, self.causal)
        return x


class VisionTower(nn.Module):
    """Pre-LN ViT with ``num_tokens`` learned tokens prepended to the patches (K mixture tokens, or 1 class token).

    ``forward(images [B, 3, S, S]) -> [B, num_tokens, W]``: ``ln_post`` of the first ``num_tokens`` outputs
    (patch outputs are dropped). The position table has ``num_tokens + grid^2`` rows, one per token.
    """

    def __init__(
        self, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_width: int, num_tokens: int
    ):
        super().__init__()
        self.image_size = image_size
        self.num_tokens = num_tokens
        grid = image_size // patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.tokens = nn.Parameter(scale * torch.randn(num_tokens, width))  # [K, W]
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_tokens + grid * grid, width))  # [K+g^2, W]
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_width, causal=False)
        self.ln_post = nn.LayerNorm(width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images)  # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g^2, W]
        tokens = self.tokens.to(x.dtype).expand(x.shape[0], -1, -1)  # [B, K, W]
        x = torch.cat([tokens, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, K + g^2, W]
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, : self.num_tokens])  # [B, K, W]


class TextTower(nn.Module):
    """The CLIP text transformer: ``forward(tokens [B, L] int64) -> [B, Wt]``, the ``ln_final`` feature at the
    end-of-text token (found as the largest token id in each row, as CLIP does: 49407 is the largest id)."""

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))  # [L, Wt]
        self.transformer = Transformer(width, layers, heads, 4 * width, causal=True)
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding  # [B, L, Wt]
        x = self.ln_final(self.transformer(x))
        eot = tokens.argmax(dim=-1)  # [B]
        return x[torch.arange(x.shape[0], device=x.device), eot]  # [B, Wt]

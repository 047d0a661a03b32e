"""The two towers: a pre-LN ViT with K prepended mixture tokens and the CLIP text transformer.

Layout and parameter shapes follow OpenAI CLIP / OpenCLIP (fused ``in_proj`` of ``[3W, W]`` with bias, MLP
``c_fc``/``c_proj``, QuickGELU or GELU), so parameter counts match the published ViT/CLIP sizes and open_clip's
weights load by renaming (llip/model/pretrained.py). ``big_vision=True`` gives SigLIP's variant of the same blocks
as open_clip builds it (timm's SigLIP ViT and open_clip's bidirectional text tower): LayerNorm eps 1e-6, a patch
convolution with a bias, no ``ln_pre``, optionally the multi-head attention pool (:class:`AttentionPool`) instead
of prepended tokens, and text pooled at the last position. Attention runs through
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


ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


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

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), ACTIVATIONS[activation](), nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`Block`; ``grad_checkpointing`` recomputes each block's activations in the backward.

    ``init``: "clip", CLIP's normal init (the text tower); "pytorch", what PyTorch gives the official vision tower's
    blocks, which have no init of their own: ``nn.MultiheadAttention``'s (Xavier-uniform in-projection, zero
    biases) and ``nn.Linear``'s defaults elsewhere (uniform in +-fan_in^-0.5; std 0.0208 at W = 768).
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_width: int,
        causal: bool,
        activation: str,
        eps: float = 1e-5,
        init: str = "clip",
    ):
        super().__init__()
        self.causal = causal
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList([Block(width, heads, mlp_width, activation, eps) for _ in range(layers)])
        if init == "pytorch":
            for blk in self.blocks:
                nn.init.xavier_uniform_(blk.attn.in_proj.weight)
                nn.init.zeros_(blk.attn.in_proj.bias)
                nn.init.zeros_(blk.attn.out_proj.bias)
        elif init == "clip":
            self._init_clip(width, layers)
        else:
            raise ValueError(f"init must be 'clip' or 'pytorch', got {init!r}")

    def _init_clip(self, width: int, layers: int) -> None:
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


class AttentionPool(nn.Module):
    """SigLIP's multi-head attention pooling (MAP, as timm's ``AttentionPoolLatent``): one learned query attends over
    the tower's outputs, then a projection and a residual MLP. ``forward(x [B, N, W]) -> [B, 1, W]``."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str, eps: float):
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(width**-0.5 * torch.randn(1, width))  # [1, W]: the query before ``q``
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), ACTIVATIONS[activation](), nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, W = x.shape
        hw = W // self.heads
        q = self.q(self.latent.to(x.dtype)).view(1, self.heads, 1, hw).expand(B, -1, -1, -1)  # [B, h, 1, hw]
        k, v = self.kv(x).view(B, N, 2, self.heads, hw).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, N, hw]
        out = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, W))  # [B, 1, W]
        return out + self.mlp(self.norm(out))


class VisionTower(nn.Module):
    """Pre-LN ViT with ``num_tokens`` learned tokens prepended to the patches (K mixture tokens, or 1 class token).

    ``forward(images [B, 3, S, S]) -> [B, num_tokens, W]``: ``ln_post`` of the first ``num_tokens`` outputs
    (patch outputs are dropped). The position table has ``num_tokens + grid^2`` rows, one per token.
    With ``attention_pool`` (big_vision siglip) nothing is prepended (table of ``grid^2`` rows) and the output is
    :class:`AttentionPool` of all ``ln_post`` outputs, ``[B, 1, W]``.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_width: int,
        num_tokens: int,
        activation: str = "quick_gelu",
        big_vision: bool = False,
        attention_pool: bool = False,
    ):
        super().__init__()
        self.image_size = image_size
        self.num_tokens = 0 if attention_pool else num_tokens  # prepended tokens
        grid = image_size // patch_size
        scale = width**-0.5
        eps = 1e-6 if big_vision else 1e-5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=big_vision)
        if self.num_tokens:
            self.tokens = nn.Parameter(scale * torch.randn(self.num_tokens, width))  # [K, W]
        rows = self.num_tokens + grid * grid
        self.positional_embedding = nn.Parameter(scale * torch.randn(rows, width))  # [K + g^2, W]
        self.ln_pre = nn.Identity() if big_vision else nn.LayerNorm(width)
        self.transformer = Transformer(
            width, layers, heads, mlp_width, causal=False, activation=activation, eps=eps, init="pytorch"
        )
        self.ln_post = nn.LayerNorm(width, eps=eps)
        self.pool = AttentionPool(width, heads, mlp_width, activation, eps) if attention_pool else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images)  # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g^2, W]
        if self.num_tokens:
            tokens = self.tokens.to(x.dtype).expand(x.shape[0], -1, -1)  # [B, K, W]
            x = torch.cat([tokens, x], dim=1)  # [B, K + g^2, W]
        x = self.transformer(self.ln_pre(x + self.positional_embedding.to(x.dtype)))
        if self.pool is not None:
            return self.pool(self.ln_post(x))  # [B, 1, W]
        return self.ln_post(x[:, : self.num_tokens])  # [B, K, W]


class TextTower(nn.Module):
    """The CLIP text transformer: ``forward(tokens [B, L] int64) -> [B, Wt]``, the ``ln_final`` feature at the
    end-of-text token (found as the largest token id in each row, as CLIP does: 49407 is the largest id).

    ``big_vision``: SigLIP's text tower instead: no causal mask, the feature at the last position (the sequences are
    padded to L, as SigLIP was trained), LayerNorm eps 1e-6 and an MLP of ``mlp_width``.
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        layers: int,
        heads: int,
        activation: str = "quick_gelu",
        big_vision: bool = False,
        mlp_width: int | None = None,
    ):
        super().__init__()
        self.context_length = context_length
        self.pool_last = big_vision
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))  # [L, Wt]
        eps = 1e-6 if big_vision else 1e-5
        self.transformer = Transformer(
            width, layers, heads, mlp_width or 4 * width, causal=not big_vision, activation=activation, eps=eps
        )
        self.ln_final = nn.LayerNorm(width, eps=eps)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding  # [B, L, Wt]
        x = self.ln_final(self.transformer(x))
        if self.pool_last:
            return x[:, -1]  # [B, Wt]
        eot = tokens.argmax(dim=-1)  # [B]
        return x[torch.arange(x.shape[0], device=x.device), eot]  # [B, Wt]

"""Llip on any ViT and text tower: :class:`MixtureTokens` adds K learned tokens to a ViT's token sequence and
:class:`LlipHead` turns their outputs and a text feature into the inputs of the Llip losses (docs/design.md
section 1). :class:`~llip.model.model.LlipModel` computes the same projections with :func:`project_tokens` and
:func:`project_query`.

Used with an open_clip model (examples/open_clip_llip.py runs this on the built-in data):

    mixture = MixtureTokens(K, W).attach(model.visual.transformer)   # K tokens ride along the patch tokens
    head = LlipHead(vision_width=W, text_width=D, embed_dim=D, num_tokens=K, num_heads=H, tau=5.0)
    model.encode_image(images)                                       # the trunk runs with the K tokens ...
    text = model.encode_text(tokens, normalize=False)                # [B, D]
    out = head(mixture.pop(), text_features=text, text_embedding=text)   # ... whose outputs the head takes
    loss = llip_kernels.nn.LlipSigmoidLoss(head.tau)(**out, logit_scale=t, logit_bias=b)
"""

from __future__ import annotations

import torch
from torch import nn


def project_tokens(h: torch.Tensor, k_proj, v_proj, k_norm: nn.Module, v_norm: nn.Module, heads: int):
    """Mixture-token outputs ``h [B, K, W]`` -> keys and values ``[B, H, K, d]``: token ``k`` has its own
    ``[W, D]`` key and value matrices (``k_proj, v_proj: [K, W, D]``); head ``h`` owns columns ``h*d:(h+1)*d``."""
    B, K, _ = h.shape
    k = k_norm(torch.einsum("bkw,kwd->bkd", h, k_proj.to(h.dtype)))  # [B, K, D]
    v = v_norm(torch.einsum("bkw,kwd->bkd", h, v_proj.to(h.dtype)))  # [B, K, D]
    d = k.shape[-1] // heads
    return k.view(B, K, heads, d).transpose(1, 2), v.view(B, K, heads, d).transpose(1, 2).to(k.dtype)


def project_query(g: torch.Tensor, q_proj, q_norm: nn.Module, heads: int) -> torch.Tensor:
    """Text features ``g [B, Wt]`` -> one query per head ``[B, H, d]`` (``q_proj: [Wt, D]``)."""
    q = q_norm(g @ q_proj.to(g.dtype))  # [B, D]
    return q.view(q.shape[0], heads, -1)


class LlipHead(nn.Module):
    """The Llip head: per-token key and value projections ``[K, W, D]``, the query projection ``[Wt, D]`` and the
    output matrix ``W_out [D, D]``, initialised as :class:`~llip.model.model.LlipModel` does.

    ``forward(image_tokens [B, K, W], *, text_features [B, Wt], text_embedding [B, D])`` -> ``{k, v, q, y, w_out}``
    (``k, v: [B, H, K, d]``, ``q: [B, H, d]``, ``y = text_embedding``), the keywords of
    :class:`llip_kernels.nn.LlipSigmoidLoss` / ``LlipSoftmaxLoss`` (add ``logit_scale`` and ``logit_bias``).
    ``text_features`` feed the queries (the official model uses the text tower's pooled output before its
    projection; the projected embedding works too when that is all a tower returns). ``image_norm`` applies a
    LayerNorm to the tokens first (for trunks whose token outputs are not normalised, as open_clip's)."""

    def __init__(self, *, vision_width: int, text_width: int, embed_dim: int, num_tokens: int, num_heads: int,
                 tau: float, qkv_norm: bool = False, image_norm: bool = True):  # fmt: skip
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        W, Wt, D, K = vision_width, text_width, embed_dim, num_tokens
        self.num_tokens, self.num_heads, self.tau = K, num_heads, float(tau)
        self.image_norm = nn.LayerNorm(W) if image_norm else nn.Identity()
        self.k_proj = nn.Parameter(W**-0.5 * torch.randn(K, W, D))  # [K, W, D]
        self.v_proj = nn.Parameter(W**-0.5 * torch.randn(K, W, D))  # [K, W, D]
        self.q_proj = nn.Parameter(Wt**-0.5 * torch.randn(Wt, D))  # [Wt, D]
        self.w_out = nn.Parameter(D**-0.5 * torch.randn(D, D))  # [D, D]
        norm = nn.LayerNorm if qkv_norm else nn.Identity
        self.k_norm, self.v_norm, self.q_norm = norm(D), norm(D), norm(D)

    def forward(self, image_tokens: torch.Tensor, *, text_features: torch.Tensor, text_embedding: torch.Tensor):
        if image_tokens.dim() != 3 or image_tokens.shape[1:] != self.k_proj.shape[:2]:
            raise ValueError(
                f"image_tokens must be [B, {self.num_tokens}, {self.k_proj.shape[1]}] (the K mixture-token outputs), "
                f"got {list(image_tokens.shape)}"
            )
        k, v = project_tokens(self.image_norm(image_tokens), self.k_proj, self.v_proj, self.k_norm, self.v_norm,
                              self.num_heads)  # fmt: skip
        q = project_query(text_features, self.q_proj, self.q_norm, self.num_heads)
        return {"k": k, "v": v, "q": q, "y": text_embedding, "w_out": self.w_out}

    def extra_repr(self) -> str:
        K, W, D = self.k_proj.shape
        return f"num_tokens={K}, vision_width={W}, embed_dim={D}, num_heads={self.num_heads}, tau={self.tau}"


class MixtureTokens(nn.Module):
    """K learned tokens appended to the token sequence of a ViT's transformer, their outputs taken off again.

    :meth:`attach` hooks a module that maps a batch-first sequence ``[B, T, W]`` to ``[B, T, W]`` (open_clip's
    ``model.visual.transformer``, a timm ViT's ``blocks``): on the way in the K tokens are appended (``[B, T + K,
    W]``, so they attend to every patch and the patches to them, as the paper's mixture tokens do); on the way out
    their outputs are removed (the trunk's own pooling sees ``[B, T, W]`` as before) and kept for :meth:`pop`.
    Token outputs of one forward are kept until popped; a second forward before that is an error, so outputs
    never pair with the wrong batch."""

    def __init__(self, num_tokens: int, width: int):
        super().__init__()
        self.tokens = nn.Parameter(width**-0.5 * torch.randn(num_tokens, width))  # [K, W]
        self._outputs: torch.Tensor | None = None
        self._handles = []

    def attach(self, module: nn.Module) -> MixtureTokens:
        """Hook ``module`` (see the class docstring); returns self. :meth:`detach` removes the hooks."""
        if self._handles:
            raise RuntimeError("these MixtureTokens are attached already; detach() first")
        self._handles = [
            module.register_forward_pre_hook(self._append, with_kwargs=True),
            module.register_forward_hook(self._remove, with_kwargs=True),
        ]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._outputs = [], None

    def pop(self) -> torch.Tensor:
        """The K token outputs ``[B, K, W]`` of the last forward through the hooked module."""
        if self._outputs is None:
            raise RuntimeError("no token outputs: run the hooked trunk (e.g. model.encode_image) first")
        out, self._outputs = self._outputs, None
        return out

    def _append(self, module, args, kwargs):
        if self._outputs is not None:
            raise RuntimeError("the previous forward's mixture-token outputs were never popped (MixtureTokens.pop)")
        x = args[0]
        if x.dim() != 3 or x.shape[-1] != self.tokens.shape[1]:
            raise ValueError(f"MixtureTokens expect a batch-first [B, T, {self.tokens.shape[1]}] sequence, got "
                             f"{list(x.shape)}")  # fmt: skip
        tokens = self.tokens.to(x.dtype).expand(x.shape[0], -1, -1)
        return (torch.cat([x, tokens], dim=1), *args[1:]), kwargs

    def _remove(self, module, args, kwargs, output):
        K = self.tokens.shape[0]
        self._outputs = output[:, -K:]
        return output[:, :-K]

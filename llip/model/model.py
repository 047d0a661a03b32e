"""The Llip model (docs/design.md section 1) and its pooled baselines (CLIP, SigLIP, register, avg) on the same towers.

Shapes: B images / texts, K mixture tokens, W vision width, Wt text width, D embedding dim, H heads,
d = D / H. ``forward(images [B, 3, S, S], tokens [B, L] int64)`` returns a dict (the trainer contract):

- llip: ``k, v: [B, H, K, d]``, ``q: [B, H, d]``, ``y: [B, D]``, ``w_out: [D, D]`` (all in k's dtype),
  ``logit_scale`` (0-dim, the multiplier t = exp(param)), ``logit_bias`` (0-dim);
- pooled kinds: ``image: [B, D]``, ``text: [B, D]`` (not normalised), ``logit_scale``, ``logit_bias``.

``loss(out)`` scores the batch with ``llip_kernels`` (``backend=`` picks the implementation). The mixer temperature
is not in the dict: it is a fixed hyper-parameter, read from the model as :attr:`LlipModel.tau`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..configs import ModelConfig
from .head import project_query, project_tokens
from .towers import TextTower, VisionTower

MAX_LOGIT_SCALE = math.log(100.0)


class LlipModel(nn.Module):
    """Vision and text towers plus the heads of ``config.kind``. Build it with :func:`llip.create_model`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.kind = c.kind
        big_vision = c.towers == "big_vision"
        self.image_size = c.image_size
        self.context_length = c.context_length
        self.visual = VisionTower(
            c.image_size,
            c.patch_size,
            c.vision_width,
            c.vision_layers,
            c.vision_heads,
            c.mlp_width,
            num_tokens=c.K,
            activation=c.activation,
            big_vision=big_vision,
            attention_pool=big_vision and c.kind == "siglip",
        )
        self.text = TextTower(
            c.vocab_size,
            c.context_length,
            c.text_width,
            c.text_layers,
            c.text_heads,
            activation=c.activation,
            big_vision=big_vision,
            mlp_width=int(c.text_width * c.mlp_ratio) if big_vision else None,
        )
        W, Wt, D = c.vision_width, c.text_width, c.D
        if c.kind == "llip":
            # One key and one value matrix per mixture token (ref. code), query from the pooled text feature.
            self.k_proj = nn.Parameter(W**-0.5 * torch.randn(c.K, W, D))  # [K, W, D]
            self.v_proj = nn.Parameter(W**-0.5 * torch.randn(c.K, W, D))  # [K, W, D]
            self.q_proj = nn.Parameter(Wt**-0.5 * torch.randn(Wt, D))  # [Wt, D]
            self.w_out = nn.Parameter(D**-0.5 * torch.randn(D, D))  # [D, D]
            norm = nn.LayerNorm if c.qkv_norm else nn.Identity
            self.k_norm, self.v_norm, self.q_norm = norm(D), norm(D), norm(D)
        elif c.kind == "avg":  # one projection per token, averaged after projecting (ref. code)
            self.image_projection = nn.Parameter(W**-0.5 * torch.randn(c.K, W, D))  # [K, W, D]
        elif not big_vision:  # big_vision siglip: the attention pool's output is the embedding (D = W)
            self.image_projection = nn.Parameter(W**-0.5 * torch.randn(W, D))  # [W, D]
        self.text_projection = nn.Parameter(Wt**-0.5 * torch.randn(Wt, D))  # [Wt, D]
        self.text_projection_bias = nn.Parameter(torch.zeros(D)) if big_vision else None  # [D]
        self.logit_scale = nn.Parameter(torch.tensor(float(c.init_logit_scale)))
        if c.loss == "sigmoid":
            self.logit_bias = nn.Parameter(torch.tensor(float(c.init_logit_bias)))
        else:
            self.logit_bias = None  # the softmax loss is shift-invariant: a bias would get no gradient

    # ----------------------------------------------------------------------------------------------- checks
    def _check_images(self, images) -> None:
        S = self.image_size
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"images must be a float tensor [B, 3, {S}, {S}] (see llip.image_transform), got {got}")
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, S, S):
            raise ValueError(
                f"{self.config.name} expects images of shape [B, 3, {S}, {S}], got {list(images.shape)}; "
                f"preprocess with llip.image_transform({S}, train=...)"
            )

    def _check_tokens(self, tokens) -> None:
        L = self.context_length
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise TypeError(f"tokens must be an int64 tensor [B, {L}] (see llip.tokenizer_for), got {got}")
        if tokens.dim() != 2 or tokens.shape[1] != L:
            raise ValueError(
                f"{self.config.name} expects tokens of shape [B, {L}] (its context_length), got "
                f"{list(tokens.shape)}; tokenize with llip.tokenizer_for(model.config)"
            )

    # ---------------------------------------------------------------------------------------------- encoders
    def encode_image(self, images: torch.Tensor):
        """llip: ``(k, v)``, each ``[B, H, K, d]``; pooled kinds: the image embedding ``[B, D]``."""
        self._check_images(images)
        h = self.visual(images)  # [B, K, W]
        c = self.config
        if self.kind == "llip":
            return project_tokens(h, self.k_proj, self.v_proj, self.k_norm, self.v_norm, c.H)  # each [B, H, K, d]
        if self.kind == "avg":  # mean_k(h_k @ P_k), as the official baseline (not (mean_k h_k) @ P)
            return torch.einsum("bkw,kwd->bkd", h, self.image_projection.to(h.dtype)).mean(dim=1)  # [B, D]
        pooled = h[:, 0]  # [B, W]: siglip / clip (the class token or the attention pool), register (token 0 of K)
        if c.towers == "big_vision":
            return pooled  # [B, D]
        return pooled @ self.image_projection.to(pooled.dtype)  # [B, D]

    def encode_text(self, tokens: torch.Tensor):
        """llip: ``(q [B, H, d], y [B, D])``; pooled kinds: the text embedding ``[B, D]``."""
        self._check_tokens(tokens)
        g = self.text(tokens)  # [B, Wt]
        y = g @ self.text_projection.to(g.dtype)  # [B, D]
        if self.text_projection_bias is not None:
            y = y + self.text_projection_bias.to(g.dtype)
        if self.kind != "llip":
            return y
        return project_query(g, self.q_proj, self.q_norm, self.config.H), y  # [B, H, d], [B, D]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        """Everything :meth:`loss` needs; see the module docstring for the keys and shapes."""
        self._check_images(images)
        self._check_tokens(tokens)
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"images and tokens must pair up one to one, got {images.shape[0]} images and "
                f"{tokens.shape[0]} token rows"
            )
        out = {"logit_scale": self.logit_scale.exp(), "logit_bias": self._bias()}
        if self.kind == "llip":
            k, v = self.encode_image(images)
            q, y = self.encode_text(tokens)
            out.update(k=k, v=v, q=q, y=y, w_out=self.w_out)  # under autocast the ops bring these to one dtype
        else:
            out.update(image=self.encode_image(images), text=self.encode_text(tokens))
        return out

    @property
    def tau(self) -> float:
        """The mixer softmax temperature, a Python float: a fixed hyper-parameter of the config (not learned, not
        part of the state dict), so it lives on the model rather than in each forward output. Only llip uses it."""
        return float(self.config.tau)

    def _bias(self) -> torch.Tensor:
        if self.logit_bias is not None:
            return self.logit_bias
        return torch.zeros((), device=self.logit_scale.device)

    # -------------------------------------------------------------------------------------------------- loss
    def loss(self, out: dict, *, backend: str | None = None) -> torch.Tensor:
        """The training loss of this kind and config -> ``[]`` float32.

        Under ``torch.distributed`` with world size > 1 the global-batch versions of ``llip_kernels.distributed``
        are used (each rank passes its local batch); otherwise the local ops of ``llip_kernels``.
        """
        # Under autocast the ops cast their inputs to the autocast dtype and run their own precision policy inside
        # (docs/design.md section 3), so the loss needs no autocast handling of its own; call it in the same
        # autocast region as the forward pass (outside it, bf16 activations and a float32 w_out are refused).
        return self._loss(out, backend)

    def _loss(self, out: dict, backend: str | None) -> torch.Tensor:
        import llip_kernels

        sigmoid = self.config.loss == "sigmoid"
        t, b = out["logit_scale"], out["logit_bias"]
        if _distributed():
            from llip_kernels import distributed as dist_ops

            if self.kind == "llip":
                args = (out["k"], out["v"], out["q"], out["y"], out["w_out"], t)
                if sigmoid:
                    return dist_ops.llip_sigmoid_loss_distributed(*args, b, tau=self.tau, backend=backend)
                fn = getattr(dist_ops, "llip_softmax_loss_distributed", None)
                if fn is None:
                    raise NotImplementedError(
                        "llip_kernels.distributed has no llip_softmax_loss_distributed: "
                        "train llip with loss='sigmoid' when distributed"
                    )
                return fn(*args, tau=self.tau, backend=backend)
            if sigmoid:
                return dist_ops.sigmoid_loss_distributed(out["image"], out["text"], t, b)
            return dist_ops.softmax_loss_distributed(out["image"], out["text"], t)
        if self.kind == "llip":
            args = (out["k"], out["v"], out["q"], out["y"], out["w_out"], t)
            if sigmoid:
                return llip_kernels.llip_sigmoid_loss(*args, b, tau=self.tau, backend=backend)
            return llip_kernels.llip_softmax_loss(*args, tau=self.tau, backend=backend)
        if sigmoid:
            return llip_kernels.sigmoid_loss(out["image"], out["text"], t, b)
        return llip_kernels.softmax_loss(out["image"], out["text"], t)

    # ---------------------------------------------------------------------------------------------- training
    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups (docs/design.md section 2): decay on matrices (ndim >= 2: weights, embeddings, mixture tokens,
        projections); none on vectors and scalars (norms, biases, logit scale and bias)."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamp the log-scale parameter to [0, log(100)] in place, as the official code does (call after each
        optimizer step): the multiplier t stays in [1, 100]."""
        self.logit_scale.clamp_(min=0.0, max=MAX_LOGIT_SCALE)

    def lock_image_tower(self, unlocked_layers: int = 0) -> list[str]:
        """Freeze the image tower (LiT, Zhai et al. 2022): the patch embedding, positions, blocks and final norm,
        and for the pooled kinds their class token and image projection. Llip's own parts keep training: the K
        mixture tokens (new when the tower comes from a CLIP checkpoint) and the head. ``unlocked_layers``: the last
        N blocks and the final norm keep training. Returns the frozen parameters' names."""
        keep = ["visual.ln_post.", "visual.pool."] if unlocked_layers else []
        keep += [f"visual.transformer.blocks.{i}." for i in _last(len(self.visual.transformer.blocks), unlocked_layers)]
        if self.kind == "llip":
            keep.append("visual.tokens")
        frozen = ["visual."] + (["image_projection"] if self.kind != "llip" else [])
        return self._freeze(frozen, keep)

    def lock_text_tower(self, unlocked_layers: int = 0) -> list[str]:
        """Freeze the text tower: embeddings, blocks, final norm and the text projection; Llip's query projection
        keeps training. ``unlocked_layers``: the last N blocks and the final norm keep training. Returns the frozen
        parameters' names."""
        keep = ["text.ln_final."] if unlocked_layers else []
        keep += [f"text.transformer.blocks.{i}." for i in _last(len(self.text.transformer.blocks), unlocked_layers)]
        return self._freeze(["text.", "text_projection"], keep)

    def _freeze(self, prefixes: list[str], keep: list[str]) -> list[str]:
        frozen = []
        for name, p in self.named_parameters():
            if any(name.startswith(x) for x in prefixes) and not any(name.startswith(x) for x in keep):
                p.requires_grad_(False)
                frozen.append(name)
        return frozen

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in the backward pass (both towers) to save activation memory."""
        self.visual.transformer.grad_checkpointing = bool(enable)
        self.text.transformer.grad_checkpointing = bool(enable)


def _last(n: int, count: int) -> range:
    """Indices of the last ``count`` of ``n`` blocks (a count above n is refused)."""
    if not 0 <= count <= n:
        raise ValueError(f"unlocked_layers must be between 0 and the tower's {n} blocks, got {count}")
    return range(n - count, n)


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )

"""Model configurations: one JSON file per tower size, five model kinds per size.

Each ``<size>.json`` in this folder holds the tower dimensions and Llip head of one row of docs/design.md section 2
(or a small CPU size) and the model names it defines, one per kind:

- ``llip``: the Llip model (K mixture tokens, per-token key/value projections, text-conditioned mixer);
- ``siglip`` / ``clip``: the baselines, one pooled image vector from a single class token (K = 1), trained with
  the sigmoid (SigLIP) or softmax (CLIP InfoNCE) loss;
- ``register``: SigLIP on mixture token 0 of K (the paper's ablation: extra tokens act as registers);
- ``avg``: SigLIP on the mean of the K mixture tokens, each projected by its own matrix (the official baseline).

The ``*-bigvision.json`` sizes are the towers of open_clip's SigLIP models (``ViT-B-16-SigLIP``,
``ViT-L-16-SigLIP-256``, ``ViT-SO400M-14-SigLIP``; ``towers="big_vision"``) with a siglip and a llip kind, so their
weights load exactly (llip/model/pretrained.py); they tokenize with SigLIP's vocabulary, a file the user supplies
(``tokenizer``).

:func:`get_config` turns a name plus overrides into a validated :class:`ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from importlib import resources

KINDS = ("llip", "siglip", "clip", "register", "avg")
LOSSES = ("sigmoid", "softmax")
ACTIVATIONS = ("quick_gelu", "gelu")
TOWERS = ("openai", "big_vision")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model. ``dataclasses.asdict(config)`` is JSON-serialisable."""

    name: str  # registry name, e.g. "llip-vit-b16-k32"; kept (not changed) by overrides
    kind: str  # one of KINDS: "llip", "siglip", "clip", "register", "avg"
    loss: str  # "sigmoid" (SigLIP loss; default except for clip) or "softmax" (CLIP InfoNCE)
    # vision tower: pre-LN ViT (activation below), K prepended mixture tokens
    image_size: int  # S: input images are [B, 3, S, S]
    patch_size: int  # P: non-overlapping P x P patches, grid (S / P)^2
    vision_width: int  # W
    vision_layers: int  # number of transformer blocks
    vision_head_width: int  # width of one attention head; heads = W / head_width
    mlp_ratio: float  # MLP hidden width = int(W * mlp_ratio) (4.9231 for ViT-bigG: 8192)
    # text tower: CLIP text transformer, causal mask, EOT pooling
    text_width: int  # Wt
    text_layers: int
    text_head_width: int  # heads = Wt / head_width
    context_length: int  # L: token sequences are [B, L]; the tokenizer pads/truncates to it
    vocab_size: int  # CLIP BPE: 49408
    # heads
    K: int  # mixture tokens (1 for siglip/clip: the class token)
    H: int  # mixer heads (llip only); d = D / H
    D: int  # embedding dim
    tau: float  # mixer softmax temperature (fixed, not learned; llip only)
    qkv_norm: bool  # LayerNorm(D) on keys, values and queries (llip only; H/14, G/14)
    init_logit_scale: float  # log of the initial logit multiplier t; clamped to [0, log(100)] by clamp_logit_scale()
    init_logit_bias: float  # initial logit bias b (sigmoid loss only; the softmax loss has none)
    lr: float  # peak AdamW learning rate of the recipe (docs/design.md section 2); advice for the trainer
    # MLP activation of both towers: "quick_gelu" (x * sigmoid(1.702 x), what OpenAI's CLIP weights were trained
    # with) or "gelu" (exact GELU, LAION's open_clip ViTs); it must match the weights a model starts from
    activation: str = "quick_gelu"
    # Tower layout. "openai": CLIP's (class/mixture tokens, ln_pre, bias-free patch conv, causal text pooled at the
    # end-of-text token, LayerNorm eps 1e-5). "big_vision": SigLIP's as open_clip builds it (patch conv with bias,
    # no ln_pre, LayerNorm eps 1e-6, siglip kind pooled by a multi-head attention pool over the patches (MAP), no
    # image projection (D = vision_width), bidirectional text pooled at the last position, text projection with a
    # bias, text MLP at mlp_ratio too). llip models on big_vision towers prepend their K tokens as usual.
    towers: str = "openai"
    # "clip-bpe" (CLIP's BPE vocabulary, shipped) or the path of a Hugging Face tokenizer.json (SigLIP's
    # sentencepiece vocabulary, which cannot be shipped): see llip/tokenizer.py
    tokenizer: str = "clip-bpe"

    @property
    def vision_heads(self) -> int:
        return self.vision_width // self.vision_head_width

    @property
    def text_heads(self) -> int:
        return self.text_width // self.text_head_width

    @property
    def mlp_width(self) -> int:
        return int(self.vision_width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


# Fields the JSON files leave at these values (every size shares them).
_DEFAULTS = {
    "vocab_size": 49408,
    "init_logit_scale": math.log(1 / 0.07),
    "init_logit_bias": -10.0,
}


@functools.cache
def _registry() -> dict[str, dict]:
    """name -> full field dict (without overrides), read from the JSON files of this folder."""
    out: dict[str, dict] = {}
    for entry in sorted(resources.files(__package__).iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        spec = json.loads(entry.read_text())
        names = spec.pop("names")
        for kind, name in names.items():
            fields = {**_DEFAULTS, **spec, "name": name, "kind": kind}
            fields["loss"] = "softmax" if kind == "clip" else "sigmoid"
            if kind in ("siglip", "clip"):
                fields["K"] = 1  # a single class token, as in CLIP / SigLIP
            if name in out:
                raise RuntimeError(f"model name {name!r} defined twice in llip/configs")
            out[name] = fields
    return out


def list_models() -> list[str]:
    """Every registered model name, sorted."""
    return sorted(_registry())


def get_config(name: str, **overrides) -> ModelConfig:
    """The config called ``name`` with ``overrides`` applied (any field of :class:`ModelConfig` except ``name``).

    Raises ``ValueError`` for an unknown name (listing the valid ones), an unknown field, or inconsistent sizes.
    """
    reg = _registry()
    if name not in reg:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(reg))}")
    valid = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(f"unknown config field(s) {bad} for {name!r}; valid overrides: {', '.join(sorted(valid))}")
    floats = {f.name for f in dataclasses.fields(ModelConfig) if f.type in ("float", float)}
    # --set tau=3 parses as an int: a float field keeps its type (checkpoints and resume comparisons see 3.0)
    overrides = {
        k: float(v) if k in floats and isinstance(v, int) and not isinstance(v, bool) else v
        for k, v in overrides.items()
    }
    config = ModelConfig(**{**reg[name], **overrides})
    check_config(config)
    return config


def check_config(c: ModelConfig) -> None:
    """Raise ``ValueError`` naming the first inconsistency of ``c``."""
    if c.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {c.kind!r}")
    if c.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {c.loss!r}")
    positive = (
        "image_size",
        "patch_size",
        "vision_width",
        "vision_layers",
        "vision_head_width",
        "text_width",
        "text_layers",
        "text_head_width",
        "vocab_size",
        "K",
        "H",
        "D",
    )
    for f in positive:
        v = getattr(c, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{f} must be a positive int, got {v!r}")
    if c.image_size % c.patch_size:
        raise ValueError(f"image_size {c.image_size} must be a multiple of patch_size {c.patch_size}")
    if c.vision_width % c.vision_head_width:
        raise ValueError(f"vision_width {c.vision_width} must be a multiple of vision_head_width {c.vision_head_width}")
    if c.text_width % c.text_head_width:
        raise ValueError(f"text_width {c.text_width} must be a multiple of text_head_width {c.text_head_width}")
    if c.kind == "llip" and c.D % c.H:
        raise ValueError(f"D {c.D} must be a multiple of H {c.H} (head dim d = D / H)")
    if not isinstance(c.context_length, int) or c.context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (start and end tokens), got {c.context_length!r}")
    if not (isinstance(c.tau, (int, float)) and math.isfinite(c.tau) and c.tau > 0):
        raise ValueError(f"tau must be a finite positive float, got {c.tau!r}")
    if c.mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be > 0, got {c.mlp_ratio}")
    if c.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {c.activation!r}")
    if c.towers not in TOWERS:
        raise ValueError(f"towers must be one of {TOWERS}, got {c.towers!r}")
    if c.towers == "big_vision":
        if c.kind not in ("siglip", "llip"):
            raise ValueError(f"towers='big_vision' serves the siglip and llip kinds, not {c.kind!r}")
        if c.kind == "siglip" and c.K != 1:
            raise ValueError(f"towers='big_vision' pools a siglip model with one attention-pool query: K must be 1, "
                             f"got {c.K}")  # fmt: skip
        if c.vision_width != c.D:
            raise ValueError(f"towers='big_vision' has no image projection: D ({c.D}) must equal vision_width "
                             f"({c.vision_width})")  # fmt: skip
    if not isinstance(c.tokenizer, str):
        raise ValueError(f"tokenizer must be 'clip-bpe' or the path of a tokenizer.json, got {c.tokenizer!r}")
    if not isinstance(c.qkv_norm, bool):
        raise ValueError(f"qkv_norm must be a bool, got {c.qkv_norm!r}")

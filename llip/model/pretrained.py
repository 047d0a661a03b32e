"""Starting from open_clip weights: the state-dict layouts open_clip writes for its ViT CLIP models
(``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, with or without ``-quickgelu``) and its SigLIP models
(``ViT-B-16-SigLIP``, ``ViT-L-16-SigLIP-256``, ``ViT-SO400M-14-SigLIP`` and their other image sizes) loaded into our
towers.

Our towers are that architecture with other parameter names, so a CLIP checkpoint loads into ``clip-*`` and
``siglip-*`` models exactly by renaming (:data:`RENAMES`): the encoders then compute what open_clip's do. Pick the
activation the weights were trained with (``activation="quick_gelu"`` for OpenAI's weights and the ``-quickgelu``
models, ``"gelu"`` for LAION's plain ones); the checkpoint does not record it.

Models with K > 1 mixture tokens (``llip``, ``register``, ``avg``) take the towers too, and their new parts start
from CLIP's by this rule (:func:`_init_new_parts`), chosen so that the pretrained alignment is where Llip starts:

- mixture tokens: K copies of CLIP's class token, each at the class token's position, the copies after the first
  moved by noise of 1% of the token's RMS so that they can drift apart (identical tokens get identical gradients);
- per-token key and value projections: CLIP's image projection for every token, so each token's key and value are
  CLIP's image embedding of that token, and the query projection is CLIP's text projection: the mixer weighs each
  token by its CLIP similarity to the caption;
- ``W_out``: the identity, so the mixed embedding is a mixture of CLIP image embeddings;
- ``register``: the image projection is CLIP's; ``avg``: each token's projection is CLIP's.

With copies of one token the K tokens' outputs nearly coincide, so a fresh Llip model scores pairs close to the
CLIP model it came from (not exactly: the patches now attend to K copies of the class token instead of one).
SigLIP checkpoints (a timm vision tower with attention pooling, a bidirectional text tower) load into the
``*-bigvision`` models, whose towers are that architecture (``towers="big_vision"``): ``siglip-*-bigvision``
exactly, by :data:`BIG_VISION_RENAMES`. ``llip-*-bigvision`` takes both towers, and as SigLIP has no class token to
copy and no image projection, its new parts start as follows: the K mixture tokens and their positions from the
model's own random start, the key and value projections the identity (D = W), the query projection SigLIP's text
projection (its bias dropped), ``W_out`` the identity. The attention pool, which a llip model does not have, is
left out and listed in the report.

``logit_scale`` comes from the checkpoint, ``logit_bias`` too when it has one (otherwise the model's own start).
Shared layers follow the checkpoint's shapes: a mismatch (another patch size, width or context length) is an error
naming the parameter and both shapes, as is a key we do not know or a parameter the checkpoint lacks.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

# open_clip name pattern -> ours. Every key of a CLIP ViT checkpoint matches exactly one of them; "{tower}" becomes
# "visual" or "text" by the key's prefix (open_clip's text tower lives at the top level).
_BLOCK = r"^(visual\.)?transformer\.resblocks\.(\d+)\."
RENAMES = [
    (r"^visual\.class_embedding$", "visual.tokens"),
    (r"^visual\.proj$", "image_projection"),
    (r"^visual\.(conv1\.weight|positional_embedding|ln_pre\.\w+|ln_post\.\w+)$", r"visual.\1"),
    (_BLOCK + r"attn\.in_proj_(weight|bias)$", r"{tower}.transformer.blocks.\2.attn.in_proj.\3"),
    (_BLOCK + r"attn\.out_proj\.(weight|bias)$", r"{tower}.transformer.blocks.\2.attn.out_proj.\3"),
    (_BLOCK + r"(ln_1|ln_2)\.(weight|bias)$", r"{tower}.transformer.blocks.\2.\3.\4"),
    (_BLOCK + r"mlp\.c_fc\.(weight|bias)$", r"{tower}.transformer.blocks.\2.mlp.0.\3"),
    (_BLOCK + r"mlp\.c_proj\.(weight|bias)$", r"{tower}.transformer.blocks.\2.mlp.2.\3"),
    (r"^token_embedding\.weight$", "text.token_embedding.weight"),
    (r"^positional_embedding$", "text.positional_embedding"),
    (r"^ln_final\.(weight|bias)$", r"text.ln_final.\1"),
    (r"^(text_projection|logit_scale|logit_bias)$", r"\1"),
]
# open_clip's SigLIP layout (CustomTextCLIP: timm's SigLIP ViT as visual.trunk, the text tower under text.).
_TRUNK = r"^visual\.trunk\.blocks\.(\d+)\."
_TEXT = r"^text\.transformer\.resblocks\.(\d+)\."
BIG_VISION_RENAMES = [
    (r"^visual\.trunk\.pos_embed$", "visual.positional_embedding"),
    (r"^visual\.trunk\.patch_embed\.proj\.(weight|bias)$", r"visual.conv1.\1"),
    (_TRUNK + r"norm1\.(weight|bias)$", r"visual.transformer.blocks.\1.ln_1.\2"),
    (_TRUNK + r"norm2\.(weight|bias)$", r"visual.transformer.blocks.\1.ln_2.\2"),
    (_TRUNK + r"attn\.qkv\.(weight|bias)$", r"visual.transformer.blocks.\1.attn.in_proj.\2"),
    (_TRUNK + r"attn\.proj\.(weight|bias)$", r"visual.transformer.blocks.\1.attn.out_proj.\2"),
    (_TRUNK + r"mlp\.fc1\.(weight|bias)$", r"visual.transformer.blocks.\1.mlp.0.\2"),
    (_TRUNK + r"mlp\.fc2\.(weight|bias)$", r"visual.transformer.blocks.\1.mlp.2.\2"),
    (r"^visual\.trunk\.norm\.(weight|bias)$", r"visual.ln_post.\1"),
    (r"^visual\.trunk\.attn_pool\.(latent|(q|kv|proj|norm)\.(weight|bias))$", r"visual.pool.\1"),
    (r"^visual\.trunk\.attn_pool\.mlp\.fc1\.(weight|bias)$", r"visual.pool.mlp.0.\1"),
    (r"^visual\.trunk\.attn_pool\.mlp\.fc2\.(weight|bias)$", r"visual.pool.mlp.2.\1"),
    (_TEXT + r"attn\.in_proj_(weight|bias)$", r"text.transformer.blocks.\1.attn.in_proj.\2"),
    (_TEXT + r"attn\.out_proj\.(weight|bias)$", r"text.transformer.blocks.\1.attn.out_proj.\2"),
    (_TEXT + r"(ln_1|ln_2)\.(weight|bias)$", r"text.transformer.blocks.\1.\2.\3"),
    (_TEXT + r"mlp\.c_fc\.(weight|bias)$", r"text.transformer.blocks.\1.mlp.0.\2"),
    (_TEXT + r"mlp\.c_proj\.(weight|bias)$", r"text.transformer.blocks.\1.mlp.2.\2"),
    (r"^text\.(token_embedding\.weight|positional_embedding|ln_final\.weight|ln_final\.bias)$", r"text.\1"),
    (r"^text\.text_projection\.weight$", "text_projection"),
    (r"^text\.text_projection\.bias$", "text_projection_bias"),
    (r"^(logit_scale|logit_bias)$", r"\1"),
]
# Buffers some open_clip versions save; nothing to load.
IGNORED = re.compile(r"^(attn_mask|visual\.attn_mask|text\.attn_mask)$")
SIGLIP_MARK = "visual.trunk.attn_pool.latent"  # the key that tells a SigLIP checkpoint
# Keys of open_clip layouts we do not read, and what they are, for the error message.
OTHER_LAYOUTS = {
    "visual.trunk.": "a timm vision tower other than SigLIP's (no visual.trunk.attn_pool)",
    "visual.layer1.": "a ResNet vision tower (RN50 and relatives)",
    "visual.attn_pool.": "an attentional pooler (CoCa)",
    "text.transformer.layer.": "a Hugging Face text tower (open_clip's hf-text models)",
}
TOKEN_NOISE = 0.01  # of the class token's RMS: breaks the symmetry of the K copies


@dataclass
class LoadReport:
    """What :func:`load_open_clip` did: ``loaded`` checkpoint tensors, and our parameters it set by the rule."""

    loaded: int
    initialised: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # checkpoint parts the model has no place for (SigLIP's pool)

    def summary(self) -> str:
        extra = f"; initialised by the pretrained rule: {', '.join(self.initialised)}" if self.initialised else ""
        if self.skipped:
            extra += f"; left out {len(self.skipped)} tensors of SigLIP's attention pool (a llip model has none)"
        return f"loaded {self.loaded} tensors{extra}"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an open_clip checkpoint file: a bare state dict, or one under ``"state_dict"`` (open_clip's
    training checkpoints), with DDP's ``module.`` prefixes removed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint {str(path)!r} is not a file")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def checkpoint_towers(state: dict[str, torch.Tensor]) -> str:
    """``"openai"`` for open_clip's ViT CLIP layout, ``"big_vision"`` for its SigLIP layout; ValueError for others."""
    if SIGLIP_MARK in state:
        return "big_vision"
    for prefix, what in OTHER_LAYOUTS.items():
        if any(k.startswith(prefix) for k in state):
            raise ValueError(
                f"this checkpoint has {what} (keys {prefix}*); only open_clip's ViT CLIP and SigLIP layouts load"
            )
    return "openai"


def rename_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip names -> ours; raises ValueError naming the keys no rule knows."""
    big_vision = checkpoint_towers(state) == "big_vision"
    out, unknown = {}, []
    for key, value in state.items():
        if IGNORED.match(key):
            continue
        for pattern, target in BIG_VISION_RENAMES if big_vision else RENAMES:
            m = re.match(pattern, key)
            if m:
                tower = "visual" if key.startswith("visual.") else "text"
                out[m.expand(target.replace("{tower}", tower))] = value
                break
        else:
            unknown.append(key)
    if big_vision:  # timm keeps batch dimensions on its tables; nn.Linear weights are our projections transposed
        out = {k: v.reshape(v.shape[-2:]) if k in ("visual.positional_embedding", "visual.pool.latent") else v
               for k, v in out.items()}  # fmt: skip
        if "text_projection" in out:
            out["text_projection"] = out["text_projection"].t()  # [D, Wt] -> [Wt, D]
    if unknown:
        raise ValueError(f"unknown key(s) in the checkpoint: {', '.join(sorted(unknown)[:10])}" + _more(unknown))
    return out


def load_open_clip(model, source) -> LoadReport:
    """Load an open_clip ViT CLIP or SigLIP checkpoint (a path or a state dict) into ``model`` (an
    :class:`LlipModel`) in place, by the rules of the module docstring. Raises ValueError naming unknown, missing or
    mis-shaped parameters."""
    state = read_state_dict(source) if isinstance(source, str | os.PathLike) else dict(source)
    ours, report = convert_open_clip(model, state)
    model.load_state_dict(ours, strict=True)
    return report


def convert_open_clip(model, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """``state`` (open_clip names) as a complete state dict of ``model``, checked name by name and shape by shape
    (``model`` may live on the meta device: only its names and shapes are read)."""
    c = model.config
    towers = checkpoint_towers(state)
    if towers != c.towers:
        raise ValueError(_WRONG_TOWERS[towers].format(name=c.name))
    ours = rename_open_clip(state)
    initialised, skipped = [], []
    if towers == "big_vision" and c.kind == "llip":
        skipped = sorted(k for k in ours if k.startswith("visual.pool."))
        for k in skipped:
            del ours[k]
        initialised = _init_new_parts_big_vision(model, ours)
    elif c.K > 1:  # llip, register, avg: K mixture tokens and the heads that read them
        initialised = _init_new_parts(model, ours)
    elif "visual.tokens" in ours:
        ours["visual.tokens"] = ours["visual.tokens"].reshape(1, -1)  # the class token [W] is our [1, W] table
    if "logit_bias" not in ours and model.logit_bias is not None:
        initialised.append("logit_bias (the config's start: the checkpoint has none)")
        ours["logit_bias"] = torch.tensor(float(model.config.init_logit_bias))
    if model.logit_bias is None:
        ours.pop("logit_bias", None)  # a softmax-loss model has no bias
    _check_against(model, ours, initialised)
    initialised = [n.split(" ")[0] for n in initialised]
    return ours, LoadReport(loaded=len(state) - len(skipped), initialised=initialised, skipped=skipped)


def _init_new_parts(model, ours: dict[str, torch.Tensor]) -> list[str]:
    """Fill ``ours`` with the K-token parts of ``model`` from CLIP's tensors (see the module docstring)."""
    c = model.config
    names = []
    cls = ours.pop("visual.tokens").reshape(-1)  # [W]
    rms = cls.pow(2).mean().sqrt()
    noise = torch.randn(c.K - 1, cls.numel(), dtype=cls.dtype) * (TOKEN_NOISE * rms)
    ours["visual.tokens"] = torch.cat([cls[None], cls[None] + noise])  # [K, W]
    pos = ours["visual.positional_embedding"]  # [1 + g^2, W]: the class row, then the patches
    ours["visual.positional_embedding"] = torch.cat([pos[:1].expand(c.K, -1), pos[1:]])  # [K + g^2, W]
    names += ["visual.tokens", "visual.positional_embedding (class row for each token)"]
    proj = ours.pop("image_projection")  # [W, D]
    if c.kind == "llip":
        ours["k_proj"] = proj[None].repeat(c.K, 1, 1)  # [K, W, D]
        ours["v_proj"] = proj[None].repeat(c.K, 1, 1)
        ours["q_proj"] = ours["text_projection"].clone()  # [Wt, D]
        ours["w_out"] = torch.eye(c.D, dtype=proj.dtype)
        names += ["k_proj", "v_proj", "q_proj", "w_out"]
        _identity_norms(model, ours)
    elif c.kind == "avg":  # one projection per token: CLIP's for each
        ours["image_projection"] = proj[None].repeat(c.K, 1, 1)  # [K, W, D]
    else:
        ours["image_projection"] = proj
    return names


def _init_new_parts_big_vision(model, ours: dict[str, torch.Tensor]) -> list[str]:
    """Fill ``ours`` with the llip parts of a big_vision ``model`` from a SigLIP checkpoint (module docstring)."""
    c = model.config
    W, dtype = c.vision_width, ours["visual.positional_embedding"].dtype
    fresh = torch.randn(2 * c.K, W, dtype=dtype) * W**-0.5  # as VisionTower draws its tokens and position rows
    ours["visual.tokens"] = fresh[: c.K]  # [K, W]
    ours["visual.positional_embedding"] = torch.cat([fresh[c.K :], ours["visual.positional_embedding"]])
    eye = torch.eye(W, dtype=dtype)
    ours["k_proj"] = eye[None].repeat(c.K, 1, 1)  # [K, W, D], D = W
    ours["v_proj"] = eye[None].repeat(c.K, 1, 1)
    ours["q_proj"] = ours["text_projection"].clone()  # [Wt, D]
    ours["w_out"] = torch.eye(c.D, dtype=dtype)
    _identity_norms(model, ours)
    return ["visual.tokens", "visual.positional_embedding (rows of the K tokens)", "k_proj", "v_proj", "q_proj",
            "w_out"]  # fmt: skip


def _identity_norms(model, ours: dict[str, torch.Tensor]) -> None:
    """The k/q/v LayerNorms of qkv_norm models start as the identity map's."""
    for norm in ("k_norm", "v_norm", "q_norm"):
        for p, value in getattr(model, norm).state_dict().items():
            ours[f"{norm}.{p}"] = torch.ones(value.shape) if p == "weight" else torch.zeros(value.shape)


_WRONG_TOWERS = {
    "big_vision": "this is an open_clip SigLIP checkpoint (timm vision tower with attention pooling); {name} has "
    "CLIP's towers: load it into a *-bigvision model (siglip-vit-b16-bigvision, llip-vit-b16-bigvision-k32, ...; "
    "`llip models` lists them)",
    "openai": "this is an open_clip ViT CLIP checkpoint; {name} has SigLIP's towers (big_vision): load it into a "
    "clip-*, siglip-* or llip-* model of CLIP's towers",
}


def _check_against(model, ours: dict[str, torch.Tensor], initialised: list[str]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} parameter(s) of {model.config.name}: "
                         f"{', '.join(missing[:10])}" + _more(missing))  # fmt: skip
    extra = sorted(set(ours) - set(expected))
    if extra:
        raise ValueError(f"{model.config.name} has no parameter(s) {', '.join(extra[:10])}" + _more(extra))
    wrong = [name for name in sorted(ours) if tuple(ours[name].shape) != tuple(expected[name].shape)]
    if wrong:
        name = wrong[0]
        others = f"; {len(wrong) - 1} more differ" if len(wrong) > 1 else ""
        raise ValueError(
            f"{name}: the checkpoint's tensor is {list(ours[name].shape)}, {model.config.name} has "
            f"{list(expected[name].shape)} (another image size, patch size, width or context length?){others}"
        )


def _more(items: list) -> str:
    return f" (and {len(items) - 10} more)" if len(items) > 10 else ""

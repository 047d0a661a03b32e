"""Shared pytest set-up. The Makefile runs the suite with TRITON_INTERPRET=1 so Triton kernels run on the CPU.

Fixtures: ``open_clip``, the open_clip package, for the interop tests only (installed without its dependencies by
requirements/no-deps.txt, with timm for its SigLIP models); ``open_clip_siglip``, the same, or a skip where timm is
missing.

open_clip and timm import torchvision at the top of their transform, dataset and utility modules, but PyPI's
torchvision does not load beside the pinned CPU torch and none of the code these tests use (model construction,
state dicts, the tokenizer) touches it. Where torchvision is missing, stand-in modules answer those imports with
inert placeholders while open_clip is imported, and are removed afterwards; anything that actually used
torchvision would fail loudly on them."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Placeholder(type):
    """A class standing in for a torchvision name: its attributes are strings naming them (enum members)."""

    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return f"{cls.__name__}.{attr}"


def _stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(attr, (), {})

    module.__getattr__ = __getattr__
    module.__path__ = []
    return module


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers every ``torchvision`` / ``torchvision.*`` import with a stand-in module."""

    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _stand_in(spec.name)

    def exec_module(self, module):
        pass


@pytest.fixture(scope="session")
def open_clip():
    """The open_clip package, or a pytest skip saying what is missing."""
    for needed in ("open_clip", "ftfy", "regex"):
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"{needed} is not installed (requirements/dev.txt, requirements/no-deps.txt)")
    if "open_clip" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import open_clip

        return open_clip
    finder = _StandInFinder()
    sys.meta_path.insert(0, finder)
    try:
        import open_clip  # imports timm too, where it is installed
    finally:  # open_clip keeps the names it imported; nothing else in the process should find a torchvision
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    return open_clip


@pytest.fixture(scope="session")
def open_clip_siglip(open_clip):
    """open_clip able to build its SigLIP models (timm-based vision towers), or a skip."""
    from open_clip import timm_model

    if timm_model.timm is None:
        pytest.skip("timm is not installed (requirements/no-deps.txt): open_clip's SigLIP towers need it")
    return open_clip


def _open_clip_like(open_clip, config, *, quick_gelu: bool, dtype=None):
    """An open_clip ViT CLIP with the towers of ``config`` (a :class:`llip.ModelConfig`) and random weights."""
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(
        layers=config.vision_layers,
        width=config.vision_width,
        head_width=config.vision_head_width,
        mlp_ratio=config.mlp_ratio,
        patch_size=config.patch_size,
        image_size=config.image_size,
    )
    text = CLIPTextCfg(
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        width=config.text_width,
        heads=config.text_heads,
        layers=config.text_layers,
    )
    model = CLIP(embed_dim=config.D, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    return model.to(dtype or torch.float32).eval()


@pytest.fixture(scope="session")
def open_clip_like(open_clip):
    """``open_clip_like(config, quick_gelu=..., dtype=...)``: an open_clip ViT CLIP with our config's towers."""
    return functools.partial(_open_clip_like, open_clip)

"""Starting from open_clip weights (llip/model/pretrained.py), checked against open_clip itself: it builds a model
with random weights (no downloads), we save its state dict and load it, and our encoders must reproduce open_clip's
outputs. Also the rule for the parts a Llip model adds, the errors, and the CLI option."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llip
from llip.model.pretrained import TOKEN_NOISE, convert_open_clip
from llip_kernels.testing import check_same_result

REPO = Path(__file__).resolve().parents[2]


def _inputs(config, n=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, config.image_size, config.image_size, generator=g, dtype=dtype)
    captions = ["a red square", "two blue circles to the left of a green triangle", "x"]
    return images, llip.get_tokenizer(config.context_length)(captions[:n])


@pytest.mark.parametrize("name", ["clip-tiny", "siglip-tiny"])
@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_clip_weights_load_exactly(tmp_path, open_clip_like, name, quick_gelu, dtype):
    config = llip.get_config(name)
    theirs = open_clip_like(config, quick_gelu=quick_gelu, dtype=dtype)
    path = tmp_path / "open_clip.pt"
    torch.save(theirs.state_dict(), path)
    ours = llip.create_model(name, pretrained=path, activation="quick_gelu" if quick_gelu else "gelu")
    ours = ours.to(dtype).eval()
    images, tokens = _inputs(config, dtype=dtype)
    with torch.no_grad():
        img_theirs, img_ours = theirs.encode_image(images), ours.encode_image(images)
        txt_theirs, txt_ours = theirs.encode_text(tokens), ours.encode_text(tokens)
    # The same operations in the same order except attention (sdpa on both sides, other layouts): sums of the
    # width's length, a few per layer.
    check_same_result("image embedding", img_ours, img_theirs, dtype=dtype, terms=config.vision_width)
    check_same_result("text embedding", txt_ours, txt_theirs, dtype=dtype, terms=config.text_width)
    assert ours.logit_scale.item() == theirs.logit_scale.item()


def test_the_wrong_activation_is_visible(tmp_path, open_clip_like):
    """The checkpoint does not say which activation its weights used: loading GELU weights into a QuickGELU model
    succeeds but computes something else, which is why the option is documented next to --pretrained."""
    config = llip.get_config("clip-tiny")
    theirs = open_clip_like(config, quick_gelu=False, dtype=torch.float64)
    ours = llip.create_model("clip-tiny", pretrained=theirs.state_dict(), activation="quick_gelu").double().eval()
    images, _ = _inputs(config, dtype=torch.float64)
    with torch.no_grad():
        gap = (ours.encode_image(images) - theirs.encode_image(images)).abs().max().item()
    assert gap > 1e-3


@pytest.mark.parametrize(
    "open_clip_name,ours",
    [("ViT-B-32-quickgelu", "clip-vit-b32"), ("ViT-B-16-quickgelu", "clip-vit-b16"), ("ViT-L-14", "clip-vit-l14")],
)
def test_published_layouts_map_key_for_key(open_clip, open_clip_name, ours):
    """Every key of open_clip's own ViT CLIP models maps onto ours with the same shape (both built on the meta
    device: names and shapes only)."""
    theirs = open_clip.create_model(open_clip_name, device="meta").state_dict()
    converted, report = convert_open_clip(llip.create_model(ours, device="meta"), theirs)
    assert report.loaded == len(theirs) and report.initialised == []
    assert len(converted) == len(theirs)


def test_llip_starts_from_clip_by_the_documented_rule(open_clip_like):
    config = llip.get_config("llip-tiny")
    theirs = open_clip_like(config, quick_gelu=True).state_dict()
    torch.manual_seed(0)
    model = llip.create_model("llip-tiny", pretrained=theirs)
    cls, K = theirs["visual.class_embedding"], config.K
    tokens = model.visual.tokens.detach()
    assert torch.equal(tokens[0], cls)
    noise = (tokens[1:] - cls).pow(2).mean().sqrt() / cls.pow(2).mean().sqrt()
    assert 0.5 * TOKEN_NOISE < noise < 2 * TOKEN_NOISE  # RMS of the noise, relative to the token's
    pos = model.visual.positional_embedding.detach()
    assert torch.equal(pos[:K], theirs["visual.positional_embedding"][:1].expand(K, -1))
    assert torch.equal(pos[K:], theirs["visual.positional_embedding"][1:])
    for k in range(K):
        assert torch.equal(model.k_proj[k], theirs["visual.proj"]) and torch.equal(
            model.v_proj[k], theirs["visual.proj"]
        )
    assert torch.equal(model.q_proj, theirs["text_projection"])
    assert torch.equal(model.w_out, torch.eye(config.D))
    assert torch.equal(
        model.visual.transformer.blocks[1].mlp[0].weight, theirs["visual.transformer.resblocks.1.mlp.c_fc.weight"]
    )
    assert model.logit_bias.item() == config.init_logit_bias  # CLIP weights have no bias: the config's start


@pytest.mark.parametrize("qkv_norm", [False, True])
def test_register_avg_and_normed_llip_load_too(open_clip_like, qkv_norm):
    config = llip.get_config("llip-tiny")
    theirs = open_clip_like(config, quick_gelu=True).state_dict()
    llip.create_model("llip-tiny", pretrained=theirs, qkv_norm=qkv_norm)
    register = llip.create_model("register-tiny", pretrained=theirs)
    assert torch.equal(register.image_projection, theirs["visual.proj"])
    avg = llip.create_model("avg-tiny", pretrained=theirs)  # one projection per token: CLIP's for each
    assert all(torch.equal(avg.image_projection[k], theirs["visual.proj"]) for k in range(config.K))


def _tiny_state(open_clip_like):
    return open_clip_like(llip.get_config("clip-tiny"), quick_gelu=True).state_dict()


def test_unknown_missing_and_misshaped_keys_are_named(open_clip_like):
    state = _tiny_state(open_clip_like)
    with pytest.raises(ValueError, match=r"unknown key\(s\) in the checkpoint: visual\.extra_thing"):
        llip.create_model("clip-tiny", pretrained={**state, "visual.extra_thing": torch.zeros(1)})
    del state["ln_final.bias"]
    with pytest.raises(ValueError, match=r"the checkpoint lacks 1 parameter\(s\) of clip-tiny: text\.ln_final\.bias"):
        llip.create_model("clip-tiny", pretrained=state)
    with pytest.raises(ValueError, match=r"visual\.conv1\.weight: the checkpoint's tensor is \[96, 3, 4, 4\], "):
        llip.create_model("clip-tiny", pretrained=_tiny_state(open_clip_like), patch_size=8)
    with pytest.raises(ValueError, match=r"timm vision tower"):
        llip.create_model("clip-tiny", pretrained={"visual.trunk.cls_token": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match=r"is not a file"):
        llip.create_model("clip-tiny", pretrained="/nonexistent/weights.pt")


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "llip", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_train_from_pretrained_and_refuse_a_wrong_file(tmp_path, open_clip_like):
    path = tmp_path / "clip.pt"
    # open_clip's training checkpoints: the state dict under "state_dict", DDP's "module." prefixes
    torch.save({"state_dict": {f"module.{k}": v for k, v in _tiny_state(open_clip_like).items()}}, path)
    bad = _cli("train", "--model", "clip-tiny", "--pretrained", str(path), "--set", "patch_size=8", "--output", "bad",
               "--steps", "1", cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("llip train: error: visual.conv1.weight"), bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    ok = _cli("train", "--model", "clip-tiny", "--pretrained", str(path), "--output", "run", "--steps", "1",
              "--batch-size", "8", "--eval-images", "16", "--no-progress", cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000001.pt", weights_only=False)
    assert state["config"]["pretrained"] == str(path)


def test_tokenizer_matches_open_clip(open_clip):
    captions = [
        "A photo of a cat.",
        "Two  dogs\tand   a ball!!! (on grass)",
        "l'été à Paris, café crème & croissants",
        "東京の夜景と富士山",
        "emoji 🐱🚀 and ©®™ symbols",
        "numbers 12345, 3.14159 and 1,000,000",
        "it's, you're, we'll, they'd, I'm, can't",
        "&amp; &lt;b&gt;html&lt;/b&gt; entities",
        "MiXeD CaSe WoRdS and ALLCAPS",
        "",
        "word " * 100,  # longer than the context: cut, with the end token kept last
        "Ünïcödé  ñ ç ß ø å",
    ]
    for length in (77, 16):
        theirs = open_clip.tokenize(captions, context_length=length)
        ours = llip.get_tokenizer(context_length=length)(captions)
        for caption, a, b in zip(captions, ours, theirs):
            assert torch.equal(a, b), f"{caption!r}: ours {a.tolist()} open_clip {b.tolist()}"

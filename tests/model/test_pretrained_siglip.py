"""open_clip's SigLIP checkpoints (timm vision tower with attention pooling, bidirectional text tower) loaded into
our big_vision towers (llip/model/pretrained.py), checked against open_clip and timm themselves: they build a model
with random weights (no downloads), we load its state dict, and our encoders must reproduce theirs. Also the rule
for llip's new parts, the errors, SigLIP's tokenizer (llip/file_tokenizer.py) and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import llip
from llip.file_tokenizer import FileTokenizer, canonicalize
from llip.model.pretrained import convert_open_clip
from llip_kernels.testing import check_same_result

# A tiny SigLIP: siglip-tiny's sizes on big_vision towers (D = vision width: SigLIP has no image projection).
TINY = {"towers": "big_vision", "activation": "gelu", "D": 96, "vocab_size": 64}


def _open_clip_siglip(open_clip, config: llip.ModelConfig, dtype=torch.float32):
    """open_clip's SigLIP (CustomTextCLIP, timm's SigLIP ViT) with the towers of ``config`` and random weights,
    every parameter moved off its initial value (LayerNorms included) so that no part can load by accident."""
    import timm

    torch.manual_seed(0)
    vision = {"image_size": config.image_size, "timm_model_name": "vit_base_patch16_siglip_224",
              "timm_pool": "map", "timm_proj": "none"}  # fmt: skip
    text = {"context_length": config.context_length, "vocab_size": config.vocab_size, "width": config.text_width,
            "heads": config.text_heads, "layers": config.text_layers, "mlp_ratio": config.mlp_ratio,
            "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}  # fmt: skip
    model = open_clip.CustomTextCLIP(embed_dim=config.D, vision_cfg=vision, text_cfg=text, init_logit_bias=-10.0)
    # the same timm architecture at our size (open_clip's adapter takes the size from the timm model name)
    model.visual.trunk = timm.create_model(
        "vit_base_patch16_siglip_224",
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.vision_width,
        depth=config.vision_layers,
        num_heads=config.vision_heads,
        mlp_ratio=config.mlp_ratio,
        num_classes=0,
        global_pool="map",
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_siglip_weights_load_exactly(tmp_path, open_clip_siglip, dtype):
    config = llip.get_config("siglip-tiny", **TINY)
    theirs = _open_clip_siglip(open_clip_siglip, config, dtype)
    path = tmp_path / "siglip.pt"
    torch.save(theirs.state_dict(), path)
    ours = llip.create_model("siglip-tiny", pretrained=path, **TINY).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, config.image_size, config.image_size, generator=g, dtype=dtype)
    tokens = torch.randint(0, config.vocab_size, (3, config.context_length), generator=g)
    with torch.no_grad():
        img_theirs, img_ours = theirs.encode_image(images), ours.encode_image(images)
        txt_theirs, txt_ours = theirs.encode_text(tokens), ours.encode_text(tokens)
    check_same_result("image embedding", img_ours, img_theirs, dtype=dtype, terms=config.mlp_width)
    check_same_result("text embedding", txt_ours, txt_theirs, dtype=dtype, terms=config.mlp_width)
    assert ours.logit_scale.item() == theirs.logit_scale.item()
    assert ours.logit_bias.item() == theirs.logit_bias.item()


@pytest.mark.parametrize(
    "open_clip_name,ours,overrides",
    [
        ("ViT-B-16-SigLIP", "siglip-vit-b16-bigvision", {}),
        ("ViT-B-16-SigLIP-384", "siglip-vit-b16-bigvision", {"image_size": 384}),
        ("ViT-L-16-SigLIP-256", "siglip-vit-l16-bigvision", {}),
        ("ViT-SO400M-14-SigLIP", "siglip-vit-so400m14-bigvision", {}),
    ],
)
def test_published_siglip_layouts_map_key_for_key(open_clip_siglip, open_clip_name, ours, overrides):
    """Every key of open_clip's own SigLIP models maps onto ours with the same shape and the parameter counts agree
    (both built on the meta device: names and shapes only)."""
    theirs = open_clip_siglip.create_model(open_clip_name, device="meta")
    model = llip.create_model(ours, device="meta", **overrides)
    converted, report = convert_open_clip(model, theirs.state_dict())
    assert report.loaded == len(theirs.state_dict()) and report.initialised == [] and report.skipped == []
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_llip_starts_from_siglip_by_the_documented_rule(open_clip_siglip):
    config = llip.get_config("llip-tiny", **TINY)
    theirs = _open_clip_siglip(open_clip_siglip, config).state_dict()
    model = llip.create_model("llip-tiny", pretrained=theirs, **TINY)
    _, report = convert_open_clip(model, theirs)
    assert report.skipped == sorted(k.replace("visual.trunk.attn_pool.", "visual.pool.").replace(".fc1.", ".0.")
                                    .replace(".fc2.", ".2.") for k in theirs if ".attn_pool." in k)  # fmt: skip
    assert len(report.skipped) == 13 and "left out 13 tensors" in report.summary()
    eye = torch.eye(config.D)
    assert all(torch.equal(model.k_proj[k], eye) and torch.equal(model.v_proj[k], eye) for k in range(config.K))
    assert torch.equal(model.q_proj, theirs["text.text_projection.weight"].t())
    assert torch.equal(model.text_projection_bias, theirs["text.text_projection.bias"])
    assert torch.equal(model.w_out, eye)
    pos = model.visual.positional_embedding.detach()
    assert torch.equal(pos[config.K :], theirs["visual.trunk.pos_embed"][0])
    assert pos[: config.K].std().item() == pytest.approx(config.vision_width**-0.5, rel=0.3)  # a fresh model's
    assert torch.equal(model.visual.transformer.blocks[2].attn.in_proj.weight,
                       theirs["visual.trunk.blocks.2.attn.qkv.weight"])  # fmt: skip
    out = model(torch.randn(4, 3, 32, 32), torch.randint(0, config.vocab_size, (4, config.context_length)))
    assert torch.isfinite(model.loss(out, backend="torch"))


def test_the_wrong_tower_layout_is_refused(open_clip_siglip):
    siglip = _open_clip_siglip(open_clip_siglip, llip.get_config("siglip-tiny", **TINY)).state_dict()
    with pytest.raises(ValueError, match=r"open_clip SigLIP checkpoint .* siglip-tiny has CLIP's towers: load it "
                                         r"into a \*-bigvision model"):  # fmt: skip
        llip.create_model("siglip-tiny", pretrained=siglip)
    with pytest.raises(ValueError, match=r"ViT CLIP checkpoint; siglip-tiny has SigLIP's towers"):
        llip.create_model("siglip-tiny", pretrained={"visual.class_embedding": torch.zeros(96)}, **TINY)
    with pytest.raises(ValueError, match=r"towers='big_vision' serves the siglip and llip kinds, not 'clip'"):
        llip.get_config("clip-tiny", **TINY)
    with pytest.raises(ValueError, match=r"D \(128\) must equal vision_width \(96\)"):
        llip.get_config("siglip-tiny", **{**TINY, "D": 128})


# ------------------------------------------------------------------------------------------------- tokenizer
WORDS = ["a", "photo", "of", "cat", "red", "blue", "green", "square", "circle", "triangle", "the", "and", "two"]


def _tokenizer_file(folder, *, pad_token: str | None = "</s>", padding_id: int | None = None):
    """A tokenizer.json laid out as SigLIP's (its end token appended by the post-processor; the pad token named in
    tokenizer_config.json), on a small word-level vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    if padding_id is not None:
        tok.enable_padding(pad_id=padding_id, pad_token=tok.id_to_token(padding_id))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if pad_token is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token}))
    return folder / "tokenizer.json"


CAPTIONS = [
    "A photo of a cat.",
    "Two  red_squares\tand   a BLUE circle!!! (on grass)",
    "l'été à Paris, café crème & croissants",
    "東京の夜景と富士山",
    "&amp; &lt;b&gt;html&lt;/b&gt; entities",
    "numbers 12345, 3.14159 and 1,000,000",
    "it's, you're -- we'll",
    "",
]


def test_canonicalize_matches_open_clip(open_clip):
    from open_clip.tokenizer import _clean_canonicalize

    for caption in CAPTIONS:
        assert canonicalize(caption) == _clean_canonicalize(caption), caption


def test_file_tokenizer_cleans_appends_the_end_token_and_pads(tmp_path):
    tok = llip.get_tokenizer(6, file=_tokenizer_file(tmp_path / "tok"))
    ids = {w: i + 3 for i, w in enumerate(WORDS)}
    out = tok(["A photo, of_a CAT!", "green triangle " * 10, ""])
    assert out.dtype == torch.long and out.shape == (3, 6)
    assert out[0].tolist() == [ids["a"], ids["photo"], ids["of"], ids["a"], ids["cat"], 1]
    assert out[1].tolist() == [ids["green"], ids["triangle"]] * 2 + [ids["green"], 1]  # cut, end token kept
    assert out[2].tolist() == [1] * 6  # the end token, then the pad token (</s> too, as SigLIP's)
    assert tok.encode("Two squares") == [ids["two"], 2]  # unknown words map to <unk>
    # the folder works as well as the file; a padding section in the file names the pad token
    assert torch.equal(llip.get_tokenizer(6, file=tmp_path / "tok")(["a cat"]), tok(["a cat"]))
    padded = llip.get_tokenizer(4, file=_tokenizer_file(tmp_path / "p", pad_token=None, padding_id=0))
    assert padded(["a cat"]).tolist() == [[ids["a"], ids["cat"], 1, 0]]


def test_file_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"names no pad token"):
        FileTokenizer(str(_tokenizer_file(tmp_path / "nopad", pad_token=None)), 8)
    with pytest.raises(FileNotFoundError, match=r"no such tokenizer\.json"):
        FileTokenizer(str(tmp_path / "missing"), 8)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"is not a Hugging Face tokenizer\.json"):
        FileTokenizer(str(tmp_path / "bad.json"), 8)
    with pytest.raises(ValueError, match=r"reads SigLIP's sentencepiece vocabulary.*--set tokenizer=PATH"):
        llip.tokenizer_for(llip.get_config("siglip-vit-b16-bigvision"))
    small = llip.get_config("siglip-tiny", **{**TINY, "vocab_size": 8}, tokenizer=str(_tokenizer_file(tmp_path / "t")))
    with pytest.raises(ValueError, match=r"has 16 tokens, more than siglip-tiny's vocab_size 8"):
        llip.tokenizer_for(small)


# ------------------------------------------------------------------------------------------------------- CLI
def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "llip", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_train_from_a_siglip_checkpoint(tmp_path, open_clip_siglip):
    tokenizer = _tokenizer_file(tmp_path / "tokenizer")
    config = llip.get_config("siglip-tiny", **TINY)
    torch.save(_open_clip_siglip(open_clip_siglip, config).state_dict(), tmp_path / "siglip.pt")
    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    common = ["train", "--model", "siglip-tiny", "--pretrained", "siglip.pt", *sets, "--steps", "1",
              "--batch-size", "8", "--eval-images", "16", "--no-progress"]  # fmt: skip
    refused = _cli(*common, "--output", "no_tokenizer", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    # siglip-tiny's own tokenizer is CLIP's, whose vocabulary does not fit the 64-token table of these weights
    assert refused.stderr.startswith(
        "llip train: error: tokenizer 'clip-bpe' has 49408 tokens, more than siglip-tiny's vocab_size 64"
    )
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "no_tokenizer").exists()
    ok = _cli(*common, "--set", f"tokenizer={tokenizer}", "--output", "run", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000001.pt", weights_only=False)
    assert state["model_config"]["towers"] == "big_vision"
    assert state["model_config"]["tokenizer"] == str(tokenizer)

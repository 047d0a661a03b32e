"""Llip on other people's towers (llip/model/head.py): MixtureTokens on an open_clip ViT, LlipHead against the
model's own head, and the example that trains an open_clip model with both (examples/open_clip_llip.py)."""

from __future__ import annotations

import runpy
import statistics
from pathlib import Path

import pytest
import torch

import llip
from llip.model.head import LlipHead, MixtureTokens

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "open_clip_llip.py"


def _tiny_open_clip(open_clip):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
    return CLIP(32, vision, text).double().eval()


def test_mixture_tokens_ride_along_an_open_clip_vit(open_clip):
    model = _tiny_open_clip(open_clip)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    visual = model.visual
    mixture = MixtureTokens(4, 32).double()
    # By hand: the K tokens appended to the embedded patches, through the transformer, taken off again.
    x = visual._embeds(images)  # [B, 1 + 16, W]
    full = visual.transformer(torch.cat([x, mixture.tokens.expand(3, -1, -1)], dim=1))
    pooled_by_hand = visual._pool(full[:, :-4])[0] @ visual.proj
    mixture.attach(visual.transformer)
    pooled = model.encode_image(images)
    tokens = mixture.pop()
    assert tokens.shape == (3, 4, 32)
    torch.testing.assert_close(tokens, full[:, -4:], rtol=0, atol=1e-13)
    torch.testing.assert_close(pooled, pooled_by_hand, rtol=0, atol=1e-13)
    # the tokens learn: their gradient is non-zero
    model.encode_image(images)
    mixture.pop().sum().backward()
    assert mixture.tokens.grad.abs().sum() > 0
    mixture.detach()  # the trunk is its old self again
    torch.testing.assert_close(model.encode_image(images), visual._pool(visual.transformer(x))[0] @ visual.proj)


def test_mixture_tokens_refuse_misuse(open_clip):
    model = _tiny_open_clip(open_clip)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mixture = MixtureTokens(2, 32).double().attach(model.visual.transformer)
    with pytest.raises(RuntimeError, match="no token outputs"):
        mixture.pop()
    model.encode_image(images)
    with pytest.raises(RuntimeError, match="never popped"):
        model.encode_image(images)  # the outputs of the first batch would pair with the wrong one
    with pytest.raises(RuntimeError, match="attached already"):
        mixture.attach(model.visual.transformer)
    mixture.detach()
    wrong = MixtureTokens(2, 48).double().attach(model.visual.transformer)
    with pytest.raises(ValueError, match=r"batch-first \[B, T, 48\]"):
        model.encode_image(images)
    wrong.detach()


def test_llip_head_equals_the_models_own_head():
    model = llip.create_model("llip-tiny", qkv_norm=True).double()
    c = model.config
    head = LlipHead(vision_width=c.vision_width, text_width=c.text_width, embed_dim=c.D, num_tokens=c.K,
                    num_heads=c.H, tau=c.tau, qkv_norm=True, image_norm=False).double()  # fmt: skip
    with torch.no_grad():
        for name in ("k_proj", "v_proj", "q_proj", "w_out"):
            getattr(head, name).copy_(getattr(model, name))
        for name in ("k_norm", "v_norm", "q_norm"):
            getattr(head, name).load_state_dict(getattr(model, name).state_dict())
    images = torch.randn(3, 3, c.image_size, c.image_size, dtype=torch.float64)
    tokens = llip.tokenizer_for(c)(["a red circle", "two shapes", "a small blue square"])
    want = model(images, tokens)
    g = model.text(tokens)  # [B, Wt]: the pooled text feature the queries come from
    got = head(model.visual(images), text_features=g, text_embedding=want["y"])
    for key in ("k", "v", "q", "y", "w_out"):
        assert torch.equal(got[key], want[key]), key
    with pytest.raises(ValueError, match=r"image_tokens must be \[B, 8, 96\]"):
        head(torch.zeros(3, 7, 96, dtype=torch.float64), text_features=g, text_embedding=want["y"])
    with pytest.raises(ValueError, match="divisible by num_heads"):
        LlipHead(vision_width=8, text_width=8, embed_dim=10, num_tokens=2, num_heads=4, tau=1.0)


def test_the_open_clip_example_trains(open_clip, capsys, monkeypatch):
    """The example, as a user runs it: an open_clip ViT CLIP with MixtureTokens, LlipHead and the fused loss."""
    monkeypatch.setattr("sys.argv", [str(EXAMPLE)])
    main = runpy.run_path(str(EXAMPLE))["main"]
    losses = main(["--steps", "40", "--batch-size", "32"])
    assert len(losses) == 40 and all(map(torch.isfinite, torch.tensor(losses)))
    assert "step   40  loss" in capsys.readouterr().out
    # it learns: the last steps' loss is well below the first steps' (about 7.5 -> 2.5 here)
    assert statistics.fmean(losses[-5:]) < 0.6 * statistics.fmean(losses[:5])

"""The trainer options of large runs: gradient accumulation with cached features (llip/train/accumulate.py),
fp16 with a gradient scaler, locked towers."""

from __future__ import annotations

import math

import pytest
import torch

import llip
from llip.cli import main
from llip.train.accumulate import accumulated_backward
from llip.train.checkpoint import load_checkpoint
from llip.train.loop import TrainConfig, compute_loss, train
from llip.train.metrics import read_metrics
from llip_kernels.testing import check_same_result
from tests.mini import MINI


def _batch(model, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S = model.image_size
    images = torch.randn(B, 3, S, S, generator=g, dtype=torch.float64)
    captions = [f"a {c} {s}" for c, s in zip(["red", "blue", "green"] * B, ["circle", "square", "diamond", "x"] * B)]
    return images, llip.tokenizer_for(model.config)(captions[:B])


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "name, loss, accum", [("llip-tiny", "sigmoid", 3), ("llip-tiny", "softmax", 4), ("siglip-tiny", "sigmoid", 5),
                          ("clip-tiny", "softmax", 2)]
)  # fmt: skip
def test_accumulated_gradients_equal_one_large_batch(name, loss, accum):
    """12 pairs in ``accum`` micro-batches (5 does not divide 12) give the gradients of the 12-pair batch: float64,
    so anything but rounding (a loss over micro-batches only, the scale's gradient added N times) shows."""
    torch.manual_seed(0)
    model = llip.create_model(name, loss=loss, **MINI).double()
    images, tokens = _batch(model, 12)
    whole, _ = compute_loss(model, model, images, tokens, backend="reference" if model.kind == "llip" else None)
    whole.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    got_loss, _ = accumulated_backward(model, model, images, tokens, accum=accum,
                                       backend="reference" if model.kind == "llip" else None)  # fmt: skip
    got = _grads(model)
    assert set(got) == set(expected) and {"logit_scale"} <= set(got)
    check_same_result("loss", got_loss, whole.detach(), dtype=torch.float64, terms=144)
    for n, g in expected.items():
        check_same_result(f"d{n}", got[n], g, dtype=torch.float64, terms=144 * 64)
    with pytest.raises(ValueError, match="accum must be between 1 and the batch size 12"):
        accumulated_backward(model, model, images, tokens, accum=13)


def _cfg(tmp_path, name: str, **kw) -> TrainConfig:
    base = dict(overrides=dict(MINI), steps=3, batch_size=8, warmup=1, output=str(tmp_path / name), workers=0,
                eval_images=16, tensorboard=False, progress=False, save_every=2, keep=0)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_train_with_accum_freq_follows_the_large_batch(tmp_path):
    """The trainer's --accum-freq: step 1 (same weights, same batch) logs the whole batch's loss, and the next steps
    stay with the plain run. (The float64 test above pins the gradients; the weights after a step are not compared
    bitwise: Adam's first steps are nearly sign steps, so a gradient at rounding level may move a weight by the lr.)"""
    train(_cfg(tmp_path, "plain"))
    train(_cfg(tmp_path, "accum", accum_freq=4))
    plain, accum = ([r["loss"] for r in read_metrics(tmp_path / n) if r["kind"] == "train"] for n in ("plain", "accum"))
    assert len(plain) == len(accum) == 3
    assert accum[0] == pytest.approx(plain[0], rel=1e-6)
    assert accum[1:] == pytest.approx(plain[1:], rel=1e-3)


def test_fp16_trains_with_a_scaler_and_resumes_exactly(tmp_path):
    full = train(_cfg(tmp_path, "full", precision="fp16", steps=4))
    state = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_00000004.pt")
    assert state["scaler"]["scale"] > 0 and math.isfinite(full["loss"])  # the scaler ran and was saved
    train(_cfg(tmp_path, "cut", precision="fp16", steps=2))
    train(_cfg(tmp_path, "cut", precision="fp16", steps=4, resume="auto"))
    again = load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_00000004.pt")
    for n, w in state["model"].items():
        assert torch.equal(w, again["model"][n]), n
    assert again["scaler"] == state["scaler"]


def test_locked_towers_do_not_move_and_the_head_does(tmp_path):
    train(_cfg(tmp_path, "locked", lock_image=True, lock_text=True, lock_text_unlocked_layers=1))
    first = load_checkpoint(tmp_path / "locked" / "checkpoints" / "step_00000002.pt")["model"]
    last = load_checkpoint(tmp_path / "locked" / "checkpoints" / "step_00000003.pt")["model"]
    moved = {n for n in first if not torch.equal(first[n], last[n])}
    assert not any(n.startswith("visual.") and n != "visual.tokens" for n in moved)  # the image tower is frozen
    assert "text_projection" not in moved and "text.token_embedding.weight" not in moved
    assert {"visual.tokens", "k_proj", "q_proj", "w_out", "text.transformer.blocks.0.mlp.0.weight"} <= moved
    model = llip.create_model("siglip-tiny", **MINI)
    frozen = model.lock_image_tower()
    assert "image_projection" in frozen and "visual.tokens" in frozen  # a pooled model's class token and projection
    with pytest.raises(ValueError, match="unlocked_layers must be between 0 and the tower's 1 blocks"):
        model.lock_text_tower(unlocked_layers=2)


def test_bad_combinations_are_one_error_line(tmp_path, capsys):
    assert main(["train", "--batch-size", "4", "--accum-freq", "5", "--output", str(tmp_path / "x")]) == 2
    assert "--accum-freq 5 is more than the 4 samples each rank gets" in capsys.readouterr().err
    assert main(["train", "--lock-text-unlocked-layers", "1", "--output", str(tmp_path / "y")]) == 2
    assert "--lock-text-unlocked-layers applies to --lock-text" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

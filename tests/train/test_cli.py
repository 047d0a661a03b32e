"""The ``llip`` command end to end through the console script: help, a 3-step run on the built-in data (checkpoint,
JSONL, TensorBoard, the results table), ``llip eval`` on that run, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llip.cli import _override, build_parser, main
from tests.mini import MINI_ARGS as MINI

REPO = Path(__file__).resolve().parents[2]
LLIP = Path(sys.executable).parent / "llip"  # the console script installed with the package


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # PYTHONPATH: the checkout itself, whatever an older editable install points at.
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(LLIP), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not LLIP.exists(), reason="the llip console script is not installed in this environment")
def test_console_script_trains_saves_and_evaluates(tmp_path):
    out = tmp_path / "run"
    done = _run("train", *MINI, "--steps", "3", "--batch-size", "8", "--eval-images", "20", "--workers", "1",
                "--output", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3/3" in done.stderr  # the progress bar reached the end
    for line in ("metric", "zero_shot_colour_top1", "image_to_text_R@1", "text_to_image_R@10", "chance"):
        assert line in done.stdout
    assert (out / "checkpoints" / "step_00000003.pt").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert [r["kind"] for r in records][-1] == "eval"
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["K"] == 4 and config["train"]["steps"] == 3

    evaluated = _run("eval", str(out), "--eval-images", "20", "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads(evaluated.stdout)
    final = records[-1]
    # The same weights on the same scenes: the numbers logged at the end of training.
    assert results["image_to_text_R@1"][0] == pytest.approx(final["image_to_text_R@1"])


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--set KEY=VALUE", "--data", "--batch-size", "--steps", "--epochs", "--lr", "--warmup",
                   "--weight-decay", "--precision", "--backend", "--output", "--resume", "--eval-every", "--seed",
                   "--workers", "--grad-clip", "--grad-checkpointing", "--compile"):  # fmt: skip
        assert option in text, option
    assert "--hang-after" not in text  # the test-only fault injection stays hidden


def test_overrides_and_defaults():
    assert _override("K=16") == ("K", 16)
    assert _override("tau=3.5") == ("tau", 3.5)
    assert _override("loss=softmax") == ("loss", "softmax")
    args = build_parser().parse_args(["train", "--set", "K=16", "--set", "tau=3"])
    from llip.cli import _config_from

    cfg = _config_from(args)
    assert cfg.model == "llip-tiny" and cfg.data == "builtin" and cfg.overrides == {"K": 16, "tau": 3}
    assert cfg.output == "runs/llip-tiny"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--set", "K16"])


def test_bad_input_gives_a_clear_error(tmp_path, capsys):
    """In process (the subprocess versions are in test_run_safety.py): one line, exit status 2."""
    assert main(["train", "--data", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "o"),
                 "--no-progress", "--no-tensorboard"]) == 2  # fmt: skip
    assert "llip train: error: CSV/TSV data file not found" in capsys.readouterr().err
    assert main(["train", "--model", "nope", "--output", str(tmp_path / "o")]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["train", "--set", "bogus=1", "--output", str(tmp_path / "o")]) == 2
    assert "unknown config field" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--batch-size", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llip train: error: argument --batch-size")


def test_device_choice(monkeypatch):
    """``cuda`` without an index is this rank's GPU (torch.cuda.set_device needs an index)."""
    import torch

    from llip.errors import UsageError
    from llip.train.placement import pick_device

    assert pick_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda", 1) == "cuda:1" and pick_device("cuda:0", 1) == "cuda:0"
    assert pick_device("auto", 1) == "cuda:1"
    with pytest.raises(UsageError, match="cuda:2 does not exist"):
        pick_device("cuda:2")

"""``llip train --report-to``: wandb in offline mode beside the JSONL log (a resumed run continues its wandb run),
and the one-line errors of a bad list or a missing package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llip.cli import main
from tests.mini import MINI_ARGS as MINI

REPO = Path(__file__).resolve().parents[2]


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    args = [sys.executable, "-m", "llip", "train", *MINI, "--batch-size", "8", "--eval-images", "8", "--workers", "0",
            "--save-every", "2", "--no-progress", "--output", str(out), *extra]  # fmt: skip
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def test_wandb_offline_run_and_its_resume(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (requirements/dev.txt)")
    out = tmp_path / "run"
    done = _train(out, "--steps", "2", "--report-to", "wandb")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (out / "tensorboard").exists()  # --report-to wandb alone: no TensorBoard
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    records = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    assert b"train/loss" in records and b"train/logit_scale" in records and b"eval/zero_shot_colour_top1" in records
    done = _train(out, "--steps", "4", "--resume", "auto", "--report-to", "tensorboard,wandb")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "wandb_run_id").read_text().strip() == run_id  # the same wandb run goes on
    assert len(sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2 and (out / "tensorboard").is_dir()


def test_report_to_errors_are_one_line(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["train", "--report-to", "tensorboard,mlflow", "--output", str(tmp_path / "a")])
    assert "expected a comma-separated list of tensorboard, wandb (or none)" in capsys.readouterr().err
    monkeypatch.setattr("llip.train.loop.wandb_available", lambda: False)
    assert main(["train", "--report-to", "wandb", "--output", str(tmp_path / "b")]) == 2
    assert "--report-to wandb needs the wandb package" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

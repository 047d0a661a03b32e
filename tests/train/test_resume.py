"""Exact resume: a run SIGKILLed after its step-4 checkpoint (with steps 5 and 6 already logged) and resumed with
``--resume auto`` logs bitwise the same losses as an uninterrupted run (CPU, fp32)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mini import MINI_ARGS as MINI

REPO = Path(__file__).resolve().parents[2]
STEPS = 8


def _env() -> dict:
    # PYTHONPATH: the checkout itself, whatever an editable install points at. One thread: bitwise reproducible.
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _args(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "llip", "train", *MINI, "--steps", str(STEPS), "--batch-size", "8", "--warmup", "3",
        "--lr", "2e-3", "--save-every", "4", "--workers", "1", "--no-tensorboard", "--no-progress",
        "--eval-images", "8", "--output", str(out), *extra,
    ]  # fmt: skip


def _losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def test_killed_run_resumes_bitwise(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_args(full), env=_env(), check=True, capture_output=True, timeout=300)

    # Interrupted run: it hangs after step 6 (checkpoint at step 4 on disk, steps 5-6 logged); SIGKILL it there.
    proc = subprocess.Popen(
        _args(cut, "--hang-after", "6"), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 240
    try:
        while len(_losses(cut) if (cut / "metrics.jsonl").exists() else []) < 6:
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stdout.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("training did not reach step 6 in time")
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in sorted((cut / "checkpoints").iterdir())] == ["step_00000004.pt"]
    assert [s for s, _ in _losses(cut)] == [1, 2, 3, 4, 5, 6]

    done = subprocess.run(_args(cut, "--resume", "auto"), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from step 4" in done.stdout
    # Steps 5-6 of the killed process were dropped from the log and redone; every loss is bit-identical.
    assert _losses(cut) == _losses(full)
    assert [s for s, _ in _losses(full)] == list(range(1, STEPS + 1))

"""The package as a user gets it: build the wheel from a copy of the sources, install it with nothing but its
declared dependencies into a fresh virtual environment that has the pinned CPU torch, then, from a folder outside
the checkout, print the version, train two steps on the built-in data (TensorBoard on, the default) and run one op
on the cpu backend, whose C++ sources must have travelled in the wheel.

About a minute: torch and the dependencies come from pip's cache, and the cpu kernel's build cache is shared
(it is keyed by a hash of the sources the wheel ships, so a wheel without them could not hit it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCH_PIN = next(
    line.split("#")[0].strip()
    for line in (REPO / "requirements" / "cpu.txt").read_text().splitlines()
    if line.startswith("torch==")
)
SKIP_DIRS = {".venv", ".venv-cuda", "build", "runs", ".git", ".pytest_cache", ".ruff_cache", "__pycache__", ".cache"}

CPU_OP = """
import torch, llip_kernels as lk
from llip_kernels.testing import make_llip_inputs
assert lk.__file__.startswith({site!r}), lk.__file__
x = make_llip_inputs(4, 5, 2, 3, 8)
loss = lk.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend="cpu")
loss.backward()
print("cpu op", float(loss))
"""


def _run(cmd, cwd, env, timeout=600):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_wheel_installs_and_trains_in_a_fresh_environment(tmp_path):
    if not torch.__version__.startswith(TORCH_PIN.removeprefix("torch==")):
        pytest.skip(f"needs the pinned {TORCH_PIN} (this environment has {torch.__version__})")
    sources = tmp_path / "src"
    shutil.copytree(REPO, sources, ignore=lambda d, names: [n for n in names if n in SKIP_DIRS])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV")}
    pip = ["-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"
    _run([sys.executable, *pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, sources], tmp_path, env)
    (wheel,) = wheels.glob("llip-*.whl")

    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(fresh)
    python = fresh / "bin" / "python"
    _run([python, *pip, "install", TORCH_PIN], tmp_path, env)
    _run([python, *pip, "install", wheel], tmp_path, env)  # its declared dependencies and nothing else

    work = tmp_path / "elsewhere"
    work.mkdir()
    llip = fresh / "bin" / "llip"
    assert _run([llip, "--version"], work, env).startswith("llip ")
    out = _run([llip, "train", "--steps", "2", "--batch-size", "16", "--eval-images", "32", "--output", "run",
                "--no-progress"], work, env)  # fmt: skip
    assert "checkpoint: run/checkpoints/step_00000002.pt" in out, out
    assert any((work / "run" / "tensorboard").iterdir())
    site = str(fresh / "lib")
    assert "cpu op" in _run([python, "-c", CPU_OP.format(site=site)], work, env)

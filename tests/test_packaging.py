"""The wheel carries the C++/CUDA sources, so an installed (non-editable) copy can still build its extensions."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked sources")
def test_wheel_ships_kernel_sources(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("llip-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "csrc"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert tracked, "git lists no csrc files: the test would pass vacuously"
    missing = [p for p in tracked if f"llip_kernels/{p}" not in names]
    assert not missing, f"wheel lacks kernel sources: {missing}"
    assert any(n.startswith("llip/configs/") for n in names)

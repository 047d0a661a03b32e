"""The wheel carries the C++/CUDA sources, so an installed (non-editable) copy can still build its extensions."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked sources")
def test_wheel_ships_kernel_sources(tmp_path):
    # Build from a copy of the tracked files, so that no stale build/ folder of the checkout takes part and the
    # checkout gets no build output.
    tracked_all = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    src = tmp_path / "src"
    for rel in tracked_all:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    (src / "csrc" / "cpu" / "stray.o").write_bytes(b"\0")  # a build leftover: must stay out of the wheel
    out = tmp_path / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
    res = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = out.glob("llip-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = [p for p in tracked_all if p.startswith("csrc/")]
    assert tracked, "git lists no csrc files: the test would pass vacuously"
    assert "llip_kernels/csrc/cpu/stray.o" not in names
    missing = [p for p in tracked if f"llip_kernels/{p}" not in names]
    assert not missing, f"wheel lacks kernel sources: {missing}"
    assert any(n.startswith("llip/configs/") for n in names)

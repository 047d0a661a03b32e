"""The package as a user gets it. The wheel, built from a copy of the sources git knows (tracked, or new and not
ignored), carries the C++/CUDA sources (so an installed copy can build its extensions), the configs, the BPE
vocabulary with its notice and the licence; installed with nothing but its declared dependencies into a fresh
virtual environment that has the pinned CPU torch, from a folder outside the checkout, it prints its version,
trains two steps on the built-in data (TensorBoard on, the default) and draws the curves, evaluates that run on an
image-folder tree and on a shard, loads an open_clip checkpoint and reproduces open_clip's encoders, and runs one
op on the cpu backend.

The fresh environment takes about a minute: torch and the dependencies come from pip's cache, and the cpu kernel's
build cache is shared (it is keyed by a hash of the sources the wheel ships, so a wheel without them misses it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCH_PIN = next(
    line.split("#")[0].strip()
    for line in (REPO / "requirements" / "cpu.txt").read_text().splitlines()
    if line.startswith("torch==")
)
CPU_OP = """
import llip_kernels as lk
from llip_kernels.testing import make_llip_inputs
assert lk.__file__.startswith({site!r}), lk.__file__
x = make_llip_inputs(4, 5, 2, 3, 8)
loss = lk.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend="cpu")
loss.backward()
print("cpu op", float(loss))
"""
OPEN_CLIP_LOAD = """
import torch, llip
from llip_kernels.testing import check_same_result
ref = torch.load("open_clip_reference.pt")
model = llip.create_model("clip-tiny", pretrained="open_clip.pt").eval()
with torch.no_grad():
    check_same_result("image", model.encode_image(ref["images"]), ref["image"], dtype=torch.float32, terms=96)
    check_same_result("text", model.encode_text(ref["tokens"]), ref["text"], dtype=torch.float32, terms=128)
print("open_clip checkpoint loads")
"""


def _user_data(folder: Path, open_clip_like) -> None:
    """What the fresh environment evaluates and loads: ``tree/<class>/<n>.png``, ``val.tar`` (webdataset-style
    pairs), an open_clip CLIP checkpoint with random weights (``open_clip.pt``) and its outputs on fixed inputs."""
    import io

    from PIL import Image

    import llip
    from tests.shards import write_shard

    members = []
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 30, 220)}.items():
        (folder / "tree" / name).mkdir(parents=True)
        for i in range(2):
            buf = io.BytesIO()
            Image.new("RGB", (40, 40), rgb).save(buf, format="PNG")
            (folder / "tree" / name / f"{i}.png").write_bytes(buf.getvalue())
            members += [(f"{name}{i}.png", buf.getvalue()), (f"{name}{i}.txt", f"a {name} picture".encode())]
    write_shard(folder / "val.tar", members)
    config = llip.get_config("clip-tiny")
    theirs = open_clip_like(config, quick_gelu=True)
    torch.save(theirs.state_dict(), folder / "open_clip.pt")
    images = torch.randn(2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    tokens = llip.get_tokenizer(config.context_length)(["a red picture", "two blue circles"])
    with torch.no_grad():
        ref = {
            "images": images,
            "tokens": tokens,
            "image": theirs.encode_image(images),
            "text": theirs.encode_text(tokens),
        }
    torch.save(ref, folder / "open_clip_reference.pt")


def _sources() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    return [p for p in listed.stdout.split("\n") if p and (REPO / p).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("needs git to list the sources")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for rel in _sources():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    (src / "csrc" / "cpu" / "stray.o").write_bytes(b"\0")  # a build leftover: must stay out of the wheel
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
    res = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (built,) = out.glob("llip-*.whl")
    return built


def test_wheel_ships_sources_data_and_licences(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    csrc = [p for p in _sources() if p.startswith("csrc/")]
    assert csrc, "git lists no csrc files: the test would pass vacuously"
    assert "llip_kernels/csrc/cpu/stray.o" not in names
    missing = [p for p in csrc if f"llip_kernels/{p}" not in names]
    assert not missing, f"wheel lacks kernel sources: {missing}"
    assert any(n.startswith("llip/configs/") for n in names)
    for data in ("llip/assets/bpe_simple_vocab_16e6.txt.gz", "llip/assets/BPE_VOCABULARY_LICENSE.txt"):
        assert data in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def _run(cmd, cwd, env, timeout=600) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_wheel_installs_trains_and_evaluates_in_a_fresh_environment(wheel, tmp_path, open_clip_like):
    if not torch.__version__.startswith(TORCH_PIN.removeprefix("torch==")):
        pytest.skip(f"needs the pinned {TORCH_PIN} (this environment has {torch.__version__})")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV")}
    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(fresh)
    python = fresh / "bin" / "python"
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    _run([*pip, TORCH_PIN], tmp_path, env)
    _run([*pip, wheel], tmp_path, env)  # its declared dependencies and nothing else

    work = tmp_path / "elsewhere"
    work.mkdir()
    _user_data(work, open_clip_like)
    llip = fresh / "bin" / "llip"
    assert _run([llip, "--version"], work, env).startswith("llip ")
    out = _run([llip, "train", "--steps", "2", "--batch-size", "16", "--eval-images", "32", "--output", "run",
                "--no-progress"], work, env)  # fmt: skip
    assert "checkpoint: run/checkpoints/step_00000002.pt" in out, out
    assert any((work / "run" / "tensorboard").iterdir())
    assert (work / "run" / "curves.png").stat().st_size > 0
    ckpt = "run/checkpoints/step_00000002.pt"
    _run([llip, "eval", ckpt, "--zeroshot", "tree", "--data", "val.tar", "--json-file", "eval.json"], work, env)
    results = json.dumps(json.loads((work / "eval.json").read_text()))
    assert "top1" in results and "R@1" in results, results
    assert "open_clip checkpoint loads" in _run([python, "-c", OPEN_CLIP_LOAD], work, env)
    assert "cpu op" in _run([python, "-c", CPU_OP.format(site=str(fresh / "lib"))], work, env)

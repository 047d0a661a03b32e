"""``llip train`` / ``llip eval`` never lose or mix work and never hide a fault, checked through the command itself
(a subprocess each): an existing run folder is refused unless resumed or overwritten; every bad input is one line
``llip <command>: error: ...`` with exit status 2, no traceback, and leaves an existing run untouched; skipped
samples are named and counted; a resume that cannot work is refused, one that changes the configuration says so;
and a kill in the middle of a checkpoint write is survived bitwise."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.mini import MINI_ARGS as MINI
from tests.shards import write_shard

REPO = Path(__file__).resolve().parents[2]
QUIET = ["--workers", "0", "--no-progress", "--eval-images", "8", "--batch-size", "8", "--lr", "2e-3"]


def _env() -> dict:
    # One thread: bitwise reproducible runs. PYTHONPATH: the checkout itself.
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def llip(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llip", *args], env=_env(), capture_output=True, text=True, timeout=timeout
    )


def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return llip("train", *MINI, *QUIET, "--output", str(out), *extra)


def assert_one_line_error(done: subprocess.CompletedProcess, command: str, *words: str) -> str:
    """Exit status 2, and the error is one line ``llip <command>: error: ...`` containing ``words``."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith(f"llip {command}: error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a hash of its bytes: to show that nothing was touched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4, TensorBoard on."""
    out = tmp_path_factory.mktemp("runs") / "done"
    done = train(out, "--steps", "4", "--save-every", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# ---- an existing run is never reused silently ----------------------------------------------------------------


def test_existing_run_is_refused_and_untouched(finished_run):
    before = snapshot(finished_run)
    done = train(finished_run, "--steps", "2")
    assert_one_line_error(done, "train", "already holds a run", "--resume auto", "--overwrite", "step 4")
    assert snapshot(finished_run) == before


def test_overwrite_replaces_the_run_and_says_so(tmp_path, finished_run):
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished_run), str(out)], check=True)
    (out / "notes.txt").write_text("mine")  # not part of the run: must survive
    done = train(out, "--steps", "2", "--save-every", "2", "--overwrite", "--no-tensorboard")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--overwrite: removed the previous run" in done.stderr
    assert [s for s, _ in losses(out)] == [1, 2]  # the new run only
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002.pt"]
    assert not (out / "tensorboard").exists() and (out / "notes.txt").read_text() == "mine"
    both = train(out, "--resume", "auto", "--overwrite")
    assert_one_line_error(both, "train", "--resume and --overwrite")


# ---- bad input: one line, exit 2, nothing touched -----------------------------------------------------------


@pytest.mark.parametrize(
    "args,words",
    [
        (["--batch-size", "0"], ["--batch-size", "positive integer"]),
        (["--batch-size", "-3"], ["--batch-size", "positive integer"]),
        (["--steps", "-5"], ["--steps", "positive integer"]),
        (["--backend", "nope"], ["--backend", "invalid choice"]),
        (["--backend", "cuda"], ["--backend cuda cannot run", "CUDA"]),
        (["--device", "cuda"], ["--device cuda", "no CUDA device"]),
        (["--device", "tpu:0"], ["--device", "tpu:0", "not a device"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_arguments(tmp_path, finished_run, args, words):
    if "cuda" in args and __import__("torch").cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    before = snapshot(finished_run)
    done = train(finished_run, "--resume", "auto", "--steps", "6", *args)
    assert_one_line_error(done, "train", *words)
    assert snapshot(finished_run) == before


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 256, 100, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "kind,words",
    [
        ("zero-byte tar", ["ran dry", "unreadable shard"]),
        ("tar without members", ["ran dry", "no sample at all"]),
        ("not images", ["ran dry", "image does not decode"]),
        ("captions only", ["ran dry", "no image"]),
        ("empty captions", ["ran dry", "empty caption"]),
    ],
)
def test_shards_without_a_readable_sample(tmp_path, kind, words):
    shard = tmp_path / "shard-000.tar"
    if kind == "zero-byte tar":
        shard.write_bytes(b"")
    else:
        images = [(f"k{i}.png", _png(i)) for i in range(3)]
        captions = [(f"k{i}.txt", b"a cat") for i in range(3)]
        members = {
            "tar without members": [],
            "not images": [(f"k{i}.png", b"not an image") for i in range(3)] + captions,
            "captions only": captions,
            "empty captions": images + [(f"k{i}.txt", b"  \n") for i in range(3)],
        }[kind]
        write_shard(shard, sorted(members))
    done = train(tmp_path / "run", "--data", str(shard), "--steps", "2")
    assert_one_line_error(done, "train", *words)


def test_csv_whose_images_are_all_missing(tmp_path):
    (tmp_path / "pairs.csv").write_text("filepath,caption\n" + "".join(f"img{i}.png,a cat\n" for i in range(40)))
    done = train(tmp_path / "run", "--data", str(tmp_path / "pairs.csv"), "--steps", "2")
    assert_one_line_error(done, "train", "none of the first 40 rows' images exist", "img0.png")


def test_unwritable_output(tmp_path):
    (tmp_path / "a-file").write_text("x")
    done = train(tmp_path / "a-file" / "run", "--steps", "1")
    assert_one_line_error(done, "train", "cannot write to --output")
    done = train(tmp_path / "a-file", "--steps", "1")
    assert_one_line_error(done, "train", "is a file, not a folder")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_one_line_error(train(locked / "run", "--steps", "1"), "train", "cannot write", "Permission denied")


def test_resume_of_another_model_is_refused_naming_both(finished_run):
    before = snapshot(finished_run)
    done = train(finished_run, "--resume", "auto", "--steps", "6", "--set", "K=6")
    assert_one_line_error(done, "train", "cannot resume", "K: 4 in the checkpoint, 6 here")
    done = llip("train", "--model", "siglip-tiny", *MINI, *QUIET, "--output", str(finished_run), "--resume", "auto")
    assert_one_line_error(done, "train", "cannot resume", "llip-tiny", "siglip-tiny")
    assert snapshot(finished_run) == before


def test_eval_of_a_truncated_checkpoint(tmp_path, finished_run):
    ckpt = sorted((finished_run / "checkpoints").iterdir())[-1]
    torn = tmp_path / "torn.pt"
    torn.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert_one_line_error(llip("eval", str(torn)), "eval", "cannot read checkpoint", "truncated")
    done = llip("eval", str(tmp_path / "nothing-here"))
    error = assert_one_line_error(done, "eval", "no such checkpoint")
    assert "--resume" not in error
    (tmp_path / "empty").mkdir()
    assert_one_line_error(llip("eval", str(tmp_path / "empty")), "eval", "no step_*.pt checkpoint")


def test_nothing_left_to_train_is_an_error(finished_run):
    done = train(finished_run, "--resume", "auto", "--steps", "3")
    assert_one_line_error(done, "train", "at step 4", "nothing left to train", "--steps above 4")


# ---- skipped samples are named and counted -----------------------------------------------------------------


def _bad_shard(path: Path, n: int = 12, broken=(3, 7), blank=(5,)) -> str:
    """``n`` samples: broken images at ``broken``, whitespace-only captions at ``blank``."""
    members = []
    for i in range(n):
        image = b"broken" if i in broken else _png(i)
        caption = b" \t " if i in blank else f"picture {i}".encode()
        members += [(f"k{i:03d}.png", image), (f"k{i:03d}.txt", caption)]
    return write_shard(path, members)


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 240
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"training exited before {what}: {proc.stdout.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"training did not reach {what} in time")
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def _popen_train(out: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "llip", "train", *MINI, *QUIET, "--output", str(out), *extra]
    return subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _skipped(out: Path) -> list[int]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["skipped"] for r in records if r["kind"] == "train"]


def test_skips_are_named_counted_and_survive_resume(tmp_path):
    """12 samples a pass, 3 of them bad (2 broken images, 1 whitespace-only caption). Samples are decoded, and bad
    ones counted, as they leave the shuffle buffer: 3 batches of 8 good samples read into the third pass, so the
    count grows to between 6 and 9, and a resumed run continues it exactly."""
    spec = _bad_shard(tmp_path / "shard-000.tar")
    common = ["--data", spec, "--steps", "3", "--save-every", "2", "--no-tensorboard"]
    full = train(tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr[-3000:]
    assert "skipped" in full.stderr and "k003: image does not decode" in full.stderr
    assert "k005: empty caption" in full.stderr
    counts = _skipped(tmp_path / "full")
    assert counts == sorted(counts) and 6 <= counts[-1] <= 9 and counts[0] >= 1
    assert f"skipped samples: {counts[-1]}" in full.stdout

    cut = tmp_path / "cut"
    proc = _popen_train(cut, *common, "--hang-after", "2")
    _kill_when(proc, lambda: (cut / "metrics.jsonl").exists() and len(losses(cut)) >= 2, "step 2")
    resumed = train(cut, *common, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _skipped(cut) == counts  # the count restored from the checkpoint, not restarted
    assert losses(cut) == losses(tmp_path / "full")


def test_csv_blank_captions_are_left_out_and_reported(tmp_path):
    rows = ["filepath,caption"]
    for i in range(10):
        Image.open(io.BytesIO(_png(i))).save(tmp_path / f"img{i}.png")
        rows.append(f"img{i}.png," + ("   " if i in (2, 4) else "" if i == 6 else f"picture {i}"))
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    done = train(tmp_path / "run", "--data", str(tmp_path / "pairs.csv"), "--steps", "1", "--no-tensorboard")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "left out 3 rows with an empty caption" in done.stderr
    assert "(7 rows)" in done.stdout  # what is trained on: the rows with a caption


def test_skips_are_summed_over_ranks(tmp_path):
    """Two ranks, one shard each with different numbers of bad samples: the logged total is their sum."""
    _bad_shard(tmp_path / "shard-000.tar", broken=(1,), blank=())
    _bad_shard(tmp_path / "shard-001.tar", broken=(2, 4, 6), blank=(8,))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [*torchrun, "-m", "llip", "train", *MINI, *QUIET, "--data", str(tmp_path / "shard-{000..001}.tar")]
    out = tmp_path / "ddp"
    done = subprocess.run(
        [*args, "--steps", "1", "--no-tensorboard", "--output", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _skipped(out) == [1 + 4]  # each rank reads its whole shard into the shuffle buffer first


# ---- resume: what changed, what was left behind ---------------------------------------------------------------


def test_resume_lists_a_changed_configuration(tmp_path, finished_run):
    out = tmp_path / "changed"
    subprocess.run(["cp", "-r", str(finished_run), str(out)], check=True)
    done = train(out, "--resume", "auto", "--steps", "5", "--set", "tau=3", "--batch-size", "4", "--no-tensorboard")
    assert done.returncode == 0, done.stderr[-3000:]
    warning = next(line for line in done.stderr.splitlines() if "changed configuration" in line)
    for change in ("batch_size: 8 -> 4", "model.tau: 5.0 -> 3.0", "steps: 4 -> 5"):
        assert change in warning, warning


def test_kill_during_checkpoint_write_then_resume_is_bitwise(tmp_path, finished_run):
    """Killed inside step 4's checkpoint write (the temporary file written, not yet renamed), with a torn line at
    the end of metrics.jsonl: the resume removes the temporary file, trims the line, continues from step 2, and
    logs bitwise the losses of the uninterrupted run; TensorBoard keeps each step once."""
    out = tmp_path / "cut"
    proc = _popen_train(out, "--steps", "4", "--save-every", "2", "--hang-in-checkpoint", "4")
    ckpts = out / "checkpoints"
    _kill_when(
        proc,
        lambda: ckpts.is_dir() and any(p.name.startswith(".step_00000004") for p in ckpts.iterdir()),
        "a torn write",
    )
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')
    done = train(out, "--steps", "4", "--save-every", "2", "--resume", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "removed 1 temporary file(s) left by interrupted checkpoint writes" in done.stderr
    assert "dropped a torn last line" in done.stderr
    assert "resumed from step 2" in done.stdout
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())
    assert losses(out) == losses(finished_run)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_default_warmup_is_a_fraction_of_a_short_run(finished_run, tmp_path):
    config = json.loads((finished_run / "config.json").read_text())
    assert config["warmup"] == 0  # 10% of 4 steps
    done = train(tmp_path / "run", "--steps", "2", "--warmup", "2", "--no-tensorboard")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--warmup 2 is more than half of the 2 steps" in done.stderr

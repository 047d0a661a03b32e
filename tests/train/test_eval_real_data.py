"""``llip eval --zeroshot / --data`` and ``llip train --val-data / --val-zeroshot`` on small data made here: an image
folder of solid-colour classes (with one corrupt file), a CSV of image-caption pairs and two tar shards. The
checkpoint is an untrained, shrunken llip-tiny saved the way ``llip train`` saves one: the tests check what the
commands print and write and that every number is a percentage, not that an untrained model classifies well.
Also the tau sweeps against the single-tau evaluation functions they generalise."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import llip
from llip.cli import main
from llip.evaluation import (
    build_zero_shot_classifier,
    retrieval_metrics,
    retrieval_metrics_sweep,
    zero_shot_accuracy,
    zero_shot_accuracy_sweep,
)
from llip.train.checkpoint import save_checkpoint
from llip.train.loop import TrainConfig
from llip.train.resume import RESUME_FREE_FIELDS
from tests.mini import MINI, MINI_ARGS
from tests.shards import write_shard

REPO = Path(__file__).resolve().parents[2]
LLIP = Path(sys.executable).parent / "llip"
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "dark_yellow": (150, 130, 20)}
CORRUPT = b"\x89PNG\r\n\x1a\n not really a png"
needs_script = pytest.mark.skipif(not LLIP.exists(), reason="the llip console script is not installed here")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(LLIP), *args], env=env, capture_output=True, text=True, timeout=300)


def _png_bytes(colour, seed: int) -> bytes:
    image = np.zeros((36, 44, 3), dtype=np.uint8)
    image[:] = colour
    image[seed : seed + 10, 4:14] = 255  # a white patch, so images of one class differ
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path | str]:
    """``zs/<colour>/<n>.png`` (4 classes x 2 images, one corrupt file more), ``pairs.csv`` (each image of the
    folder with two captions) and ``val-{0..1}.tar`` (4 samples each)."""
    root = tmp_path_factory.mktemp("data")
    rows = ["filepath,caption"]
    shard_members: list[list[tuple[str, bytes]]] = [[], []]
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(2):
            png = _png_bytes(colour, 4 * i + c)
            (root / "zs" / name).mkdir(parents=True, exist_ok=True)
            (root / "zs" / name / f"{i}.png").write_bytes(png)
            words = name.replace("_", " ")
            rows += [f"zs/{name}/{i}.png,a {words} picture", f"zs/{name}/{i}.png,{words} image number {i}"]
            shard_members[i] += [(f"{name}_{i}.png", png), (f"{name}_{i}.txt", f"a {words} square".encode())]
    (root / "zs" / "red" / "broken.png").write_bytes(CORRUPT)
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    for s, members in enumerate(shard_members):
        write_shard(root / f"val-{s}.tar", members)
    return {"root": root, "zs": root / "zs", "csv": root / "pairs.csv", "shards": str(root / "val-{0..1}.tar")}


def _save_untrained(folder: Path, model_name: str, step: int = 1) -> Path:
    """An untrained model's checkpoint with the entries ``llip eval`` reads, as ``llip train`` writes them."""
    torch.manual_seed(0)
    model = llip.create_model(model_name, **MINI)
    state = {
        "step": step,
        "model": model.state_dict(),
        "config": dataclasses.asdict(TrainConfig(model=model_name, overrides=dict(MINI))),
        "model_config": dataclasses.asdict(model.config),
    }
    return save_checkpoint(state, folder / "checkpoints", step, keep=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    _save_untrained(run, "llip-tiny")
    return run


def _percent(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 100.0


# ------------------------------------------------------------------------------------------- llip eval --zeroshot
@needs_script
def test_zeroshot_with_a_tau_sweep(data, run_dir):
    done = _cli("eval", str(run_dir), "--zeroshot", str(data["zs"]), "--templates", "simple",
                "--tau", "1", "3", "5", "8", "10", "--workers", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "4 classes, 8 images, 1 skipped, 1 templates" in out
    for label in ("1 ", "3 ", "5 *", "8 ", "10 ", "chance"):
        assert any(line.startswith(label) for line in out.splitlines()), label
    assert "best tau: " in out and "top5" not in out  # 4 classes: top-5 would be trivially 100%
    assert "skipped red/broken.png: image does not decode" in done.stderr
    results = json.loads((run_dir / "checkpoints" / "step_00000001.eval.json").read_text())
    zs = results["zeroshot"]
    assert results["step"] == 1 and results["model_tau"] == 5.0
    assert [r["tau"] for r in zs["results"]] == [1.0, 3.0, 5.0, 8.0, 10.0]
    assert all(_percent(r["top1"]) for r in zs["results"]) and zs["chance"] == {"top1": 25.0}
    assert zs["best"] in zs["results"] and zs["best"]["top1"] == max(r["top1"] for r in zs["results"])
    assert (zs["classes"], zs["images"], zs["skipped"], zs["classnames"]) == (4, 8, 1, "folder names")
    # The same file again is refused: a results file is never replaced without --overwrite.
    again = _cli("eval", str(run_dir), "--zeroshot", str(data["zs"]), "--templates", "simple")
    assert again.returncode == 2 and again.stderr.startswith("llip eval: error: the results file")
    assert again.stderr.count("\n") == 1


@needs_script
def test_zeroshot_with_classnames_and_the_80_templates(data, run_dir, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("blue\nolive\ngreen\nred\n")  # sorted folders: blue, dark_yellow, green, red
    target = tmp_path / "zs.json"
    done = _cli("eval", str(run_dir / "checkpoints" / "step_00000001.pt"), "--zeroshot", str(data["zs"]),
                "--classnames", str(names), "--json-file", str(target), "--json", "--workers", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    assert printed == json.loads(target.read_text())
    zs = printed["zeroshot"]
    assert zs["templates"] == 80 and zs["classnames"] == str(names)
    assert len(zs["results"]) == 1 and zs["results"][0]["tau"] == 5.0 and _percent(zs["results"][0]["top1"])


@needs_script
def test_class_name_count_mismatch_is_one_error_line(data, run_dir, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("blue\ngreen\nred\n")
    done = _cli("eval", str(run_dir), "--zeroshot", str(data["zs"]), "--classnames", str(names))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"llip eval: error: --classnames {names}: has 3 names and ")
    assert "4 class folders" in done.stderr and done.stderr.count("\n") == 1


def test_bad_zeroshot_inputs(data, run_dir, tmp_path, capsys):
    """In process, as the command runs them: exit status 2 and one line naming the argument."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images" / "a").mkdir(parents=True)
    (tmp_path / "all_corrupt" / "a").mkdir(parents=True)
    (tmp_path / "all_corrupt" / "a" / "x.png").write_bytes(CORRUPT)
    corrupt = ["--zeroshot", str(tmp_path / "all_corrupt"), "--templates", "simple", "--json-file", str(tmp_path / "c")]
    cases = [
        (corrupt, "none of its 1 image files decodes"),  # found only when decoding: after the checkpoint loads
        (["--zeroshot", str(tmp_path / "missing")], "--zeroshot .*missing: no such folder"),
        (["--zeroshot", str(tmp_path / "empty")], "--zeroshot .*empty: no class folders"),
        (["--zeroshot", str(tmp_path / "no_images")], "class folders hold no image files"),
        (["--zeroshot", str(data["zs"]), "--classnames", "imagenet"], "needs the 1000 ImageNet-1k class folders"),
        (["--zeroshot", str(data["zs"]), "--templates", str(data["csv"])], "--templates .*line 1 .* exactly one"),
        (["--tau", "3"], "--tau applies to --zeroshot or --data"),
        (["--data", "builtin"], "--data 'builtin': expected a .csv/.tsv file"),
        (["--zeroshot", str(data["zs"]), "--json-file", str(tmp_path / "no" / "x.json")], "no such folder"),
    ]
    for extra, message in cases:
        assert main(["eval", str(run_dir), *extra]) == 2, extra
        *warnings, err = capsys.readouterr().err.splitlines()  # warnings name each unreadable file
        assert all(w.startswith("llip: warning: skipped") for w in warnings), warnings
        assert err.startswith("llip eval: error: ") and re.search(message, err), (message, err)
    assert not (tmp_path / "no").exists()


def test_builtin_eval_writes_json_only_when_asked(run_dir, tmp_path, capsys):
    target = tmp_path / "builtin.json"
    assert main(["eval", str(run_dir), "--eval-images", "10", "--json-file", str(target)]) == 0
    assert "zero_shot_colour_top1" in capsys.readouterr().out
    assert json.loads(target.read_text())["image_to_text_R@1"][1] > 0  # (result, chance)
    assert main(["eval", str(run_dir), "--eval-images", "10", "--json-file", str(target)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--eval-images", "10", "--json-file", str(target), "--overwrite"]) == 0


def test_tau_is_refused_for_a_pooled_model(data, tmp_path, capsys):
    _save_untrained(tmp_path, "siglip-tiny")
    args = ["eval", str(tmp_path), "--zeroshot", str(data["zs"]), "--templates", "simple", "--tau", "3"]
    assert main(args) == 2
    assert "--tau sets the Llip mixer temperature; siglip-tiny has no mixer" in capsys.readouterr().err
    assert not list((tmp_path / "checkpoints").glob("*.json"))  # refused before anything was written


# ------------------------------------------------------------------------------------------- llip eval --data
@needs_script
@pytest.mark.parametrize("source", ["csv", "shards"])
def test_retrieval_on_held_out_pairs(data, run_dir, tmp_path, source):
    target = tmp_path / "r.json"
    done = _cli("eval", str(run_dir), "--data", str(data[source]), "--json-file", str(target), "--tau", "3", "5",
                "--workers", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    captions = 16 if source == "csv" else 8
    assert f"8 images, {captions} captions" in done.stdout
    assert "I->T R@1" in done.stdout and "T->I R@10" in done.stdout and "best tau: " in done.stdout
    rt = json.loads(target.read_text())["retrieval"]
    assert (rt["images"], rt["captions"], rt["skipped"], rt["truncated"]) == (8, captions, 0, False)
    for row in rt["results"]:
        for direction in ("image_to_text", "text_to_image"):
            recalls = [row[f"{direction}_R@{k}"] for k in (1, 5, 10)]
            assert all(_percent(r) for r in recalls) and recalls == sorted(recalls)
            assert recalls[-1] == 100.0 if direction == "text_to_image" else True  # 8 images: R@10 finds any
    assert rt["chance"]["text_to_image_R@1"] == pytest.approx(100 / 8)


# ------------------------------------------------------------------------------------------- llip train --val-*
@needs_script
def test_train_logs_val_metrics(data, tmp_path):
    out = tmp_path / "run"
    done = _cli("train", *MINI_ARGS, "--steps", "2", "--batch-size", "8", "--eval-images", "10", "--workers", "0",
                "--eval-every", "1", "--no-progress", "--no-tensorboard", "--output", str(out),
                "--val-data", str(data["csv"]), "--val-zeroshot", str(data["zs"]),
                "--val-templates", "simple")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for key in ("zero_shot_colour_top1", "val/image_to_text_R@1", "val/text_to_image_R@10", "val_zeroshot/top1"):
        assert key in done.stdout, key  # the final table
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2]
    for record in evals:
        assert _percent(record["val/image_to_text_R@5"]) and _percent(record["val_zeroshot/top1"])
        assert "val_zeroshot/top5" not in record  # 4 classes
    config = json.loads((out / "config.json").read_text())["train"]
    assert config["val_data"] == str(data["csv"]) and config["val_templates"] == "simple"


def test_train_refuses_bad_val_paths_before_writing(data, tmp_path, capsys):
    out = tmp_path / "run"
    for extra, message in (
        (["--val-zeroshot", str(tmp_path / "missing")], "--val-zeroshot .*missing: no such folder"),
        (["--val-data", str(tmp_path / "x.csv")], "--val-data: CSV/TSV data file not found"),
        (["--val-data", "builtin"], "--val-data 'builtin': expected"),
        (
            ["--val-zeroshot", str(data["zs"]), "--val-classnames", str(tmp_path / "n.txt")],
            "--val-classnames .*no such",
        ),
    ):
        assert main(["train", *MINI_ARGS, "--steps", "1", "--output", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("llip train: error: "), err
        assert re.search(message, err), err
    assert not out.exists()
    assert {"val_data", "val_samples", "val_zeroshot", "val_classnames", "val_templates"} <= RESUME_FREE_FIELDS


# ------------------------------------------------------------------------------------------- sweeps
def test_sweeps_match_the_single_tau_functions():
    """A sweep encodes each image batch once and scores it at every tau: each of its results must be what the
    single-tau function gives at that tau (batch 3 splits the 7 images unevenly)."""
    torch.manual_seed(0)
    model = llip.create_model("llip-tiny", **MINI).eval()
    tok = llip.get_tokenizer(context_length=model.context_length)
    images = torch.randn(7, 3, 32, 32)
    clf = build_zero_shot_classifier(model, tok, ["red", "green", "blue"], ["a {} thing", "the {}"], batch_size=4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    sweep = zero_shot_accuracy_sweep(model, clf, images, [1.0, 8.0, None], labels, batch_size=3)
    for tau in (1.0, 8.0, None):
        assert sweep[tau] == zero_shot_accuracy(model, clf, images, labels, batch_size=3, tau=tau)
    tokens = tok([f"caption {i}" for i in range(9)])
    owners = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1])
    rsweep = retrieval_metrics_sweep(model, images, tokens, owners, [0.5, None], batch_size=3)
    assert rsweep[None] == retrieval_metrics(model, images, tokens, owners, batch_size=3)
    assert rsweep[0.5] == retrieval_metrics(model, images, tokens, owners, batch_size=3, tau=0.5)

"""Training curves (:mod:`llip.train.curves`, ``llip plot``): the panels a run's metrics give, the PNG written, runs
that were resumed, are one step old or have no evaluation yet, the one-line errors, and the picture at the end of a
real ``llip train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from llip.cli import main
from llip.errors import UsageError
from llip.train.curves import DPI, PANEL_INCHES, PANELS_PER_ROW, build_figure, panels, plot_run, read_records
from llip.train.metrics import MetricsLog
from tests.mini import MINI_ARGS as MINI

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_TITLES = ["training loss", "learning rate", "logit scale t"]


def _train_record(step: int, loss: float | None = None, **extra) -> dict:
    """A train record as ``llip train`` logs it (without the optional keys unless given in ``extra``)."""
    loss = 5.0 - 0.1 * step if loss is None else loss
    return {"kind": "train", "step": step, "loss": loss, "lr": 1e-3 * step, "logit_scale": 10.0 + step,
            "step_time": 0.1, "skipped": 0, **extra}  # fmt: skip


def _eval_record(step: int, **extra) -> dict:
    """An eval record with two zero-shot tasks and three recalls (a real one has three tasks and six recalls)."""
    return {"kind": "eval", "step": step, "zero_shot_colour_top1": 30.0 + step, "zero_shot_shape_top1": 25.0,
            "image_to_text_R@1": 1.0 + step, "text_to_image_R@1": 0.5, "image_to_text_R@5": 5.0, **extra}  # fmt: skip


def _write_metrics(folder: Path, records: list[dict], tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return folder


def _log(log: MetricsLog, record: dict) -> None:
    """Log ``record`` as the training loop does: its kind is the log's prefix."""
    log.log({key: value for key, value in record.items() if key != "kind"}, prefix=record["kind"])


def _titles(records: list[dict]) -> list[str]:
    """The titles of the subplots actually drawn for ``records``."""
    return [ax.get_title() for ax in build_figure(panels(records)).axes]


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        return image.size


def _expected_size(n_panels: int) -> tuple[int, int]:
    """Pixels of a figure of ``n_panels``: PANELS_PER_ROW to a row (fewer if there are fewer), PANEL_INCHES each."""
    cols, rows = min(PANELS_PER_ROW, n_panels), -(-n_panels // PANELS_PER_ROW)
    return round(cols * PANEL_INCHES[0] * DPI), round(rows * PANEL_INCHES[1] * DPI)


def test_plot_run_writes_a_png_with_a_panel_per_quantity(tmp_path):
    records = [_train_record(s, logit_bias=-10.0 + s) for s in range(1, 21)]
    records[10:10] = [_eval_record(10, val_loss=4.0)]  # eval records sit between train records, as logged
    records.append(_eval_record(20, val_loss=3.0))
    _write_metrics(tmp_path, records)

    path = plot_run(tmp_path)

    assert path == tmp_path / "curves.png"
    assert _png_size(path) == _expected_size(7) == (1500, 1080)  # 3 rows of 3 panels; the last row has one
    figure = build_figure(panels(read_records(tmp_path)))
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == [*TRAIN_TITLES, "logit bias b", "zero-shot accuracy (%)", "retrieval recall (%)",
                      "other eval metrics"]  # fmt: skip
    loss, _, _, bias, zero_shot, retrieval, other = figure.axes
    assert list(loss.lines[0].get_xdata()) == list(range(1, 21))
    assert list(bias.lines[0].get_ydata()) == [-10.0 + s for s in range(1, 21)]
    assert zero_shot.get_legend_handles_labels()[1] == ["colour top1", "shape top1"]
    assert retrieval.get_legend_handles_labels()[1] == ["I->T R@1", "T->I R@1", "I->T R@5"]
    assert list(retrieval.lines[0].get_xdata()) == [10, 20] and list(retrieval.lines[0].get_ydata()) == [11.0, 21.0]
    assert other.get_legend_handles_labels()[1] == ["val loss"]


def test_a_resumed_run_reads_as_one_run(tmp_path):
    """Resuming from step 4 trims the log (MetricsLog) and redoes steps 5 and 6 with other losses: the curves show
    steps 1..8 once, with the redone values. An untrimmed log (the later record of a step wins) draws the same."""
    first = MetricsLog(tmp_path / "trimmed", tensorboard=False)
    for step in range(1, 7):
        _log(first, _train_record(step, loss=9.0))
        if step in (3, 6):
            _log(first, _eval_record(step))
    resumed = MetricsLog(tmp_path / "trimmed", tensorboard=False, resume_step=4)
    for step in range(5, 9):
        _log(resumed, _train_record(step, loss=1.0))
    _log(resumed, _eval_record(8))

    drawn = panels(read_records(tmp_path / "trimmed"))
    assert drawn[0].title == "training loss"
    assert drawn[0].series["loss"] == ([1, 2, 3, 4, 5, 6, 7, 8], [9.0] * 4 + [1.0] * 4)
    assert drawn[-1].series["I->T R@1"][0] == [3, 8]  # the eval at step 6 was redone at step 8

    untrimmed = [_train_record(s, loss=9.0) for s in range(1, 7)] + [_train_record(s, loss=1.0) for s in range(5, 9)]
    _write_metrics(tmp_path / "untrimmed", untrimmed)
    assert panels(read_records(tmp_path / "untrimmed"))[0] == drawn[0]
    assert _png_size(plot_run(tmp_path / "trimmed")) == _expected_size(5)


def test_a_run_one_step_old_has_visible_points(tmp_path):
    """One train record, no eval yet: the three train panels, each point drawn with a marker (a line of one point
    would be invisible)."""
    _write_metrics(tmp_path, [_train_record(1)])
    assert _png_size(plot_run(tmp_path)) == _expected_size(3) == (1500, 360)
    figure = build_figure(panels(read_records(tmp_path)))
    assert [ax.get_title() for ax in figure.axes] == TRAIN_TITLES
    assert all(ax.lines[0].get_marker() == "o" for ax in figure.axes)


def test_a_run_still_going_draws_without_eval_and_its_torn_last_line(tmp_path):
    """No eval records yet, and a last line being written right now: the train panels, from the complete lines;
    grad_norm (logged with --grad-clip) gets its panel."""
    records = [_train_record(s, grad_norm=0.5) for s in range(1, 61)]
    _write_metrics(tmp_path, records, tail='{"kind": "train", "step": 61, "lo')
    assert _titles(read_records(tmp_path)) == [*TRAIN_TITLES, "gradient norm (before clipping)"]
    assert panels(read_records(tmp_path))[0].series["loss"][0] == list(range(1, 61))
    assert plot_run(tmp_path).is_file()


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "is not a folder: expected a run folder written by `llip train`"),
        (lambda d: d.mkdir(), "metrics.jsonl not found: expected the metrics file"),
        (lambda d: _write_metrics(d, [], tail="\n\n"), "metrics.jsonl is empty: expected one JSON record per line"),
        (lambda d: _write_metrics(d, [], tail='{"kind"\n{"kind": "train", "step": 1}\n'), "line 1 is not a JSON"),
        (lambda d: _write_metrics(d, [{"kind": "train", "step": 1}]), "holds no numeric metrics to draw"),
    ],
    ids=["no-folder", "no-metrics", "empty", "bad-line", "nothing-numeric"],
)
def test_what_cannot_be_drawn_is_one_clear_line(tmp_path, setup, message):
    run_dir = tmp_path / "run"
    setup(run_dir)
    with pytest.raises(UsageError) as error:
        plot_run(run_dir)
    text = str(error.value)
    assert message in text and str(run_dir) in text and "\n" not in text


def test_without_matplotlib_the_error_says_to_install_it(tmp_path, monkeypatch):
    _write_metrics(tmp_path, [_train_record(1)])
    # A None entry in sys.modules makes that import fail, as if matplotlib were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(UsageError, match=r"needs matplotlib .*pip install matplotlib") as error:
        plot_run(tmp_path)
    assert "\n" not in str(error.value)


def test_llip_plot_writes_where_asked_and_errors_in_one_line(tmp_path, capsys):
    _write_metrics(tmp_path / "run", [_train_record(s) for s in range(1, 4)] + [_eval_record(3)])
    assert main(["plot", str(tmp_path / "run"), "--output", str(tmp_path / "elsewhere.png")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'elsewhere.png'}\n"
    assert _png_size(tmp_path / "elsewhere.png") == _expected_size(5)
    assert not (tmp_path / "run" / "curves.png").exists()

    assert main(["plot", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"llip plot: error: {tmp_path / 'missing'} is not a folder")


def test_a_drawing_failure_is_a_warning_not_a_failed_run(tmp_path, monkeypatch, capsys):
    import llip.train.curves
    from llip.train.loop import _draw_curves

    def broken(run_dir):
        raise RuntimeError("disk full")

    monkeypatch.setattr(llip.train.curves, "plot_run", broken)
    assert _draw_curves(tmp_path) is None
    captured = capsys.readouterr()
    assert captured.err == "llip train: warning: could not draw the curves: disk full\n"
    assert "curves:" not in captured.out


def test_llip_train_ends_with_the_curves(tmp_path):
    """A two-step run through the command: curves.png beside metrics.jsonl, its path printed under the checkpoint's."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}  # the checkout, whatever is installed
    done = subprocess.run(
        [sys.executable, "-m", "llip", "train", *MINI, "--steps", "2", "--batch-size", "8", "--eval-images", "8",
         "--workers", "0", "--no-progress", "--no-tensorboard", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-2:] == [f"checkpoint: {out / 'checkpoints' / 'step_00000002.pt'}", f"curves: {out / 'curves.png'}"]
    # The final evaluation is in the picture: three train panels, zero-shot and retrieval.
    assert _png_size(out / "curves.png") == _expected_size(5)

"""Training curves: :func:`plot_run` draws a run folder's ``metrics.jsonl`` as one picture, ``curves.png``.

One panel per quantity, each against the step: the training loss, the learning rate, the logit scale t (the
multiplier, as logged), the logit bias b and the gradient norm when the records carry them, then the evaluation
metrics by family (zero-shot accuracies, retrieval recalls, any other number). ``llip train`` draws it at the end
of a run; ``llip plot RUN_DIR`` draws it at any time, also while a run is still going.

The figure is drawn on matplotlib's Agg canvas directly, without pyplot: no global backend to switch, no figure
left open.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"

# Train-record keys drawn, one panel each, in this order; a key no record carries gets no panel.
TRAIN_PANELS = (
    ("loss", "training loss"),
    ("lr", "learning rate"),
    ("logit_scale", "logit scale t"),
    ("logit_bias", "logit bias b"),
    ("grad_norm", "gradient norm (before clipping)"),  # logged only with --grad-clip
)
ZERO_SHOT, RETRIEVAL, OTHER_EVAL = "zero-shot accuracy (%)", "retrieval recall (%)", "other eval metrics"
NOT_METRICS = ("kind", "step")  # every record's bookkeeping, not a quantity to draw

PANELS_PER_ROW = 3
PANEL_INCHES = (5.0, 3.6)  # width, height of one panel
DPI = 100
MARKERS_UP_TO = 50  # series this short get a marker on every point (a single point would otherwise be invisible)


@dataclass
class Panel:
    """One subplot: its title and its named series, each ``(steps, values)`` sorted by step."""

    title: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    legend: bool = True  # False where the title already names the only series


def plot_run(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Draw ``<run_dir>/metrics.jsonl`` into ``output`` (default ``<run_dir>/curves.png``) and return its path.

    Raises :class:`UsageError` (one line) when ``run_dir`` is not a folder, has no metrics file, or the file holds
    nothing to draw, and when matplotlib is not installed."""
    records = read_records(run_dir)
    drawn = panels(records)
    if not drawn:
        raise UsageError(f"{Path(run_dir) / METRICS_FILE} holds no numeric metrics to draw (no train or eval values)")
    figure = build_figure(drawn, title=Path(run_dir).resolve().name)
    path = Path(output) if output is not None else Path(run_dir) / CURVES_FILE
    figure.savefig(path, dpi=DPI)
    return path


# ------------------------------------------------------------------------------------------------- reading
def read_records(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl``, in file order. A torn last line is left out: the run may be
    writing it right now, or was killed while writing it."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder: expected a run folder written by `llip train`")
    path = folder / METRICS_FILE
    if not path.is_file():
        raise UsageError(f"{path} not found: expected the metrics file that `llip train` writes in its run folder")
    lines = path.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None and n == len(lines):
            continue
        if record is None:
            raise UsageError(f"{path} line {n} is not a JSON record; fix or remove that line")
        records.append(record)
    if not records:
        raise UsageError(f"{path} is empty: expected one JSON record per line, as `llip train` writes them")
    return records


def _parse(line: str) -> dict | None:
    """The JSON object on ``line``, or None if it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


# ------------------------------------------------------------------------------------------------- panels
def panels(records: list[dict]) -> list[Panel]:
    """What :func:`plot_run` draws, in order: the train panels of :data:`TRAIN_PANELS` that have values, then the
    eval metrics by family, then one panel per other record kind (e.g. a validation loss)."""
    by_kind: dict[str, list[dict]] = {}
    for record in records:
        if isinstance(record.get("kind"), str) and _is_number(record.get("step")):
            by_kind.setdefault(record["kind"], []).append(record)

    train = by_kind.pop("train", [])
    drawn = []
    for key, title in TRAIN_PANELS:
        steps, values = _series(train, key)
        if steps:
            drawn.append(Panel(title, {key: (steps, values)}, legend=False))

    families = {title: Panel(title) for title in (ZERO_SHOT, RETRIEVAL, OTHER_EVAL)}
    evals = by_kind.pop("eval", [])
    for key in _metric_keys(evals):
        families[_eval_family(key)].series[_eval_label(key)] = _series(evals, key)
    drawn += [panel for panel in families.values() if panel.series]

    for kind, kind_records in by_kind.items():
        panel = Panel(f"{kind} metrics", {key: _series(kind_records, key) for key in _metric_keys(kind_records)})
        if panel.series:
            drawn.append(panel)
    return drawn


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key``, sorted by step. Where a step appears twice (a resumed run whose log was not
    trimmed), the later record wins: it is the one the run continued from."""
    by_step = {record["step"]: record[key] for record in records if _is_number(record.get(key))}
    steps = sorted(by_step)
    return steps, [float(by_step[step]) for step in steps]


def _metric_keys(records: list[dict]) -> list[str]:
    """The keys with a finite number in at least one record, in order of first appearance."""
    keys: dict[str, None] = {}
    for record in records:
        keys.update((key, None) for key, value in record.items() if key not in NOT_METRICS and _is_number(value))
    return list(keys)


def _is_number(value) -> bool:
    """A finite int or float (not a bool): NaN and infinities would wreck the axis limits."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _eval_family(key: str) -> str:
    """The eval panel a metric belongs to (keys as :func:`llip.train.evaluate.evaluate_builtin` names them, and the
    validation sets' ``val/...`` and ``val_zeroshot/...``)."""
    if key.startswith(("zero_shot_", "val_zeroshot/")):
        return ZERO_SHOT
    if "_R@" in key:
        return RETRIEVAL
    return OTHER_EVAL


def _eval_label(key: str) -> str:
    """A short legend label: ``zero_shot_colour_top1`` -> ``colour top1``, ``image_to_text_R@1`` -> ``I->T R@1``."""
    label = key.removeprefix("zero_shot_").replace("image_to_text_", "I->T ").replace("text_to_image_", "T->I ")
    return label.replace("_", " ")


# ------------------------------------------------------------------------------------------------- drawing
def build_figure(drawn: list[Panel], title: str = ""):
    """A matplotlib ``Figure`` with one subplot per panel (at least one), :data:`PANELS_PER_ROW` to a row, all
    against the step."""
    figure_class, canvas_class = _matplotlib()
    ncols = min(PANELS_PER_ROW, len(drawn))
    nrows = math.ceil(len(drawn) / ncols)
    figure = figure_class(figsize=(PANEL_INCHES[0] * ncols, PANEL_INCHES[1] * nrows), layout="constrained")
    canvas_class(figure)  # attaches the Agg canvas that savefig renders with
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, drawn):
        _draw_panel(ax, panel)
    for ax in axes[len(drawn) :]:  # the unused cells of the last row
        figure.delaxes(ax)
    if title:
        figure.suptitle(title)
    return figure


def _draw_panel(ax, panel: Panel) -> None:
    for label, (steps, values) in panel.series.items():
        marker = "o" if len(steps) <= MARKERS_UP_TO else None
        ax.plot(steps, values, label=label, linewidth=1.0, marker=marker, markersize=3)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if panel.legend:
        ax.legend(fontsize="small")


def _matplotlib():
    """``(Figure, FigureCanvasAgg)``, or a one-line :class:`UsageError` saying to install matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise UsageError(f"drawing the curves needs matplotlib ({e}); install it: pip install matplotlib") from None
    return Figure, FigureCanvasAgg

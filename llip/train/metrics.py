"""Metrics to a JSONL file (one record per line, floats written exactly) and, optionally, TensorBoard and wandb."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

from ..errors import UsageError

WANDB_ID_FILE = "wandb_run_id"  # in the run folder: a resumed run continues the same wandb run


class MetricsLog:
    """``log(record)`` appends ``record`` (a flat dict with a ``step``) to ``<folder>/metrics.jsonl`` and sends its
    numbers to TensorBoard and wandb under ``<prefix>/<key>``.

    A resumed run redoes the steps after its checkpoint, so ``resume_step`` cuts the logs back to it: the JSONL
    file loses its records after that step (a torn last line, from a kill mid-write, is dropped with a warning) and
    TensorBoard purges its events after it (``purge_step``), so each reads as one uninterrupted run. wandb cannot
    take a step back: the resumed run continues the same wandb run (its id is kept in the run folder), whose
    records of the redone steps are the first run's.

    ``wandb``: None, or the keywords of ``wandb.init`` beyond those set here (``project``, ``config``); the run is
    named after the folder and writes under ``<folder>/wandb``. ``WANDB_MODE=offline`` keeps it on disk."""

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
        wandb: dict | None = None,
    ):
        folder = Path(folder)
        self.path = folder / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it pulls in tensorboard

            purge = None if resume_step is None else resume_step + 1  # events at later steps will be redone
            self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=purge)
        self.wandb_run = None
        self.wandb_last_step = -1
        if wandb is not None:
            self.wandb_run = _start_wandb(folder, dict(wandb), resumed=resume_step is not None)
            self.wandb_last_step = int(getattr(self.wandb_run, "step", 0) or 0) - 1  # a resumed run's last step

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # the last record was being written when the run was killed
                    print(f"llip: warning: dropped a torn last line of {self.path} (line {n})", file=sys.stderr)
                    continue
                raise UsageError(f"{self.path} line {n} is not a JSON record; fix or remove that line") from None
            if record.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict, prefix: str = "train") -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": prefix, **record}) + "\n")
        numbers = {f"{prefix}/{k}": v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, record["step"])
        if self.wandb_run is not None and record["step"] >= self.wandb_last_step:  # see the class docstring
            self.wandb_run.log(numbers, step=record["step"])
            self.wandb_last_step = record["step"]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def wandb_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def _start_wandb(folder: Path, settings: dict, resumed: bool):
    """A wandb run for ``folder``: a new one, or on resume the one whose id the folder keeps."""
    import wandb

    id_file = folder / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:8]
    run = wandb.init(id=run_id, resume="allow", name=settings.pop("name", folder.name), dir=str(folder), **settings)
    id_file.write_text(run_id + "\n")
    return run


def read_metrics(folder: str | os.PathLike, kind: str | None = "train") -> list[dict]:
    """The records of ``<folder>/metrics.jsonl`` (only those of ``kind`` unless ``kind`` is None)."""
    path = Path(folder) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in records if kind is None or r.get("kind") == kind]

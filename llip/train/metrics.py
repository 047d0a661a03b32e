"""Metrics to a JSONL file (one record per line, floats written exactly) and, optionally, TensorBoard."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import UsageError


class MetricsLog:
    """``log(record)`` appends ``record`` (a flat dict with a ``step``) to ``<folder>/metrics.jsonl`` and sends its
    numbers to TensorBoard under ``<prefix>/<key>``.

    A resumed run redoes the steps after its checkpoint, so ``resume_step`` cuts both logs back to it: the JSONL
    file loses its records after that step (a torn last line, from a kill mid-write, is dropped with a warning) and
    TensorBoard purges its events after it (``purge_step``), so each reads as one uninterrupted run."""

    def __init__(self, folder: str | os.PathLike, *, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(folder) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it pulls in tensorboard

            purge = None if resume_step is None else resume_step + 1  # events at later steps will be redone
            self.writer = SummaryWriter(str(Path(folder) / "tensorboard"), purge_step=purge)

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
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(folder: str | os.PathLike, kind: str | None = "train") -> list[dict]:
    """The records of ``<folder>/metrics.jsonl`` (only those of ``kind`` unless ``kind`` is None)."""
    path = Path(folder) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in records if kind is None or r.get("kind") == kind]

"""Metrics to a JSONL file (one record per line, floats written exactly) and, optionally, TensorBoard."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    """``log(record)`` appends ``record`` (a flat dict with a ``step``) to ``<folder>/metrics.jsonl`` and sends its
    numbers to TensorBoard under ``<prefix>/<key>``. ``truncate_after(step)`` drops records logged after a
    checkpoint that a resumed run will redo, so the file reads as one uninterrupted run."""

    def __init__(self, folder: str | os.PathLike, *, tensorboard: bool = True):
        self.path = Path(folder) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it pulls in tensorboard

            self.writer = SummaryWriter(str(Path(folder) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
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

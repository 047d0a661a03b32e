"""Learning-rate schedule: linear warm-up, then cosine to zero (docs/design.md section 2)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): ``(step + 1) / warmup`` during warm-up, then cosine
    from 1 at ``warmup`` to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets each param group's ``lr`` to ``group["initial_lr"] * warmup_cosine(step)``; ``step()`` advances.
    Its state is just the step, so it checkpoints trivially."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup: int, total: int):
        self.optimizer, self.warmup, self.total, self.step_count = optimizer, warmup, total, 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._apply()

    def _apply(self) -> None:
        factor = warmup_cosine(self.step_count, warmup=self.warmup, total=self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def last_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "warmup": self.warmup, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self._apply()

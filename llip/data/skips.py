"""Skipped samples: counted by reason, and each one named in a warning (rate-limited) with where it came from.

A dataset (in whatever loader worker it runs) records ``skip(where, reason)``; the collate function hands the
counts since the previous batch to the trainer with each batch, which sums them over ranks into the run's total
(``metrics.jsonl``, TensorBoard, checkpoints, the final summary).
"""

from __future__ import annotations

import sys
from collections import Counter

WARN_FIRST = 20  # skips named one by one, per loader process
WARN_EVERY = 1000  # after that, one line per this many


class SkipLog:
    """``skip(where, reason)`` counts a skipped sample and warns about it on stderr: the first ``WARN_FIRST`` one by
    one, then every ``WARN_EVERY``-th with the running count, so a bad shard cannot flood the terminal."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def skip(self, where: str, reason: str) -> None:
        self.counts[reason] += 1
        n = self.total
        if n <= WARN_FIRST or n % WARN_EVERY == 0:
            more = f" ({n} skipped so far here)" if n > 1 else ""
            print(f"llip: warning: skipped {where}: {reason}{more}", file=sys.stderr, flush=True)
            if n == WARN_FIRST:
                print(
                    f"llip: warning: further skips are counted and named every {WARN_EVERY}th",
                    file=sys.stderr,
                    flush=True,
                )

    def take(self) -> dict[str, int]:
        """The counts by reason since the previous call."""
        delta = self.counts - self._reported
        self._reported = Counter(self.counts)
        return dict(delta)


def describe(counts: dict[str, int]) -> str:
    """``{"empty caption": 3, "image does not decode": 1}`` -> ``"3 empty caption, 1 image does not decode"``."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

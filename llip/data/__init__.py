"""Training and evaluation data: the built-in scenes, webdataset tar shards, CSV/TSV files.

:func:`build_train_loader` turns a ``--data`` string into an endless iterator of batches
``{"images" [B,3,S,S] float32, "tokens" [B,L] int64, "skipped": int, "skip_reasons": {reason: n}}`` for one rank,
starting at a given step (a stream of tar shards with no readable sample ends with an ``{"end": True, ...}`` item
carrying the final skip counts instead).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from . import builtin
from .datasets import BuiltinDataset, Collate, CsvDataset, StepSampler
from .webdata import BatchedWebDataset, WebDataset

__all__ = ["TrainData", "build_train_loader", "builtin", "data_kind"]


def data_kind(source: str) -> str:
    """``builtin``, ``csv`` (``.csv``/``.tsv``) or ``wds`` (``.tar`` shards, brace patterns allowed)."""
    if source == "builtin":
        return "builtin"
    lowered = source.lower()
    if lowered.endswith((".csv", ".tsv", ".tab")):
        return "csv"
    if ".tar" in lowered:
        return "wds"
    raise UsageError(
        f"--data {source!r}: expected 'builtin', a .csv/.tsv file or .tar shards ('shards/{{000..009}}.tar')"
    )


@dataclass
class TrainData:
    batches: Iterator[dict]
    description: str
    length: int | None  # samples per epoch, when known (map-style data)
    dropped: dict[str, int] = field(default_factory=dict)  # rows left out when the data was read, by reason


def build_train_loader(
    source: str,
    *,
    image_size: int,
    transform: Callable,
    tokenizer: Callable,
    global_batch: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    start_step: int = 0,
    workers: int = 0,
    builtin_length: int = 100_000,
    stream_places: dict | None = None,
) -> TrainData:
    """This rank's batches for steps ``start_step, start_step + 1, ...``: ``global_batch / world`` samples each.

    Map-style data (builtin, CSV) is indexed by step, so a resumed run sees exactly the batches it would have.
    Tar shards are a stream: ``stream_places`` (``{"workers": n, "places": {logical worker: (epoch, popped)}}``, what
    the trainer saved for this rank) makes the workers read forward to those places without decoding; without it
    (or with another number of workers), resuming replays and discards the first ``start_step`` batches of this rank.
    """
    if global_batch % world:
        raise UsageError(f"--batch-size {global_batch} must be divisible by the world size {world}")
    local = global_batch // world
    kind = data_kind(source)
    loader_kw = dict(num_workers=workers, persistent_workers=False)
    if workers > 0:
        loader_kw["prefetch_factor"] = 4
    if kind in ("builtin", "csv"):
        if kind == "builtin":
            dataset = BuiltinDataset(image_size, transform, length=builtin_length, seed=seed)
            description = f"built-in scenes ({builtin_length} train)"
        else:
            dataset = CsvDataset(source, transform, seed=seed)
            description = f"{source} ({len(dataset)} rows)"
        sampler = StepSampler(len(dataset), global_batch, seed=seed, rank=rank, world=world, start_step=start_step)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=Collate(tokenizer, dataset), **loader_kw
        )
        return TrainData(iter(loader), description, len(dataset), dict(getattr(dataset, "dropped", {})))
    n_workers = max(workers, 1)
    exact = bool(start_step) and stream_places is not None and stream_places.get("workers") == n_workers
    resume = None
    if exact:  # the loader starts with worker 0: rotate so that it plays the worker whose turn step start_step is
        resume = {
            "offset": start_step % n_workers,
            "states": {int(w): tuple(p) for w, p in stream_places["places"].items()},
        }
    stream = WebDataset(source, transform, seed=seed, rank=rank, world=world, resume=resume)
    loader = torch.utils.data.DataLoader(
        BatchedWebDataset(stream, local, Collate(tokenizer, stream)), batch_size=None, **loader_kw
    )
    batches = iter(loader)
    if start_step and not exact:
        batches = itertools.islice(batches, start_step, None)
    return TrainData(batches, f"{len(stream.urls)} tar shard(s) from {source}", None)

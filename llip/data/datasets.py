"""Map-style training data (built-in scenes, CSV/TSV of image paths) and the step-indexed sampler.

Exact resume rests on one property: the samples of training step ``s`` are a pure function of
``(seed, s, rank, world)``. :class:`StepSampler` maps step ``s`` to global sample positions
``[s * global_batch, (s + 1) * global_batch)``, each position to ``(epoch, index)`` through a per-epoch seeded
permutation, and gives rank ``r`` its slice. Datasets take ``(epoch, index)`` keys and seed any randomness
(augmentation, caption choice) from them, so neither worker count nor a resume changes a batch.
"""

from __future__ import annotations

import csv
import hashlib
import operator
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from . import builtin
from .skips import SkipLog, describe

Key = tuple[int, int]  # (epoch, index)


class StepSampler(torch.utils.data.Sampler):
    """Yields, for steps ``start_step, start_step + 1, ...`` (forever, or up to ``end_step``), this rank's list of
    ``(epoch, index)`` keys. Epoch ``e`` visits ``range(length)`` in the order ``permutation(seed, e)``."""

    def __init__(
        self,
        length: int,
        global_batch: int,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start_step: int = 0,
        end_step: int | None = None,
        shuffle: bool = True,
    ):
        if length <= 0:
            raise ValueError("the dataset is empty")
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world}")
        self.length, self.global_batch, self.seed = length, global_batch, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.start_step, self.end_step = start_step, end_step
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            order = (
                np.random.default_rng([self.seed, epoch, 0x5A3]).permutation(self.length)
                if self.shuffle
                else np.arange(self.length)
            )
            self._perm = (epoch, order)
        return self._perm[1]

    def keys_for_step(self, step: int) -> list[Key]:
        local = self.global_batch // self.world
        first = step * self.global_batch + self.rank * local
        keys = []
        for p in range(first, first + local):
            epoch, pos = divmod(p, self.length)
            keys.append((epoch, int(self._order(epoch)[pos])))
        return keys

    def __iter__(self) -> Iterator[list[Key]]:
        step = self.start_step
        while self.end_step is None or step < self.end_step:
            yield self.keys_for_step(step)
            step += 1

    def __len__(self) -> int:
        if self.end_step is None:
            raise TypeError("an endless StepSampler has no length")
        return max(0, self.end_step - self.start_step)


def sample_seed(*parts: int | str) -> int:
    """A seed in ``[0, 2**63)`` for one sample from ints and strings, e.g. ``(seed, epoch, index)`` or
    ``(seed, epoch, tar key)``: a blake2b hash of the parts, so different samples get unrelated seeds, and the same
    in every process, platform and Python version (about 1 us)."""
    text = repr([p if isinstance(p, str) else operator.index(p) for p in parts])  # numpy ints repr as plain ints
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def seeded_call(fn: Callable, x, seed_parts: tuple[int | str, ...]):
    """``fn(x)`` with its randomness seeded from ``sample_seed(*seed_parts)``, so random augmentations depend on the
    sample, not on the process that happens to load it or on where a run resumed.

    A transform with a true ``takes_generator`` attribute (:class:`~llip.transforms.ImageTransform`) is called as
    ``fn(x, generator=g)`` with a new CPU ``torch.Generator`` seeded for the sample, and draws from nothing else: no
    global RNG is touched. Any other callable runs with the global torch (CPU), numpy and python RNGs seeded for the
    sample, each restored afterwards: saving and restoring numpy's state alone costs about 70 us a call, half of what
    reading, decoding and transforming a 64 px PNG sample takes, hence the generator path for our own transform."""
    seed = sample_seed(*seed_parts)
    if getattr(fn, "takes_generator", False):
        return fn(x, generator=torch.Generator().manual_seed(seed))
    # The CPU generator only (what transforms draw from): torch.manual_seed would also seed every GPU's generator,
    # which is not restored here, and costs 1.6 ms a call.
    torch_state, py_state, np_state = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        return fn(x)
    finally:
        torch.default_generator.set_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class BuiltinDataset(torch.utils.data.Dataset):
    """Built-in scenes ``0 .. length-1`` of a split; ``dataset[(epoch, n)] -> (image [3,S,S] float32, caption)``.
    The caption is one of the scene's captions, chosen by ``(seed, epoch, n)``."""

    def __init__(
        self, image_size: int, transform: Callable, *, length: int = 100_000, split: str = "train", seed: int = 0
    ):
        self.image_size, self.transform, self.length, self.split, self.seed = image_size, transform, length, split, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: Key):
        epoch, n = key
        scene = builtin.make_scene(self.split, n)
        caption = scene.captions[builtin.caption_choice(self.seed, epoch, n, len(scene.captions))]
        image = builtin.render(scene, self.image_size)
        return seeded_call(self.transform, image, (self.seed, epoch, n)), caption


class CsvDataset(torch.utils.data.Dataset):
    """Rows of (image path, caption) from a CSV (``,``) or TSV (``\\t``, by extension) file with a header.

    Column names default to the first of ``filepath/image/image_path/path`` and ``caption/title/text`` found in
    the header. Relative image paths are relative to the file's folder. Rows without an image path or with an empty
    (or whitespace-only) caption are dropped when the file is read and counted in ``dropped``. An unreadable image
    is skipped: the next row (cyclically) is used instead, so batches keep their size, and the skip is named in a
    warning and counted (:class:`~llip.data.skips.SkipLog`)."""

    IMAGE_KEYS = ("filepath", "image", "image_path", "path", "file")
    CAPTION_KEYS = ("caption", "title", "text")
    PROBE_ROWS = 64  # rows whose image files are checked up front: all missing means a wrong image root

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Callable,
        *,
        seed: int = 0,
        image_key: str | None = None,
        caption_key: str | None = None,
        max_skip: int = 64,
    ):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"CSV/TSV data file not found: {path}")
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        self.dropped: Counter[str] = Counter()
        rows, line_numbers = [], []
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            image_key = image_key or next((k for k in self.IMAGE_KEYS if k in header), None)
            caption_key = caption_key or next((k for k in self.CAPTION_KEYS if k in header), None)
            if image_key not in header or caption_key not in header:
                raise DataError(
                    f"{path}: need an image column (one of {self.IMAGE_KEYS}) and a caption column (one of "
                    f"{self.CAPTION_KEYS}) in the header; found {header}"
                )
            for r in reader:
                image, caption = (r.get(image_key) or "").strip(), (r.get(caption_key) or "").strip()
                if not image:
                    self.dropped["rows without an image path"] += 1
                elif not caption:
                    self.dropped["rows with an empty caption"] += 1
                else:
                    rows.append((image, caption))
                    line_numbers.append(reader.line_num)
        if not rows:
            raise DataError(
                f"{path}: no (image, caption) rows" + (f" ({describe(self.dropped)})" if self.dropped else "")
            )
        self.path, self.root, self.rows, self.line_numbers = path, path.parent, rows, line_numbers
        self.transform, self.seed, self.max_skip = transform, seed, max_skip
        self._check_image_root()
        self.skips = SkipLog()  # per process; the collate function reports its counts with each batch

    def _check_image_root(self) -> None:
        probe = self.rows[: self.PROBE_ROWS]
        if not any((self.root / image).is_file() for image, _ in probe):
            raise DataError(
                f"{self.path}: none of the first {len(probe)} rows' images exist (e.g. {self.root / probe[0][0]}); "
                f"image paths are read relative to {self.root}"
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Key):
        epoch, n = key
        attempts = min(self.max_skip, len(self.rows))
        for attempt in range(attempts):
            i = (n + attempt) % len(self.rows)
            image_path, caption = self.rows[i]
            try:
                with Image.open(self.root / image_path) as im:
                    image = im.convert("RGB")
            except FileNotFoundError:
                self.skips.skip(f"{self.path.name} line {self.line_numbers[i]} ({image_path})", "image not found")
                continue
            except Exception as e:  # noqa: BLE001 - any decoding failure means "skip this sample"
                reason = f"image does not decode ({type(e).__name__})"
                self.skips.skip(f"{self.path.name} line {self.line_numbers[i]} ({image_path})", reason)
                continue
            return seeded_call(self.transform, image, (self.seed, epoch, i)), caption
        raise DataError(
            f"{self.path}: {attempts} consecutive rows from line {self.line_numbers[n % len(self.rows)]} have no "
            f"readable image ({describe(self.skips.counts)} so far); are the image files under {self.root}?"
        )


class Collate:
    """Stacks images, tokenizes captions -> ``{"images" [B,3,S,S], "tokens" [B,L], "skipped": int,
    "skip_reasons": {reason: n}}``: the samples the dataset (in this worker) skipped since its previous batch."""

    def __init__(self, tokenizer: Callable, dataset=None):
        self.tokenizer, self.dataset = tokenizer, dataset

    def skip_counts(self) -> dict:
        skips = getattr(self.dataset, "skips", None)
        reasons = skips.take() if skips is not None else {}
        return {"skipped": sum(reasons.values()), "skip_reasons": reasons}

    def __call__(self, samples):
        images = torch.stack([s[0] for s in samples])
        tokens = self.tokenizer([s[1] for s in samples])
        return {"images": images, "tokens": tokens, **self.skip_counts()}

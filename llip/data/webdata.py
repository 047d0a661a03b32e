"""Webdataset-format tar shards: ``key.jpg|png|webp`` + ``key.txt`` per sample, read with the standard library.

Shards are brace-expanded (``shards/{000..009}.tar``), shuffled per epoch, split across ranks then loader
workers, read sequentially and shuffled again through a buffer; all orders are seeded by ``(seed, epoch,
rank, worker)``. A sample whose image does not decode, or that lacks an image or a non-empty caption, is skipped;
an unreadable shard too; each is named in a warning and counted (:class:`~llip.data.skips.SkipLog`). The stream
repeats epochs forever; the trainer decides when to stop. A stream with no readable sample at all ends, and its
last item tells the trainer how many samples were skipped and why.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image

from ..errors import DataError
from .datasets import seeded_call
from .skips import SkipLog

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt",)


def expand_shards(spec: str) -> list[str]:
    """Brace-expand ``spec`` (also ``::``-separated lists) into existing shard paths; a clear error otherwise."""
    urls = [u for part in spec.split("::") for u in braceexpand(part)]
    missing = [u for u in urls if not os.path.isfile(u)]
    if not urls:
        raise DataError(f"no shards in {spec!r}")
    if missing:
        raise DataError(f"{len(missing)} of {len(urls)} shards not found, e.g. {missing[0]!r} (from {spec!r})")
    return urls


def _group(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive tar members sharing a key (the path up to the first dot of the file name) form a sample."""
    key, files = None, {}
    for member in tar:
        if not member.isfile():
            continue
        folder, name = os.path.split(member.name)
        if "." not in name:
            continue
        stem, ext = name.split(".", 1)
        this = os.path.join(folder, stem)
        if this != key and files:
            yield key, files
            files = {}
        key = this
        files[ext.lower()] = tar.extractfile(member).read()
    if files:
        yield key, files


class WebDataset(torch.utils.data.IterableDataset):
    """``for image, caption in WebDataset(...)`` over this rank's and worker's shards, forever.
    ``skips`` counts the corrupt samples and unreadable shards this process (or worker) passed over."""

    def __init__(
        self,
        spec: str,
        transform: Callable,
        *,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        shuffle_buffer: int = 1000,
    ):
        self.urls = expand_shards(spec)
        self.transform, self.seed, self.rank, self.world = transform, seed, rank, world
        self.shuffle_buffer = shuffle_buffer
        self.skips = SkipLog()

    def _my_shards(self, epoch: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch, 0x7A2]).permutation(len(self.urls))
        urls = [self.urls[i] for i in order]
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        # Fewer shards than consumers: every consumer reads all shards and keeps every n-th sample instead.
        consumers, me = self.world * nw, self.rank * nw + wid
        if len(urls) >= consumers:
            return urls[me::consumers]
        return urls

    def _samples(self, epoch: int) -> Iterator[tuple[torch.Tensor, str]]:
        info = torch.utils.data.get_worker_info()
        nw = info.num_workers if info else 1
        consumers, me = self.world * nw, self.rank * nw + (info.id if info else 0)
        strided = len(self.urls) < consumers
        count = 0
        for url in self._my_shards(epoch):
            try:
                with tarfile.open(url) as tar:
                    for key, files in _group(tar):
                        count += 1
                        if strided and count % consumers != me:
                            continue
                        sample = self._decode(key, files, epoch)
                        if isinstance(sample, str):
                            self.skips.skip(f"{url}:{key}", sample)
                        else:
                            yield sample
            except (tarfile.TarError, OSError) as e:
                self.skips.skip(url, f"unreadable shard ({type(e).__name__}: {e})")

    def _decode(self, key: str, files: dict[str, bytes], epoch: int):
        """``(image, caption)``, or why the sample is skipped (a string)."""
        img_ext = next((e for e in IMAGE_EXTS if e in files), None)
        txt_ext = next((e for e in CAPTION_EXTS if e in files), None)
        if img_ext is None:
            return f"no image ({'/'.join(IMAGE_EXTS)}) among {sorted(files)}"
        if txt_ext is None:
            return f"no caption (.txt) among {sorted(files)}"
        try:
            caption = files[txt_ext].decode("utf-8").strip()
        except UnicodeDecodeError:
            return "caption is not UTF-8"
        if not caption:
            return "empty caption"
        try:
            with Image.open(io.BytesIO(files[img_ext])) as im:
                image = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decoding failure means "skip this sample"
            return f"image does not decode ({type(e).__name__})"
        key_seed = int.from_bytes(key.encode()[-8:].rjust(8, b"\0"), "little")
        return seeded_call(self.transform, image, (self.seed, epoch, key_seed)), caption

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch, self.rank, wid, 0xB0F])
            buffer: list = []
            produced = 0
            for sample in self._samples(epoch):
                produced += 1
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                i = int(rng.integers(len(buffer)))
                buffer[i], sample = sample, buffer[i]
                yield sample
            rng.shuffle(buffer)
            yield from buffer
            if produced == 0:
                return  # nothing readable here; the trainer reports an exhausted stream as an error
            epoch += 1


class BatchedWebDataset(torch.utils.data.IterableDataset):
    """Batches of ``batch_size`` from a :class:`WebDataset`, collated in the worker (so decoding, transforms and
    tokenization all run in parallel); each batch carries how many samples this worker skipped since its last.
    If the stream ends (it had no readable sample), a last ``{"end": True, "skipped": n, "skip_reasons": ...}``
    item hands the trainer this worker's final counts for its error message."""

    def __init__(self, dataset: WebDataset, batch_size: int, collate: Callable):
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate

    def __iter__(self):
        batch = []
        for sample in self.dataset:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
        yield {"end": True, **self.collate.skip_counts()}

"""Webdataset-format tar shards: ``key.jpg|png|webp`` + ``key.txt`` (or ``key.json`` with a ``caption`` or
``text`` string) per sample, read as a stream (:mod:`~llip.data.tarstream`).

Shards are local paths or ``pipe:COMMAND`` URLs (the command writes the tar to stdout: ``pipe:curl -s URL``,
``pipe:aws s3 cp s3://bucket/shard.tar -``), brace-expanded (``shards/{000..009}.tar``) and ``::``-joined. They
are shuffled per epoch, split across ranks then loader workers, read sequentially and shuffled again through a
buffer; all orders are seeded by ``(seed, epoch, rank, worker)``, and a sample's augmentation by ``(seed, epoch,
key)`` (:func:`~llip.data.datasets.seeded_call`), whichever worker reads it. A sample whose image does not decode,
or that lacks an image or a non-empty caption, is skipped; an unreadable shard too; each is named in a warning and
counted (:class:`~llip.data.skips.SkipLog`). The stream repeats epochs forever; the trainer decides when to stop.
A stream with no readable sample at all ends, and its last item tells the trainer how many samples were skipped
and why.

Resumable position. The shuffle buffer holds raw samples (bytes) and a sample is decoded when it leaves the
buffer, so a worker's place in its stream is two numbers, ``(epoch, popped)``: the epoch and how many samples left
its buffer in it. Every batch carries its worker's place after it; the trainer saves the places of the batches it
consumed with each checkpoint, and a resumed run's workers read forward to them without decoding anything (each
epoch starts with an empty buffer, so earlier epochs are not read at all).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image

from ..errors import DataError
from .datasets import seeded_call
from .skips import SkipLog
from .tarstream import tar_members

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "json")
JSON_CAPTION_KEYS = ("caption", "text")
PIPE = "pipe:"


def expand_shards(spec: str) -> list[str]:
    """Brace-expand ``spec`` (also ``::``-separated lists) into shard URLs: local files that exist, or ``pipe:``
    commands (run when read); a clear error otherwise."""
    urls = [u for part in spec.split("::") for u in braceexpand(part)]
    if not urls:
        raise DataError(f"no shards in {spec!r}")
    remote = [u for u in urls if "://" in u and not u.startswith(PIPE)]
    if remote:
        raise DataError(f"{remote[0]!r}: read remote shards through a command, e.g. 'pipe:curl -s -L {remote[0]}'")
    missing = [u for u in urls if not u.startswith(PIPE) and not os.path.isfile(u)]
    if missing:
        raise DataError(f"{len(missing)} of {len(urls)} shards not found, e.g. {missing[0]!r} (from {spec!r})")
    return urls


@contextlib.contextmanager
def open_shard(url: str) -> Iterator[Iterator[tuple[str, bytes]]]:
    """The ``(member name, payload)`` of each file of the tar stream ``url`` (:func:`~llip.data.tarstream.tar_members`):
    a local file, or the standard output of a ``pipe:`` command. A command that exits with an error after its stream
    was read to the end raises OSError with its last stderr line."""
    if not url.startswith(PIPE):
        with open(url, "rb") as f:
            yield tar_members(f)
        return
    proc = subprocess.Popen(url[len(PIPE) :], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finished, error = False, None
    try:
        yield tar_members(proc.stdout)
        while proc.stdout.read(1 << 16):
            pass  # the zero blocks after the archive: a command writing them to a closed pipe would fail
        finished = True
    except tarfile.TarError as e:
        error = e  # reported below, after the command's own status (a failed command explains a broken stream)
    finally:
        if not finished and error is None:
            proc.kill()  # the reader stopped early (the run ended): do not wait for the rest of the stream
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace").strip().splitlines()
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise OSError(f"command exited with status {code}" + (f": {err[-1]}" if err else "")) from error
    if error is not None:
        raise error


def _group(members: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive files sharing a key (the path up to the first dot of the file name) form a sample."""
    key, files = None, {}
    for name, payload in members:
        folder, name = os.path.split(name)
        if "." not in name:
            continue
        stem, ext = name.split(".", 1)
        this = os.path.join(folder, stem)
        if this != key and files:
            yield key, files
            files = {}
        key = this
        files[ext.lower()] = payload
    if files:
        yield key, files


class WebDataset(torch.utils.data.IterableDataset):
    """``for image, caption, place in WebDataset(...)`` over this rank's and worker's shards, forever (``place``: the
    worker's ``(epoch, popped)`` after this sample, see the module docstring). ``skips`` counts the corrupt samples
    and unreadable shards this process (or worker) passed over. ``resume``: continue from saved places."""

    def __init__(
        self,
        spec: str,
        transform: Callable,
        *,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        shuffle_buffer: int = 1000,
        resume: dict | None = None,
    ):
        self.urls = expand_shards(spec)
        self.transform, self.seed, self.rank, self.world = transform, seed, rank, world
        self.shuffle_buffer = shuffle_buffer
        self.resume = resume  # {"offset": int, "states": {logical worker: (epoch, popped)}}, see _consumer
        self.skips = SkipLog()

    def _consumer(self) -> tuple[int, int]:
        """``(this worker's logical id, workers)``. A resumed run rotates the ids by ``resume["offset"]`` so that its
        first batch comes from the worker whose turn it was (the loader starts with worker 0)."""
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        offset = self.resume["offset"] if self.resume else 0
        return (wid + offset) % nw, nw

    def _my_shards(self, epoch: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch, 0x7A2]).permutation(len(self.urls))
        urls = [self.urls[i] for i in order]
        wid, nw = self._consumer()
        # Fewer shards than consumers: every consumer reads all shards and keeps every n-th sample instead.
        consumers, me = self.world * nw, self.rank * nw + wid
        if len(urls) >= consumers:
            return urls[me::consumers]
        return urls

    def _raw_samples(self, epoch: int) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """``(shard url, key, {extension: bytes})`` of this consumer's samples in epoch ``epoch``, undecoded."""
        wid, nw = self._consumer()
        consumers, me = self.world * nw, self.rank * nw + wid
        strided = len(self.urls) < consumers
        count = 0
        for url in self._my_shards(epoch):
            try:
                with open_shard(url) as members:
                    for key, files in _group(members):
                        count += 1
                        if strided and count % consumers != me:
                            continue
                        yield url, key, files
            except (tarfile.TarError, OSError) as e:
                self.skips.skip(url, f"unreadable shard ({type(e).__name__}: {e})")

    def _decode(self, key: str, files: dict[str, bytes], epoch: int):
        """``(image, caption)``, or why the sample is skipped (a string)."""
        img_ext = next((e for e in IMAGE_EXTS if e in files), None)
        txt_ext = next((e for e in CAPTION_EXTS if e in files), None)
        if img_ext is None:
            return f"no image ({'/'.join(IMAGE_EXTS)}) among {sorted(files)}"
        if txt_ext is None:
            return f"no caption (.txt or .json) among {sorted(files)}"
        try:
            caption = files[txt_ext].decode("utf-8")
        except UnicodeDecodeError:
            return "caption is not UTF-8"
        if txt_ext == "json":
            caption = _json_caption(caption)
            if caption is None:
                return f"the .json has no {' or '.join(repr(k) for k in JSON_CAPTION_KEYS)} string"
        caption = caption.strip()
        if not caption:
            return "empty caption"
        try:
            with Image.open(io.BytesIO(files[img_ext])) as im:
                image = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decoding failure means "skip this sample"
            return f"image does not decode ({type(e).__name__})"
        return seeded_call(self.transform, image, (self.seed, epoch, key)), caption

    def one_pass(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, str]]:
        """``(image, caption)`` of every readable sample of this consumer's shards once, in file order (no shuffle
        buffer): what an evaluation reads. Iterating the dataset itself repeats epochs forever."""
        for url, key, files in self._raw_samples(epoch):
            sample = self._decoded(url, key, files, epoch)
            if sample is not None:
                yield sample

    def _decoded(self, url: str, key: str, files: dict[str, bytes], epoch: int):
        """``(image, caption)``, or None for a sample that is skipped (and counted, with its shard and key)."""
        sample = self._decode(key, files, epoch)
        if isinstance(sample, str):
            self.skips.skip(f"{url}:{key}", sample)
            return None
        return sample

    def _popped(self, epoch: int) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """The raw samples of ``epoch`` in the order they leave the shuffle buffer."""
        wid, _ = self._consumer()
        rng = np.random.default_rng([self.seed, epoch, self.rank, wid, 0xB0F])
        buffer: list = []
        for raw in self._raw_samples(epoch):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(raw)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], raw = raw, buffer[i]
            yield raw
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        """``(image, caption, (epoch, popped))`` forever (``popped``: raw samples that left the buffer so far in
        this epoch, this one included)."""
        wid, _ = self._consumer()
        epoch, skip = 0, 0
        if self.resume:
            epoch, skip = self.resume["states"].get(wid, (0, 0))
        while True:
            good = 0
            for popped, (url, key, files) in enumerate(self._popped(epoch), 1):
                if popped <= skip:
                    continue  # before the resumed place: read, not decoded
                sample = self._decoded(url, key, files, epoch)
                if sample is not None:
                    good += 1
                    yield (*sample, (epoch, popped))
            if good == 0 and skip == 0:
                return  # a whole epoch without a readable sample: the trainer reports the exhausted stream
            epoch, skip = epoch + 1, 0


def _json_caption(text: str) -> str | None:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(meta, dict):
        return None
    return next((meta[k] for k in JSON_CAPTION_KEYS if isinstance(meta.get(k), str)), None)


class BatchedWebDataset(torch.utils.data.IterableDataset):
    """Batches of ``batch_size`` from a :class:`WebDataset`, collated in the worker (so decoding, transforms and
    tokenization all run in parallel); each batch carries how many samples this worker skipped since its last, and
    ``stream_place``: ``(logical worker, epoch, popped)`` after its last sample (what a resumed run continues from).
    If the stream ends (it had no readable sample), a last ``{"end": True, "skipped": n, "skip_reasons": ...}``
    item hands the trainer this worker's final counts for its error message."""

    def __init__(self, dataset: WebDataset, batch_size: int, collate: Callable):
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate

    def __iter__(self):
        wid, _ = self.dataset._consumer()  # this worker's logical id, fixed for the life of the iterator
        batch = []
        for image, caption, place in self.dataset:
            batch.append((image, caption))
            if len(batch) == self.batch_size:
                yield {**self.collate(batch), "stream_place": (wid, *place)}
                batch = []
        yield {"end": True, **self.collate.skip_counts()}

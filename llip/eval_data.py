"""Evaluation data the user brings: an image-folder tree for zero-shot classification, held-out image-text pairs
(a CSV/TSV file or tar shards) for retrieval, and the shipped ImageNet class names and CLIP prompt templates.

Every check that can refuse the input runs before any image is decoded and raises a :class:`UsageError` naming the
argument (``--zeroshot``, ``--classnames``, ...) and what was expected. An image that does not decode is skipped,
named in a warning and counted (:class:`~llip.data.skips.SkipLog`), never fatal, unless no image at all is readable.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .data import data_kind
from .data.skips import SkipLog, describe
from .errors import DataError, UsageError

ASSETS = Path(__file__).parent / "assets"
# torchvision's ImageFolder extensions, so a tree it reads is read the same way here
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SIMPLE_TEMPLATE = "a photo of a {}."
IMAGENET_CLASSES = 1000
SYNSET_ID = re.compile(r"^n\d{8}$")  # ImageNet folder names: n01440764 ...


def shipped_list(name: str) -> list[str]:
    """The lines of ``llip/assets/<name>.txt``: ``imagenet_classnames`` (1000, in class-index order) or
    ``imagenet_templates`` (the 80 CLIP prompts, ``{}`` standing for the class name)."""
    return (ASSETS / f"{name}.txt").read_text(encoding="utf-8").splitlines()


# ------------------------------------------------------------------------------------------- image folders
@dataclass
class ImageFolder:
    """``root/<class folder>/**/<image file>``, read as torchvision's ImageFolder reads it: classes are the
    sub-folder names sorted, images each class folder's files with an image extension (recursively, sorted)."""

    root: Path
    classes: list[str]  # folder names, sorted; index = label
    samples: list[tuple[Path, int]]  # (image file, label)

    def empty_classes(self) -> list[str]:
        used = {label for _, label in self.samples}
        return [c for i, c in enumerate(self.classes) if i not in used]


def scan_image_folder(root: str | os.PathLike, what: str = "--zeroshot") -> ImageFolder:
    """List ``root``'s classes and image files; a :class:`UsageError` naming ``what`` when it is not such a tree."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{what} {root}: {'not a folder' if root.exists() else 'no such folder'}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise UsageError(f"{what} {root}: no class folders in it; expected {root}/<class name>/<image files>")
    samples = []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            samples += [(Path(folder) / f, label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        raise UsageError(
            f"{what} {root}: its {len(classes)} class folders hold no image files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return ImageFolder(root, classes, samples)


def class_names(folder: ImageFolder, spec: str | None, what: str = "--classnames") -> list[str]:
    """The class names, in label order: ``None``: the folder names with ``_`` read as spaces; ``"imagenet"``: the
    shipped ImageNet-1k names (the tree must have its 1000 synset-id folders); else a file of one name per line
    in sorted-folder order."""
    n = len(folder.classes)
    if spec is None:
        return [c.replace("_", " ") for c in folder.classes]
    if spec == "imagenet":
        if n != IMAGENET_CLASSES:
            raise UsageError(
                f"{what} imagenet: needs the {IMAGENET_CLASSES} ImageNet-1k class folders (n01440764 ... n15075141), "
                f"{folder.root} has {n}; give a file of {n} names instead"
            )
        if not all(SYNSET_ID.match(c) for c in folder.classes):
            print(
                f"llip: warning: {what} imagenet: the folders of {folder.root} are not all named by synset id "
                f"(n01440764 ...); their sorted order is taken as ImageNet's class order",
                file=sys.stderr,
            )
        return shipped_list("imagenet_classnames")
    names = _read_lines(spec, what, "class names")
    if len(names) != n:
        raise UsageError(
            f"{what} {spec}: has {len(names)} names and {folder.root} has {n} class folders; give one name per line, "
            f"in sorted folder order ({', '.join(folder.classes[:3])}{', ...' if n > 3 else ''})"
        )
    return names


def read_templates(spec: str, what: str = "--templates") -> list[str]:
    """Prompt templates, ``{}`` standing for the class name: ``imagenet`` (the 80 CLIP prompts), ``simple``
    (``"a photo of a {}."``) or a file of one template per line."""
    if spec == "imagenet":
        return shipped_list("imagenet_templates")
    if spec == "simple":
        return [SIMPLE_TEMPLATE]
    templates = _read_lines(spec, what, "templates", skip_blank=True)
    for n, template in enumerate(templates, 1):
        try:
            ok = template.count("{}") == 1 and template.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise UsageError(
                f"{what} {spec}: line {n} ({template!r}) must hold exactly one {{}} for the class name "
                f"and no other braces"
            )
    return templates


def _read_lines(path: str, what: str, kind: str, *, skip_blank: bool = False) -> list[str]:
    """The lines of a text file, stripped, trailing blank lines dropped; an error for a missing or empty file, and
    for a blank line between class names (it would shift every name after it) unless ``skip_blank``."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file (expected {kind}, one per line)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {path}: cannot read it ({type(e).__name__})") from None
    while lines and not lines[-1]:
        lines.pop()
    if skip_blank:
        lines = [line for line in lines if line]
    if not lines:
        raise UsageError(f"{what} {path}: the file is empty (expected {kind}, one per line)")
    if "" in lines:
        raise UsageError(f"{what} {path}: line {lines.index('') + 1} is blank (expected {kind}, one per line)")
    return lines


# ------------------------------------------------------------------------------------------- decoding images
class ImageFiles(torch.utils.data.Dataset):
    """``dataset[i] -> (image [3, S, S] float32 or None, label, where, why)`` for a list of ``(file, label)``: an
    unreadable file gives None and the reason instead of raising, so one bad file cannot stop an evaluation."""

    def __init__(self, items: list[tuple[Path, int]], transform: Callable, root: Path):
        self.items, self.transform, self.root = items, transform, root

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        where = os.path.relpath(path, self.root)
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except FileNotFoundError:
            return None, label, where, "image not found"
        except Exception as e:  # noqa: BLE001 - any decoding failure means "skip this image"
            return None, label, where, f"image does not decode ({type(e).__name__})"
        return self.transform(image), label, where, None


def _collate_readable(items: list) -> tuple[torch.Tensor | None, torch.Tensor, list[tuple[str, str]]]:
    """``(images [b, 3, S, S] or None when none decoded, labels [b], [(where, why) of each skipped file]])``."""
    good = [(image, label) for image, label, _, _ in items if image is not None]
    skipped = [(where, why) for image, _, where, why in items if image is None]
    images = torch.stack([image for image, _ in good]) if good else None
    return images, torch.tensor([label for _, label in good], dtype=torch.int64), skipped


def labelled_batches(
    items: list[tuple[Path, int]], transform: Callable, root: Path, skips: SkipLog, *, batch_size: int, workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images [b, 3, S, S], labels [b])`` of the readable files among ``items``, decoded by ``workers`` loader
    processes (0: here) in their order; each unreadable file is reported to ``skips`` (warned about and counted)."""
    loader = torch.utils.data.DataLoader(
        ImageFiles(items, transform, root), batch_size=batch_size, num_workers=workers, collate_fn=_collate_readable
    )
    for images, labels, skipped in loader:
        for where, why in skipped:
            skips.skip(where, why)
        if images is not None:
            yield images, labels


# ------------------------------------------------------------------------------------------- retrieval pairs
@dataclass
class RetrievalSet:
    """Held-out image-text pairs, the images held in memory (at most ``max_samples`` of them)."""

    source: str
    images: torch.Tensor  # [N, 3, S, S] float32, preprocessed
    captions: list[str]  # M captions
    caption_to_image: torch.Tensor  # [M] int64: the image each caption describes
    truncated: bool  # the source held more images than were read
    skipped: int  # unreadable images (and, for shards, samples) passed over
    dropped: dict[str, int] = field(default_factory=dict)  # CSV rows left out when the file was read, by reason


def check_retrieval_source(source: str, what: str = "--data") -> str:
    """``"csv"`` or ``"wds"``; a :class:`UsageError` when ``source`` is neither or does not exist."""
    try:
        kind = data_kind(source)
    except UsageError:
        kind = None
    if kind not in ("csv", "wds"):
        raise UsageError(
            f"{what} {source!r}: expected a .csv/.tsv file of (image path, caption) rows or .tar shards "
            f"('val/{{000..004}}.tar')"
        )
    try:
        if kind == "csv":
            _csv_rows(source)
        else:
            from .data.webdata import expand_shards

            expand_shards(source)
    except DataError as e:
        raise UsageError(f"{what}: {e}") from None
    return kind


def read_retrieval_set(
    source: str,
    transform: Callable,
    skips: SkipLog,
    *,
    max_samples: int,
    batch_size: int = 256,
    workers: int = 0,
    what: str = "--data",
) -> RetrievalSet:
    """The first ``max_samples`` images of ``source`` and their captions, less those that do not decode (warned
    about and counted in ``skips``). A CSV/TSV file: its distinct image paths in file order, each with all its rows'
    captions; tar shards: one pass, each sample an image with its caption. The images are held in memory."""
    kind = check_retrieval_source(source, what)
    skipped_before = skips.total
    if kind == "csv":
        images, captions, owners, truncated, dropped = _read_csv_pairs(
            source, transform, skips, max_samples=max_samples, batch_size=batch_size, workers=workers
        )
    else:
        images, captions, owners, truncated = _read_shard_pairs(source, transform, skips, max_samples=max_samples)
        dropped = {}
    if not images:
        why = describe(skips.counts) or "no samples"
        raise DataError(f"{what} {source}: no readable image-caption pair ({why})")
    owners = torch.tensor(owners, dtype=torch.int64)
    return RetrievalSet(source, torch.stack(images), captions, owners, truncated, skips.total - skipped_before, dropped)


def _csv_rows(source: str):
    """The parsed file (a :class:`~llip.data.datasets.CsvDataset`: header detection, rows left out, image root
    check); its transform is unused here."""
    from .data.datasets import CsvDataset

    return CsvDataset(source, transform=None)


def _read_csv_pairs(source: str, transform: Callable, skips: SkipLog, *, max_samples, batch_size, workers):
    """Distinct images in file order (a COCO-style file lists an image once per caption) and their captions."""
    table = _csv_rows(source)
    first_row: dict[str, int] = {}  # image path -> index among the distinct images
    captions_of: list[list[str]] = []
    for image, caption in table.rows:
        if image not in first_row:
            first_row[image] = len(captions_of)
            captions_of.append([])
        captions_of[first_row[image]].append(caption)
    paths = list(first_row)
    truncated = len(paths) > max_samples
    items = [(table.root / p, i) for i, p in enumerate(paths[:max_samples])]
    images, captions, owners = [], [], []
    for batch, indices in labelled_batches(items, transform, table.root, skips, batch_size=batch_size, workers=workers):
        for image, i in zip(batch, indices.tolist()):
            captions += captions_of[i]
            owners += [len(images)] * len(captions_of[i])
            images.append(image)
    return images, captions, owners, truncated, dict(table.dropped)


def _read_shard_pairs(source: str, transform: Callable, skips: SkipLog, *, max_samples: int):
    """One pass over the shards (bad samples skipped and counted by the stream), up to ``max_samples``."""
    from .data.webdata import WebDataset

    stream = WebDataset(source, transform)
    stream.skips = skips  # count this reader's skips with the evaluation's
    images, captions = [], []
    for image, caption in stream.one_pass():
        if len(images) == max_samples:
            return images, captions, list(range(len(images))), True
        images.append(image)
        captions.append(caption)
    return images, captions, list(range(len(images))), False

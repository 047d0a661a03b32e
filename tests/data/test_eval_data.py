"""Evaluation data the user brings (llip/eval_data.py): the shipped ImageNet lists, an image-folder tree read as
torchvision's ImageFolder reads it, class names and templates with their errors, and held-out retrieval pairs from
a CSV file and tar shards with unreadable samples skipped and counted."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from llip.data.skips import SkipLog
from llip.errors import DataError, UsageError
from llip.eval_data import (
    ASSETS,
    check_retrieval_source,
    class_names,
    labelled_batches,
    read_retrieval_set,
    read_templates,
    scan_image_folder,
    shipped_list,
)
from llip.eval_tasks import retrieval_chance
from llip.transforms import image_transform
from tests.shards import write_shard

S = 32
CORRUPT = b"\x89PNG\r\n\x1a\n not really a png"


def _png(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), value, dtype=np.uint8)).save(path)


def test_shipped_lists():
    names, templates = shipped_list("imagenet_classnames"), shipped_list("imagenet_templates")
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert all(n == n.strip() and n for n in names)
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}."
    assert all(t.count("{}") == 1 and t.format("dog") for t in templates)
    notice = (ASSETS / "ZERO_SHOT_DATA_LICENSE.txt").read_text()
    assert "MIT" in notice and "open_clip" in notice and "openai/CLIP" in notice


def test_image_folder_reads_like_torchvision(tmp_path):
    # Sorted folder names are the labels; files are found recursively and sorted; non-image files are ignored;
    # a class folder without images keeps its index (so --classnames lines stay aligned).
    _png(tmp_path / "zebra" / "b.png", 10)
    _png(tmp_path / "zebra" / "a.png", 20)
    _png(tmp_path / "ant_eater" / "nested" / "x.PNG", 30)
    (tmp_path / "ant_eater" / "notes.txt").write_text("not an image")
    (tmp_path / "middle").mkdir()
    (tmp_path / "stray.png").write_bytes(b"")  # a file at the top level is not a class
    folder = scan_image_folder(tmp_path)
    assert folder.classes == ["ant_eater", "middle", "zebra"]
    assert [(p.relative_to(tmp_path).as_posix(), label) for p, label in folder.samples] == [
        ("ant_eater/nested/x.PNG", 0),
        ("zebra/a.png", 2),
        ("zebra/b.png", 2),
    ]
    assert folder.empty_classes() == ["middle"]
    assert class_names(folder, None) == ["ant eater", "middle", "zebra"]  # underscores read as spaces
    names = tmp_path.parent / f"{tmp_path.name}-names.txt"
    names.write_text("anteater\nnothing\nzebra\n\n")  # trailing blank lines are fine
    assert class_names(folder, str(names)) == ["anteater", "nothing", "zebra"]


def test_image_folder_errors(tmp_path):
    with pytest.raises(UsageError, match="--zeroshot .*: no such folder"):
        scan_image_folder(tmp_path / "missing")
    with pytest.raises(UsageError, match="no class folders"):
        scan_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(UsageError, match="hold no image files"):
        scan_image_folder(tmp_path, what="--val-zeroshot")
    _png(tmp_path / "a" / "0.png", 0)
    _png(tmp_path / "b" / "0.png", 0)
    folder = scan_image_folder(tmp_path)
    three = tmp_path / "three.txt"
    three.write_text("x\ny\nz\n")
    with pytest.raises(UsageError, match="has 3 names and .* has 2 class folders"):
        class_names(folder, str(three))
    gap = tmp_path / "gap.txt"
    gap.write_text("x\n\ny\n")
    with pytest.raises(UsageError, match="line 2 is blank"):
        class_names(folder, str(gap))
    with pytest.raises(UsageError, match="--classnames .*: no such file"):
        class_names(folder, str(tmp_path / "none.txt"))
    with pytest.raises(UsageError, match="needs the 1000 ImageNet-1k class folders"):
        class_names(folder, "imagenet")


def test_imagenet_names_map_by_sorted_synset_index(tmp_path):
    synsets = [f"n{i:08d}" for i in range(1000)]
    for s in synsets:
        (tmp_path / s).mkdir()
    _png(tmp_path / synsets[0] / "0.png", 0)
    folder = scan_image_folder(tmp_path)
    names = class_names(folder, "imagenet")
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"


def test_templates(tmp_path):
    assert read_templates("simple") == ["a photo of a {}."]
    assert len(read_templates("imagenet")) == 80
    good = tmp_path / "t.txt"
    good.write_text("a {} on a table\n\nitap of a {}.\n")
    assert read_templates(str(good)) == ["a {} on a table", "itap of a {}."]
    for bad in ("no placeholder", "two {} {}", "a {0} thing", "braces {} }"):
        (tmp_path / "bad.txt").write_text(bad + "\n")
        with pytest.raises(UsageError, match="line 1 .* must hold exactly one"):
            read_templates(str(tmp_path / "bad.txt"))


def test_labelled_batches_skip_and_count_unreadable_files(tmp_path, capsys):
    for c, value in (("a", 0), ("b", 255)):
        for i in range(3):
            _png(tmp_path / c / f"{i}.png", value)
    (tmp_path / "b" / "1.png").write_bytes(CORRUPT)
    folder = scan_image_folder(tmp_path)
    skips = SkipLog()
    batches = list(
        labelled_batches(folder.samples, image_transform(S, False), tmp_path, skips, batch_size=4, workers=0)
    )
    assert [b[0].shape for b in batches] == [(4, 3, S, S), (1, 3, S, S)]
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 0, 0, 1, 1]
    assert skips.total == 1 and "skipped b/1.png: image does not decode" in capsys.readouterr().err


def _pairs_csv(tmp_path) -> str:
    """Four images, each with two captions (COCO-style rows), the third image corrupt, and a row with no caption."""
    rows = ["filepath,caption"]
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        if i == 2:
            path.write_bytes(CORRUPT)
        else:
            _png(path, 60 * i)
        rows += [f"img{i}.png,picture {i}", f"img{i}.png,another caption of {i}"]
    rows.append("img0.png,")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "pairs.csv")


def test_retrieval_pairs_from_csv(tmp_path):
    skips = SkipLog()
    pairs = read_retrieval_set(_pairs_csv(tmp_path), image_transform(S, False), skips, max_samples=100)
    assert pairs.images.shape == (3, 3, S, S) and pairs.skipped == 1 and not pairs.truncated
    assert pairs.captions == ["picture 0", "another caption of 0", "picture 1", "another caption of 1",
                              "picture 3", "another caption of 3"]  # fmt: skip
    assert pairs.caption_to_image.tolist() == [0, 0, 1, 1, 2, 2]
    assert pairs.dropped == {"rows with an empty caption": 1}
    first = read_retrieval_set(str(tmp_path / "pairs.csv"), image_transform(S, False), SkipLog(), max_samples=1)
    assert first.images.shape[0] == 1 and first.truncated and first.caption_to_image.tolist() == [0, 0]


def _png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_retrieval_pairs_from_shards_read_one_pass(tmp_path):
    for s in range(2):
        members = []
        for i in range(3):
            members += [(f"s{s}_{i}.png", CORRUPT if (s, i) == (1, 0) else _png_bytes(40 * i)),
                        (f"s{s}_{i}.txt", f"caption {s} {i}".encode())]  # fmt: skip
        write_shard(tmp_path / f"val-{s}.tar", members)
    spec = str(tmp_path / "val-{0..1}.tar")
    assert check_retrieval_source(spec) == "wds"
    pairs = read_retrieval_set(spec, image_transform(S, False), SkipLog(), max_samples=100)
    assert pairs.images.shape[0] == 5 and len(pairs.captions) == 5 and pairs.skipped == 1  # each sample once
    assert pairs.caption_to_image.tolist() == list(range(5)) and not pairs.truncated


def test_retrieval_source_errors(tmp_path):
    with pytest.raises(UsageError, match="--val-data 'builtin': expected a .csv/.tsv file"):
        check_retrieval_source("builtin", what="--val-data")
    with pytest.raises(UsageError, match="--data: CSV/TSV data file not found"):
        check_retrieval_source(str(tmp_path / "none.csv"))
    with pytest.raises(UsageError, match="shards not found"):
        check_retrieval_source(str(tmp_path / "x-{0..1}.tar"))
    (tmp_path / "bad.png").write_bytes(CORRUPT)
    (tmp_path / "all_bad.csv").write_text("filepath,caption\nbad.png,a caption\n")
    with pytest.raises(DataError, match="no readable image-caption pair \\(1 image does not decode"):
        read_retrieval_set(str(tmp_path / "all_bad.csv"), image_transform(S, False), SkipLog(), max_samples=10)


def test_retrieval_chance_on_small_sets():
    # 3 images with 2 captions each: image->text R@1 = 2/6; R@5 of 6 captions misses both own ones with
    # probability C(4, 5) / C(6, 5) = 0; R@10 counts as R@6 = 1.
    chance = retrieval_chance(torch.tensor([0, 0, 1, 1, 2, 2]), 3)
    assert chance["image_to_text_R@1"] == pytest.approx(100 * 2 / 6)
    assert chance["image_to_text_R@5"] == pytest.approx(100.0) and chance["image_to_text_R@10"] == 100.0
    assert chance["text_to_image_R@1"] == pytest.approx(100 / 3) and chance["text_to_image_R@10"] == 100.0

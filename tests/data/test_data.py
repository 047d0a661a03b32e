"""Training data: built-in scenes, the step-indexed sampler, CSV/TSV files and webdataset tar shards (with corrupt
samples), and the property exact resume rests on: a step's batch does not depend on workers or on where we start."""

from __future__ import annotations

import io
import itertools
import random

import numpy as np
import pytest
import torch
from PIL import Image

from llip.data import build_train_loader, builtin, data_kind
from llip.data.datasets import StepSampler, sample_seed, seeded_call
from llip.data.webdata import expand_shards
from llip.errors import DataError, UsageError
from llip.tokenizer import get_tokenizer
from llip.transforms import image_transform
from tests.shards import write_shard

S = 32  # llip-tiny's image size


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(context_length=32)


# ---------------------------------------------------------------- built-in scenes


def test_scene_is_a_pure_function_of_split_and_index():
    a, b = builtin.make_scene("train", 123), builtin.make_scene("train", 123)
    assert a == b
    assert np.array_equal(builtin.render(a, S), builtin.render(b, S))
    assert builtin.make_scene("val", 123) != a  # disjoint seeds per split
    with pytest.raises(ValueError, match="unknown split"):
        builtin.make_scene("test", 0)


def test_scenes_have_diverse_captions_and_valid_labels():
    for n in range(200):
        scene = builtin.make_scene("train", n)
        assert 1 <= len(scene.objects) <= builtin.MAX_OBJECTS
        assert len(set(scene.captions)) == len(scene.captions) >= 2  # several different captions per image
        assert builtin.COUNT_WORDS[len(scene.objects) - 1] in scene.captions
        big = scene.largest
        assert big is scene.objects[0] and big.large
        assert all(o.radius < big.radius for o in scene.objects[1:])  # "the largest object" is unambiguous
        labels = scene.labels()
        assert builtin.COLOUR_NAMES[labels["colour"]] == big.colour
        assert builtin.SHAPES[labels["shape"]] == big.shape
        assert labels["count"] == len(scene.objects) - 1
        image = builtin.render(scene, S)
        assert image.shape == (S, S, 3) and image.dtype == np.uint8
        # The largest object's colour is really drawn at its centre.
        cx, cy = int(big.x * S), int(big.y * S)
        assert tuple(image[cy, cx]) == builtin.COLOURS[big.colour]


def test_eval_set_layout(tokenizer):
    ev = builtin.eval_set(S, image_transform(S, train=False), tokenizer, n_images=20)
    assert ev["images"].shape == (20, 3, S, S) and ev["images"].dtype == torch.float32
    m = len(ev["captions"])
    assert ev["tokens"].shape == (m, 32) and ev["caption_to_image"].shape == (m,)
    for j in (0, m // 2, m - 1):
        assert ev["captions"][j] in builtin.make_scene("val", int(ev["caption_to_image"][j])).captions
    for task, (classes, templates) in builtin.zero_shot_tasks().items():
        assert ev["labels"][task].shape == (20,) and int(ev["labels"][task].max()) < len(classes)
        assert all("{}" in t for t in templates)


# ---------------------------------------------------------------- sampler and determinism


def test_step_sampler_partitions_the_global_batch_and_covers_each_epoch():
    n, gb = 50, 8
    one = StepSampler(n, gb, seed=3)
    two = [StepSampler(n, gb, seed=3, rank=r, world=2) for r in range(2)]
    for step in range(20):
        assert two[0].keys_for_step(step) + two[1].keys_for_step(step) == one.keys_for_step(step)
    keys = [k for s in range(20) for k in one.keys_for_step(s)]  # 160 samples: epochs 0, 1, 2 and part of 3
    for epoch in range(3):
        assert sorted(i for e, i in keys if e == epoch) == list(range(n))
    assert [k for k in keys if k[0] == 0] != [(0, i) for i in range(n)]  # shuffled
    with pytest.raises(ValueError, match="divisible"):
        StepSampler(n, 7, seed=0, world=2)


def test_seeded_call_is_deterministic_and_leaves_global_rng_alone():
    tf = image_transform(S, train=True)
    image = Image.fromarray(builtin.render(builtin.make_scene("train", 5), 48))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = seeded_call(tf, image, (1, 2, 3))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, seeded_call(tf, image, (1, 2, 3)))
    assert not torch.equal(a, seeded_call(tf, image, (1, 2, 4)))  # a different sample gets a different crop
    # The transform draws from its own generator; through the global RNGs (any other callable) the same crop.
    assert torch.equal(a, seeded_call(lambda x: tf(x), image, (1, 2, 3)))


def test_sample_seeds_are_stable_and_differ_between_samples():
    # Pinned: a resumed run must derive the same seeds as the run that saved the checkpoint.
    assert sample_seed(0, 0, 0) == 5893292994067941330
    assert sample_seed(0, 0, "s0_000") == 4838809232935587543
    assert sample_seed(np.int64(1), 2, 3) == sample_seed(1, 2, 3)  # numpy ints count as the same ints
    keys = [(s, e, i) for s in range(3) for e in range(4) for i in range(200)]
    keys += [(0, 0, f"shard-{k}/{i:06d}") for k in range(3) for i in range(50)]
    seeds = {sample_seed(*k) for k in keys}
    assert len(seeds) == len(keys) and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(0, 1) != sample_seed(0, 1, 0) and sample_seed(1, 0) != sample_seed(0, 1)
    with pytest.raises(TypeError):
        sample_seed(0, 1.5)  # a float would round: not a sample key


def test_seeded_call_seeds_and_restores_the_global_rngs_for_other_callables():
    def draw(_):
        return torch.rand(2).tolist(), np.random.rand(2).tolist(), [random.random(), random.random()]

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    a = seeded_call(draw, None, (1, 2, "key"))
    assert a == seeded_call(draw, None, (1, 2, "key")) != seeded_call(draw, None, (1, 2, "other"))
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def _batches(source, tokenizer, n, **kw):
    kw = {"image_size": S, "transform": image_transform(S, train=True), "tokenizer": tokenizer, "seed": 0, **kw}
    data = build_train_loader(source, **kw)
    return list(itertools.islice(data.batches, n))


def test_builtin_batches_do_not_depend_on_workers_or_start_step(tokenizer):
    ref = _batches("builtin", tokenizer, 3, global_batch=6, workers=0, builtin_length=10)
    other = _batches("builtin", tokenizer, 2, global_batch=6, workers=2, builtin_length=10, start_step=1)
    for a, b in zip(ref[1:], other):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])
    assert ref[0]["images"].shape == (6, 3, S, S) and ref[0]["tokens"].shape == (6, 32)
    # Rank slices: two ranks' batches concatenate to the single-process batch.
    halves = [_batches("builtin", tokenizer, 1, global_batch=6, rank=r, world=2, builtin_length=10)[0] for r in (0, 1)]
    assert torch.equal(torch.cat([h["images"] for h in halves]), ref[0]["images"])


# ---------------------------------------------------------------- real data: CSV and tar shards


def _png(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


CORRUPT = b"\x89PNG\r\n\x1a\n this is not really a png"


def test_csv_skips_a_corrupt_image_and_counts_it(tmp_path, tokenizer):
    rows = ["filepath,title"]
    for i in range(7):
        (tmp_path / f"img{i}.png").write_bytes(CORRUPT if i == 3 else _png(i))
        rows.append(f"img{i}.png,picture number {i}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    batches = _batches(str(tmp_path / "data.csv"), tokenizer, 7, global_batch=4)  # 28 samples = 4 epochs of 7
    assert all(b["images"].shape == (4, 3, S, S) for b in batches)
    assert sum(b["skipped"] for b in batches) == 4  # the corrupt row, once per epoch
    assert data_kind("x.tsv") == "csv"


def test_tsv_and_clear_errors(tmp_path, tokenizer):
    (tmp_path / "a.png").write_bytes(_png(0))
    (tmp_path / "d.tsv").write_text("image\tcaption\na.png\ta caption\n")
    assert _batches(str(tmp_path / "d.tsv"), tokenizer, 1, global_batch=2)[0]["images"].shape == (2, 3, S, S)
    with pytest.raises(DataError, match="not found"):
        _batches(str(tmp_path / "missing.csv"), tokenizer, 1, global_batch=2)
    (tmp_path / "empty.csv").write_text("filepath,caption\n")
    with pytest.raises(DataError, match="no \\(image, caption\\) rows"):
        _batches(str(tmp_path / "empty.csv"), tokenizer, 1, global_batch=2)
    (tmp_path / "bad.csv").write_text("foo,bar\nx,y\n")
    with pytest.raises(DataError, match="image column"):
        _batches(str(tmp_path / "bad.csv"), tokenizer, 1, global_batch=2)
    with pytest.raises(UsageError, match="expected 'builtin'"):
        data_kind("data.parquet")


def _shards(tmp_path):
    """Three shards of 4 samples; one corrupt image, one sample without a caption; 10 good samples."""
    n = 0
    for s in range(3):
        members = []
        for i in range(4):
            key = f"s{s}_{i:03d}"
            image = CORRUPT if (s, i) == (1, 2) else _png(n)
            ext = ("jpg", "png", "webp")[i % 3] if (s, i) != (1, 2) else "png"
            if ext != "png":
                buf = io.BytesIO()
                Image.open(io.BytesIO(image)).save(buf, format="JPEG" if ext == "jpg" else "WEBP")
                image = buf.getvalue()
            members.append((f"{key}.{ext}", image))
            if (s, i) != (2, 0):
                members.append((f"{key}.txt", f"caption {n}".encode()))
            n += 1
        write_shard(tmp_path / f"shard-{s:03d}.tar", members)
    return str(tmp_path / "shard-{000..002}.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_shards_skip_corrupt_samples(tmp_path, tokenizer, workers):
    spec = _shards(tmp_path)
    assert len(expand_shards(spec)) == 3
    # 10 good samples per epoch; batches of 5 over 2 epochs -> 4 batches; 2 skipped per epoch (shared by workers).
    data = build_train_loader(
        spec,
        image_size=S,
        transform=image_transform(S, train=True),
        tokenizer=tokenizer,
        global_batch=5,
        seed=0,
        workers=workers,
    )
    batches = list(itertools.islice(data.batches, 4 if workers == 0 else 2))
    assert all(b["images"].shape == (5, 3, S, S) for b in batches)
    if workers == 0:
        assert sum(b["skipped"] for b in batches) == 4  # 2 bad samples x 2 epochs
    else:
        assert sum(b["skipped"] for b in batches) >= 1


def test_webdataset_resume_replays_the_stream(tmp_path, tokenizer):
    spec = _shards(tmp_path)
    kw = dict(image_size=S, transform=image_transform(S, train=True), tokenizer=tokenizer, global_batch=3, seed=1)
    full = list(itertools.islice(build_train_loader(spec, **kw).batches, 3))
    resumed = list(itertools.islice(build_train_loader(spec, start_step=1, **kw).batches, 2))
    for a, b in zip(full[1:], resumed):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])


def test_webdataset_missing_or_empty_source_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match="shards not found"):
        expand_shards(str(tmp_path / "nope-{0..3}.tar"))
    write_shard(tmp_path / "empty.tar", [])
    data = build_train_loader(
        str(tmp_path / "empty.tar"),
        image_size=S,
        transform=image_transform(S, train=True),
        tokenizer=tokenizer,
        global_batch=2,
        seed=0,
    )
    end = next(data.batches)  # the stream ends at once, its last item saying that nothing was skipped either
    assert end["end"] and end["skipped"] == 0
    with pytest.raises(StopIteration):
        next(data.batches)

"""Tar-shard streams (llip/data/webdata.py): ``pipe:`` URLs, ``.json`` captions, and resuming from saved places
without decoding what came before, in the loader and in the trainer."""

from __future__ import annotations

import io
import itertools
import json

import pytest
import torch
from PIL import Image

import llip
from llip.data import build_train_loader
from llip.data import webdata as wd
from llip.data.builtin import make_scene, render
from llip.errors import DataError
from llip.train.loop import TrainConfig, train
from llip.train.metrics import read_metrics
from tests.mini import MINI
from tests.shards import write_shard

S = 16


def _png(n: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(render(make_scene("train", n), S)).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(tmp_path, shards: int = 3, per_shard: int = 7) -> str:
    """``shards`` shards; captions alternate between .txt and .json; one sample in each shard has a broken .json."""
    n = 0
    for s in range(shards):
        members = []
        for i in range(per_shard):
            members.append((f"s{s}_{i:03d}.png", _png(n)))
            if i == 3:
                members.append((f"s{s}_{i:03d}.json", b'{"url": "no caption here"}'))
            elif i % 2:
                members.append((f"s{s}_{i:03d}.json", json.dumps({"caption": f"scene {n}", "w": 16}).encode()))
            else:
                members.append((f"s{s}_{i:03d}.txt", f"scene {n}".encode()))
            n += 1
        write_shard(tmp_path / f"shard-{s}.tar", members)
    return str(tmp_path / f"shard-{{0..{shards - 1}}}.tar")


def _loader(spec, **kw):
    base = dict(image_size=S, transform=llip.image_transform(S, train=True), tokenizer=llip.get_tokenizer(16),
                global_batch=4, seed=3)  # fmt: skip
    return build_train_loader(spec, **{**base, **kw}).batches


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_from_saved_places_continues_the_stream_exactly(tmp_path, workers, monkeypatch):
    spec = _write_shards(tmp_path)
    full = list(itertools.islice(_loader(spec, workers=workers), 9))  # 18 good samples an epoch: crosses epochs
    for start in (1, 4, 5, 8):
        places = {}
        for batch in full[:start]:  # what the trainer records from the batches it consumed
            worker, *place = batch["stream_place"]
            places[worker] = tuple(place)
        saved = {"workers": max(workers, 1), "places": places}
        resumed = list(
            itertools.islice(_loader(spec, workers=workers, start_step=start, stream_places=saved), 9 - start)
        )
        for a, b in zip(full[start:], resumed, strict=True):
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"]), start
    if workers == 0:  # the samples before the saved place are read but never decoded
        decoded = []
        real = wd.WebDataset._decode
        monkeypatch.setattr(wd.WebDataset, "_decode", lambda self, k, f, e: decoded.append(k) or real(self, k, f, e))
        places = {0: tuple(full[7]["stream_place"][1:])}
        next(_loader(spec, start_step=8, stream_places={"workers": 1, "places": places}))
        assert 4 <= len(decoded) <= 6  # one batch of 4, plus the broken .json samples met on the way


def test_a_sample_gets_the_same_crop_wherever_it_is_read(tmp_path):
    spec = _write_shards(tmp_path, shards=2)
    tf = llip.image_transform(S, train=True)
    alone = {c: x for x, c in wd.WebDataset(spec, tf, seed=3).one_pass()}  # one consumer, no shuffle buffer
    assert len(alone) == 12
    for rank in (0, 1):  # two consumers, each reading one shard through its shuffle buffer
        epoch0 = itertools.takewhile(lambda s: s[2][0] == 0, wd.WebDataset(spec, tf, seed=3, rank=rank, world=2))
        for image, caption, _ in epoch0:
            assert torch.equal(image, alone[caption]), caption
    # Another seed, or another epoch: other crops (for most samples: a 16 px image has few distinct crops).
    other = {c: x for x, c in wd.WebDataset(spec, tf, seed=4).one_pass()}
    assert sum(not torch.equal(other[c], alone[c]) for c in alone) >= 9
    assert sum(not torch.equal(x, alone[c]) for x, c in wd.WebDataset(spec, tf, seed=3).one_pass(epoch=1)) >= 9


def test_a_saved_place_for_other_workers_falls_back_to_replaying(tmp_path):
    spec = _write_shards(tmp_path)
    full = list(itertools.islice(_loader(spec), 3))
    saved = {"workers": 4, "places": {0: (0, 5)}}  # saved by a run with 4 workers: does not apply to 1
    resumed = next(_loader(spec, start_step=2, stream_places=saved))
    assert torch.equal(resumed["images"], full[2]["images"])


def test_pipe_urls_and_json_captions(tmp_path):
    spec = _write_shards(tmp_path, shards=1)
    local = next(_loader(spec))
    piped = next(_loader(f"pipe:cat {tmp_path / 'shard-0.tar'}"))
    assert torch.equal(local["images"], piped["images"]) and torch.equal(local["tokens"], piped["tokens"])
    dataset = wd.WebDataset(f"pipe:cat {tmp_path / 'shard-0.tar'}", llip.image_transform(S, train=False))
    captions = [c for _, c, _ in itertools.islice(iter(dataset), 6)]
    assert sorted(captions) == sorted(f"scene {n}" for n in (0, 1, 2, 4, 5, 6))  # .txt and .json alike
    assert any("has no 'caption' or 'text' string" in why for why in dataset.skips.counts)


def test_a_pipe_that_writes_after_the_archive_is_read_to_its_end(tmp_path):
    # Padding written after the end-of-archive blocks, late: the reader waits for it rather than closing the pipe
    # under the command (which would then fail with SIGPIPE, and the shard would be counted as unreadable).
    _write_shards(tmp_path, shards=1)
    late = f"pipe:cat {tmp_path / 'shard-0.tar'}; sleep 0.3; head -c 20480 /dev/zero"
    dataset = wd.WebDataset(late, llip.image_transform(S, train=False))
    assert len(list(dataset.one_pass())) == 6 and not any("command" in why for why in dataset.skips.counts)


def test_stream_sources_that_cannot_work_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="pipe:curl -s -L https://example.org/a.tar"):
        wd.expand_shards("https://example.org/a.tar")
    dataset = wd.WebDataset("pipe:echo broken >&2; exit 3", llip.image_transform(S, train=False))
    assert list(iter(dataset)) == []  # nothing readable: the stream ends (the trainer reports it)
    assert any("command exited with status 3: broken" in why for why in dataset.skips.counts)


def test_trainer_resumes_tar_shards_from_saved_places(tmp_path):
    spec = _write_shards(tmp_path)
    mini = {**MINI, "image_size": S}  # the shards hold 16 px images

    def cfg(name, **kw):
        return TrainConfig(overrides=mini, data=spec, steps=7, batch_size=4, warmup=1, workers=2, save_every=3, keep=0,
                           output=str(tmp_path / name), tensorboard=False, progress=False, **kw)  # fmt: skip

    train(cfg("full"))
    step3 = tmp_path / "full" / "checkpoints" / "step_00000003.pt"
    state = torch.load(step3, weights_only=False)
    assert state["stream"]["workers"] == 2 and set(state["stream"]["ranks"][0]) == {0, 1}
    train(cfg("resumed", resume=str(step3)))  # steps 4-7 again, the loader workers starting from the saved places
    losses = {n: {r["step"]: r["loss"] for r in read_metrics(tmp_path / n)} for n in ("full", "resumed")}
    assert sorted(losses["resumed"]) == [4, 5, 6, 7]
    assert all(losses["resumed"][s] == losses["full"][s] for s in range(4, 8))

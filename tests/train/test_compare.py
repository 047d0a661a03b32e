"""``llip compare`` over seeds (llip/compare.py) and the statistics behind its table (llip/stats.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llip.compare import compare
from llip.errors import UsageError
from llip.stats import describe, paired_difference, t_quantile_975

TINY_RUN = {"size": "tiny", "kinds": ("siglip", "llip"), "steps": 2, "batch_size": 8, "warmup": 0,
            "eval_images": 16, "progress": False}  # fmt: skip


def test_describe_and_paired_difference():
    d = describe([1.0, 2.0, 3.0])
    half = 4.303 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n), sd = 1
    assert d["mean"] == 2.0 and d["sd"] == 1.0 and d["ci95"] == pytest.approx([2 - half, 2 + half])
    assert describe([5.0]) == {"n": 1, "mean": 5.0, "sd": None, "ci95": None}
    assert t_quantile_975(4) == 2.776 and t_quantile_975(100) == 1.96
    # A constant gap of 1 point with a small wobble is significant; the same gap with large noise is not.
    a, b = {0: 10.0, 1: 12.0, 2: 11.0, 3: 13.0}, {0: 9.0, 1: 11.1, 2: 9.9, 3: 12.0}
    assert paired_difference(a, b)["significant"] and paired_difference(a, b)["mean"] == pytest.approx(1.0)
    noisy = {0: 14.0, 1: 8.0, 2: 13.0, 3: 9.0}
    assert not paired_difference(noisy, b)["significant"]
    assert paired_difference({0: 1.0}, {0: 2.0}) is None  # one common seed: no interval
    with pytest.raises(ValueError, match="df must be >= 1"):
        t_quantile_975(0)


def test_compare_over_seeds_then_resume_with_more(tmp_path, capsys):
    out = tmp_path / "cmp"
    summary = compare(**TINY_RUN, seeds=2, output=str(out))
    saved = json.loads((out / "results.json").read_text())
    assert sorted(saved["runs"]) == ["llip-tiny", "siglip-tiny"]
    assert all(sorted(by_seed) == ["0", "1"] for by_seed in saved["runs"].values())
    llip_row = summary["llip-tiny"]
    r1 = llip_row["metrics"]["image_to_text_R@1"]
    values = [saved["runs"]["llip-tiny"][s]["eval"]["image_to_text_R@1"] for s in ("0", "1")]
    assert r1["n"] == 2 and r1["mean"] == pytest.approx(sum(values) / 2)
    diff = llip_row["vs_siglip"]["image_to_text_R@1"]
    expected = [saved["runs"]["llip-tiny"][s]["eval"]["image_to_text_R@1"]
                - saved["runs"]["siglip-tiny"][s]["eval"]["image_to_text_R@1"] for s in ("0", "1")]  # fmt: skip
    assert diff["mean"] == pytest.approx(sum(expected) / 2) and "vs_siglip" not in summary["siglip-tiny"]
    table = (out / "results.md").read_text()
    assert "±" in table and "Paired difference from siglip" in table and "| llip-tiny - siglip |" in table
    assert (out / "compare.png").stat().st_size > 0
    # runs are folders of their own: refused again without a flag, kept with --resume (which trains seed 2 only)
    with pytest.raises(UsageError, match="already holds a run"):
        compare(**TINY_RUN, seeds=1, output=str(out))
    first = (out / "llip-tiny" / "seed0" / "metrics.jsonl").read_text()
    capsys.readouterr()
    summary = compare(**TINY_RUN, seeds=3, output=str(out), resume=True)
    assert capsys.readouterr().out.count("kept from") == 4
    assert (out / "llip-tiny" / "seed0" / "metrics.jsonl").read_text() == first
    assert (
        summary["llip-tiny"]["seeds"] == [0, 1, 2] and summary["llip-tiny"]["vs_siglip"]["image_to_text_R@1"]["n"] == 3
    )
    with pytest.raises(UsageError, match=r"its runs used other settings \(steps\)"):
        compare(**{**TINY_RUN, "steps": 3}, seeds=1, output=str(out), resume=True)
    with pytest.raises(UsageError, match="exclude each other"):
        compare(**TINY_RUN, output=str(out), resume=True, overwrite=True)


def test_filtered_ranks_count_only_wrong_images_above():
    from llip.compare.probe import filtered_ranks

    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1], [0.2, 0.3, 0.8, 0.8]])  # 2 captions x 4 images
    owner = torch.tensor([1, 2])
    right = torch.tensor([[False, True, True, False], [False, False, True, False]])
    # caption 0 (image 1, 0.5): image 0 is wrong and above; image 2 is above but also right -> rank 2
    # caption 1 (image 2, 0.8): image 3 ties it (ties go to the query) -> rank 1
    assert filtered_ranks(scores, owner, right).tolist() == [2, 1]


def test_probe_set_groups_scenes_by_their_object_captions():
    import llip
    from llip.compare.probe import probe_set
    from llip.data import builtin

    pset = probe_set(32, llip.image_transform(32, train=False), llip.get_tokenizer(32), n_images=40)
    scenes = [builtin.make_scene("val", n) for n in range(40)]
    for caption, owner, group, right in zip(pset["captions"], pset["caption_to_image"], pset["group"], pset["right"]):
        scene = scenes[int(owner)]
        assert caption in {builtin.object_caption(o) for o in scene.objects} and bool(right[owner])
        assert group == ("single" if len(scene.objects) == 1 else "multi")
        described = [caption in {builtin.object_caption(o) for o in s.objects} for s in scenes]
        assert right.tolist() == described
    assert {"multi", "single"} == set(pset["group"])


def test_ablation_probe_and_tau_sweep_then_backfill(tmp_path):
    out = tmp_path / "abl"
    run = {**TINY_RUN, "kinds": ("llip",), "eval_images": 40}
    compare(**run, vary=("K", [2, 8]), seeds=1, output=str(out))
    saved = json.loads((out / "results.json").read_text())
    assert sorted(saved["runs"]) == ["llip-tiny", "llip-tiny K=2"]  # K=8 is the config's own: the plain name
    row = saved["runs"]["llip-tiny K=2"]["0"]
    assert row["overrides"] == {"K": 2} and (out / "llip-tiny-K2" / "seed0" / "checkpoints").is_dir()
    assert set(row["probe"]) == {"probe_multi_R@1", "probe_multi_mean_rank", "probe_single_R@1",
                                 "probe_single_mean_rank", "probe_gap_R@1"}  # fmt: skip
    assert sorted(map(float, row["zero_shot_tau"])) == [1.0, 3.0, 5.0, 8.0, 10.0]
    report = (out / "results.md").read_text()
    assert "## Ablation: K" in report and "## Caption-diversity probe" in report and "tau 10" in report
    assert (out / "ablation_K.png").stat().st_size > 0 and (out / "zero_shot_tau.png").stat().st_size > 0
    # a run from before the probe (no probe in results.json) gets it from its checkpoint when the study is resumed
    probe = row["probe"]
    del saved["runs"]["llip-tiny K=2"]["0"]["probe"]
    (out / "results.json").write_text(json.dumps(saved))
    compare(**run, vary=("K", [2]), seeds=1, output=str(out), resume=True)
    again = json.loads((out / "results.json").read_text())["runs"]["llip-tiny K=2"]["0"]
    assert again["probe"] == pytest.approx(probe, rel=1e-6)
    with pytest.raises(UsageError, match="--vary nope: not a field of the llip-tiny config"):
        compare(**run, vary=("nope", [1]), output=str(tmp_path / "x"))


def test_linear_trend():
    from llip.stats import linear_trend

    exact = linear_trend([0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 5.0, 7.0])
    assert exact["slope"] == pytest.approx(2.0) and exact["ci95"] == pytest.approx([2.0, 2.0]) and exact["significant"]
    # slope 0.1 under noise of +-1: the interval (t_{0.975,4} = 2.776) straddles 0
    noisy = linear_trend([0, 1, 2, 0, 1, 2], [0.0, 1.1, 0.2, 1.0, 0.1, 1.2])
    assert noisy["n"] == 6 and not noisy["significant"] and noisy["ci95"][0] < noisy["slope"] < noisy["ci95"][1]
    assert linear_trend([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None and linear_trend([1.0, 2.0], [1.0, 2.0]) is None

"""``llip compare`` over seeds (llip/compare.py) and the statistics behind its table (llip/stats.py)."""

from __future__ import annotations

import json
import math

import pytest

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

"""The benchmark harness itself (bench/): result format, FLOP model, regression guard, peak-RSS measurement, and
the entry point (``python -m bench <subcommand>``).

No timing is asserted (2 shared cores): only that the numbers exist, are consistent and that the guard and
the memory probe can tell a difference that is really there.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compare
from bench.__main__ import SUBCOMMANDS
from bench.harness import ROW_METRICS, run_cases, save
from bench.memory import measure_subprocess
from bench.providers import Case, flop_model
from bench.report import build_report
from llip_kernels.algebra import pair_flops

FAST = dict(warmup=1, min_reps=3, max_reps=5, min_time_s=0.0, max_time_s=2.0)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    # Odd, non-square batch (Bi 7, Bt 5) for the logits / sigmoid rows; softmax needs a square one.
    cases = [Case("sigmoid_loss", "fwd+bwd", p, "tiny", 7, 5) for p in ("reference", "torch")]
    cases += [
        Case("logits", "fwd", "reference", "tiny", 7, 5),
        Case("softmax_loss", "bwd", "torch", "tiny", 6, 6),
        Case("pooled_sigmoid_loss", "fwd+bwd", "pooled", "tiny", 7, 5),
    ]
    # Two rounds: each case's samples are pooled over both (3 + 3 repetitions).
    result = run_cases(cases, memory=False, timing=FAST, command="pytest", matmul_n=512, rounds=2)
    # Peak memory (a subprocess per row) is exercised on one row only, to keep the test fast.
    mem_case = run_cases(cases[:1], memory=True, timing=FAST, matmul_n=256)["rows"][0]
    path = save(result, tmp_path_factory.mktemp("bench") / "r.json")
    return json.loads(path.read_text()), mem_case


def _check_ok_row(row, reps=3):
    assert row["status"] == "ok" and row["reasons"] == []
    for m in ROW_METRICS:
        assert m in row, m
    t = row["time_ms"]
    assert t["n"] >= reps and 0 < t["min"] <= t["p25"] <= t["median"] <= t["p75"] <= t["max"]
    assert row["flops"] > 0 and row["tflops"] > 0 and row["tflops_effective"] > 0
    assert row["frac_matmul"] > 0 and row["frac_matmul_effective"] > 0


def test_result_file_is_well_formed(tiny_result):
    result, mem_row = tiny_result
    meta = result["meta"]
    for field in ("timestamp", "git", "device", "device_name", "python", "torch", "triton", "command"):
        assert field in meta, field
    assert meta["device"] == "cpu" and meta["torch"] and meta["rounds"] == 2
    assert result["matmul"]["float32"]["tflops"] > 0
    rows = {(r["op"], r["mode"], r["provider"]): r for r in result["rows"]}
    assert len(rows) == 5
    _check_ok_row(rows["sigmoid_loss", "fwd+bwd", "reference"], reps=6)
    _check_ok_row(rows["logits", "fwd", "reference"], reps=6)
    _check_ok_row(rows["pooled_sigmoid_loss", "fwd+bwd", "pooled"], reps=6)
    for key in (("sigmoid_loss", "fwd+bwd", "torch"), ("softmax_loss", "bwd", "torch")):
        row = rows[key]  # the torch backend may not exist yet: then it must be skipped with a reason
        if row["status"] == "ok":
            _check_ok_row(row)
        else:
            assert row["status"] == "skipped" and row["reasons"], row
    _check_ok_row(mem_row)
    assert isinstance(mem_row["peak_mem_bytes"], int) and mem_row["peak_mem_bytes"] >= 0, mem_row
    assert "clear_refs" in mem_row["mem_method"] or "ru_maxrss" in mem_row["mem_method"]


def test_report_renders_the_tables(tiny_result, tmp_path):
    result, _ = tiny_result
    save(result, tmp_path / "micro_cpu.json")
    text = build_report(tmp_path).read_text()
    assert "Reproduce: `pytest`" in text
    assert "| sigmoid_loss | fwd+bwd | reference |" in text
    assert "x ref" in text and "eff. GFLOP/s" in text


def test_flop_model_of_the_reference_is_form_1():
    case = Case("sigmoid_loss", "fwd+bwd", "reference", "B/16", 7, 5)
    fm = flop_model(case)
    per_pair = pair_flops(1, 8, 32, 64)
    assert fm["flops"] == fm["flops_form1"] == 3 * per_pair * 35  # forward + backward (2 x forward)
    assert flop_model(Case("logits", "fwd", "reference", "B/16", 7, 5))["flops"] == per_pair * 35


def test_unavailable_provider_is_skipped_with_reasons():
    result = run_cases([Case("logits", "fwd", "xformers", "tiny", 4, 4)], memory=False, timing=FAST, matmul_n=256)
    (row,) = result["rows"]
    assert row["status"] == "skipped" and "GPU" in row["reasons"][0]


def _rows(times: dict[str, float], status: dict[str, str] | None = None) -> dict:
    rows = []
    for prov, ms in times.items():
        st = (status or {}).get(prov, "ok")
        rows.append(
            dict(
                op="sigmoid_loss",
                mode="fwd+bwd",
                provider=prov,
                config="B/16",
                Bi=256,
                Bt=256,
                H=8,
                K=32,
                d=64,
                dtype="float32",
                device="cpu",
                status=st,
                reasons=[] if st == "ok" else ["x"],
                time_ms=dict(median=ms, min=ms * 0.9, p25=ms, p75=ms, max=ms, n=5),
                peak_mem_bytes=1000,
            )
        )
    return {"meta": {}, "rows": rows}


@pytest.mark.parametrize(
    "new, status, expected",
    [
        ({"reference": 100.0, "torch": 10.4}, None, 0),  # 4% slower: within 15%
        ({"reference": 100.0, "torch": 13.0}, None, 1),  # 30% slower: caught
        ({"reference": 60.0, "torch": 5.0}, None, 0),  # faster is fine
        ({"reference": 100.0, "torch": 10.0}, {"torch": "error"}, 1),  # ran before, fails now
        ({"reference": 100.0, "torch": 10.0}, {"torch": "skipped"}, 0),  # not available here: reported only
    ],
)
def test_regression_guard(tmp_path, capsys, new, status, expected):
    base = tmp_path / "base.json"
    base.write_text(json.dumps(_rows({"reference": 100.0, "torch": 10.0})))
    path = tmp_path / "new.json"
    path.write_text(json.dumps(_rows(new, status)))
    assert compare.main([str(path), str(base), "--threshold", "0.15"]) == expected
    out = capsys.readouterr().out
    assert "sigmoid_loss" in out and "new/base" in out
    assert ("FAIL" in out) == (expected == 1)


def test_regression_guard_refuses_to_compare_nothing(tmp_path):
    base, new = tmp_path / "b.json", tmp_path / "n.json"
    base.write_text(json.dumps(_rows({"reference": 100.0})))
    new.write_text(json.dumps(_rows({"torch": 100.0})))
    assert compare.main([str(new), str(base)]) == 2


def test_peak_rss_grows_with_the_allocation():
    # The reference logits materialise [Bi, Bt, D] and [Bi, Bt, H, K]: about 0.03 MB at Bi = Bt = 8,
    # about 42 MB at Bi = Bt = 512 (float32, tiny config D = 32, H*K = 8).
    small = measure_subprocess(Case("logits", "fwd", "reference", "tiny", 8, 8))
    large = measure_subprocess(Case("logits", "fwd", "reference", "tiny", 512, 512))
    assert "error" not in small and "error" not in large, (small, large)
    assert large["peak_bytes"] > small["peak_bytes"] + 20e6, (small, large)


@pytest.mark.parametrize("op", ["logits", "sigmoid_loss", "softmax_loss"])
def test_attention_library_baseline_computes_the_llip_op(op, monkeypatch):
    # A baseline that computed something else would make its timings meaningless. Small chunks (2 images)
    # exercise the chunking and the per-chunk checkpoint; gradients are compared too.
    import torch

    from bench import providers

    monkeypatch.setattr(providers, "SDPA_CHUNK_ELEMS", 2 * 6 * (32 + 8))
    case = Case(op, "fwd+bwd", "sdpa", "tiny", 6, 6)
    from llip_kernels.testing import check_rule

    x = providers.make_tensors(case)
    ref_case = Case(op, "fwd+bwd", "reference", "tiny", 6, 6)
    runs = {}  # the baseline, the reference in the same dtype, and the float64 oracle (the numerics rule)
    for name, dtype, fn in (
        ("sdpa", None, providers.forward_for(case)),
        ("same", None, providers.forward_for(ref_case)),
        ("ref64", torch.float64, providers.forward_for(ref_case)),
    ):
        xs = {n: t.detach().to(dtype or t.dtype).requires_grad_(True) for n, t in x.items()}
        out = fn(xs)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype))
        runs[name] = (out.detach(), {n: xs[n].grad for n in ("k", "v", "q", "y", "w_out", "t")})
    check_rule(f"sdpa {op}", runs["sdpa"][0], runs["ref64"][0], runs["same"][0], torch.float32)
    for n in runs["sdpa"][1]:
        check_rule(f"sdpa {op} d{n}", runs["sdpa"][1][n], runs["ref64"][1][n], runs["same"][1][n], torch.float32)


def test_regression_guard_on_memory(tmp_path):
    base, new = tmp_path / "b.json", tmp_path / "n.json"
    base.write_text(json.dumps(_rows({"torch": 10.0})))
    grown = _rows({"torch": 10.0})
    grown["rows"][0]["peak_mem_bytes"] = 2000  # twice the baseline's 1000
    new.write_text(json.dumps(grown))
    assert compare.main([str(new), str(base)]) == 0  # memory is only guarded when asked
    assert compare.main([str(new), str(base), "--mem-threshold", "0.5"]) == 1


def test_entry_point_lists_every_subcommand_and_each_prints_its_help():
    # What a user types, from the repository root; --help must need neither a GPU nor Triton. The subcommands'
    # --help run side by side: each subprocess spends its seconds importing torch.
    def bench(*args):
        return subprocess.Popen(
            [sys.executable, "-m", "bench", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    listing = bench("--help").communicate(timeout=60)[0]
    lines = listing.splitlines()
    for name in SUBCOMMANDS:
        assert any(line.split()[:1] == [name] for line in lines), (name, listing)
    assert bench().communicate(timeout=60)[0] == listing  # bare: the same list
    procs = {name: bench(name, "--help") for name in SUBCOMMANDS}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-2000:])
        assert out.startswith(f"usage: python -m bench {name} "), (name, out[:200])
    unknown = bench("no-such-subcommand")
    assert unknown.communicate(timeout=60) and unknown.returncode == 2


def test_pooled_bench_runs_every_path_and_writes_its_rows(tmp_path):
    from bench import pooled

    assert pooled.main(["--batch", "24", "--dim", "8", "--output", str(tmp_path / "p.json")]) == 0  # exit status
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert {(r["loss"], r["path"]) for r in rows} == set(pooled.PATHS)
    assert all(r["ms"] > 0 and r["gflops"] > 0 and r["peak_mb"] >= 0 for r in rows)

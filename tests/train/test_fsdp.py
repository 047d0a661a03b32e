"""``llip train --fsdp`` on 2 CPU processes (gloo): the sharded run trains as one process does on the same global
batch, to rounding; it resumes exactly from its sharded checkpoints, under --fsdp or in one process; one sharded
step with gradient accumulation has one process's gradients; a sharded checkpoint loads whole into one process
(what ``llip eval`` does) with exactly the gathered weights; the options --fsdp cannot take are one error line.

"To rounding" for weights after AdamW steps: Adam divides each gradient by its own running size, so an element
whose gradient is nearly zero (an attention key bias: softmax ignores it) turns rounding noise into a visible
step. Each tensor's difference is therefore compared with how far training moved that tensor, not with a bare
absolute number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed import fsdp

import llip
from llip.cli import main
from llip.errors import UsageError
from llip.eval_command import load_model
from llip.train import checkpoint as ckpt
from llip.train.loop import TrainConfig, compute_loss, seed_everything
from llip.train.resume import load_resume_state
from llip_kernels.testing import check_rule
from tests.mini import MINI, MINI_ARGS

pytest.importorskip("llip_kernels.distributed", reason="llip_kernels.distributed (global-batch losses) not present")

REPO = Path(__file__).resolve().parents[2]
# Steps 1-2 and 3-4 each end in a checkpoint and an evaluation; --grad-clip 0.5 clips every step (the norms are
# 10-100), so clipping over sharded gradients is exercised too.
ARGS = [
    *MINI_ARGS, "--steps", "4", "--batch-size", "8", "--warmup", "1", "--lr", "2e-3", "--grad-clip", "0.5",
    "--save-every", "2", "--keep", "0", "--eval-every", "2", "--eval-images", "8", "--workers", "0",
    "--no-tensorboard", "--no-progress",
]  # fmt: skip


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m llip train ... --fsdp`` into ``out``, one thread per process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*torchrun, "-m", "llip", "train", *ARGS, "--fsdp", "--output", str(out), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _train_log(out: Path, kind: str = "train") -> dict[int, dict]:
    records = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in records if r["kind"] == kind}


def _assert_same_run(got: Path, expected: Path, steps: range) -> None:
    """The loss and the gradient norm of each step agree to rounding (float32 summed in another order)."""
    got_log, expected_log = _train_log(got), _train_log(expected)
    assert sorted(got_log) == list(steps)
    for step in steps:
        for key in ("loss", "grad_norm"):
            assert got_log[step][key] == pytest.approx(expected_log[step][key], rel=1e-5), (step, key)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """One 2-process --fsdp run of 4 steps, shared by the tests below; checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _torchrun(out)
    return out


def test_two_sharded_processes_train_as_one(sharded_run, tmp_path):
    one = tmp_path / "one"
    assert main(["train", *ARGS, "--output", str(one)]) == 0
    _assert_same_run(sharded_run, one, range(1, 5))
    # Evaluated mid-run and at the end on rank 0's gathered copy of the weights: the single process's results.
    evaluations = _train_log(sharded_run, "eval")
    assert sorted(evaluations) == [2, 4] and evaluations == _train_log(one, "eval")
    # The final weights, the sharded ones read back by llip eval's loader, against the single process's.
    sharded, state = load_model(sharded_run / "checkpoints" / "step_00000004.dcp", "cpu", None)
    assert state["step"] == 4 and state["config"]["fsdp"]
    single = ckpt.load_checkpoint(one / "checkpoints" / "step_00000004.pt")["model"]
    seed_everything(0)  # the trainer's initial weights: how far training moved each tensor
    initial = llip.create_model("llip-tiny", **MINI).state_dict()
    weights = sharded.state_dict()
    assert weights.keys() == single.keys()
    for name, w in single.items():
        moved = (w - initial[name]).norm()
        assert moved > 0, name  # every tensor trained (a frozen one would make the bound below vacuous)
        assert (weights[name] - w).norm() <= 1e-3 * moved, name  # measured: at most 8e-5 (a key bias), 1e-6 typical


def test_sharded_run_resumes_exactly(sharded_run, tmp_path):
    """From the step-2 sharded checkpoint: under --fsdp, bitwise the uninterrupted run (same ranks, same order of
    sums); in one process without --fsdp (each tensor read whole), the same run to rounding."""
    step2 = sharded_run / "checkpoints" / "step_00000002.dcp"
    done = _torchrun(tmp_path / "sharded", "--resume", str(step2))
    assert "resumed from step 2" in done.stdout
    log, full = _train_log(tmp_path / "sharded"), _train_log(sharded_run)
    assert sorted(log) == [3, 4] and all(log[s]["loss"] == full[s]["loss"] for s in (3, 4))
    resumed = ckpt.load_checkpoint(tmp_path / "sharded" / "checkpoints" / "step_00000004.dcp")
    expected = ckpt.load_checkpoint(sharded_run / "checkpoints" / "step_00000004.dcp")
    for name, w in expected["model"].items():
        assert torch.equal(resumed["model"][name], w), name
    assert resumed["scheduler"] == expected["scheduler"] and resumed["skipped"] == expected["skipped"]

    assert main(["train", *ARGS, "--output", str(tmp_path / "one"), "--resume", str(step2)]) == 0
    _assert_same_run(tmp_path / "one", sharded_run, range(3, 5))


# Llip with K = 3 mixture tokens and 15 text positions: tensors of 3 and 15 rows, split unevenly over 2 ranks.
ODD = {**MINI, "K": 3, "context_length": 15}
BATCH = 8  # global; 4 per rank, each in 2 micro-batches


def _batch(model) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, model.image_size, model.image_size, generator=g)
    return images, torch.randint(1, 1000, (BATCH, model.context_length), generator=g)


def _sharded_step(rank: int, out: str) -> None:
    """One step of the trainer's sharded path on this rank's half of the batch, in 2 micro-batches; saves (rank 0)
    the gathered gradients and the gathered weights after the update, and a sharded checkpoint (all ranks)."""
    from torch.distributed.tensor import DTensor

    from llip.train.accumulate import accumulated_backward
    from llip.train.fsdp import reduce_replicated_grads, shard_model

    def whole(t: torch.Tensor) -> torch.Tensor:  # a collective for a sharded tensor
        return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = llip.create_model("llip-tiny", **ODD)
        images, tokens = (x.chunk(2)[rank] for x in _batch(model))
        shard_model(model)
        optimizer = torch.optim.AdamW(model.param_groups(0.2), lr=1e-3)
        loss, _ = accumulated_backward(model, model, images, tokens, accum=2)
        reduce_replicated_grads(model)
        grads = {n: whole(p.grad) for n, p in model.named_parameters()}
        optimizer.step()
        weights = {n: whole(p) for n, p in model.named_parameters()}
        state = {"step": 1, "config": {"model": "llip-tiny", "overrides": ODD}}
        ckpt.save_sharded_checkpoint(state, model, optimizer, out, step=1, keep=0)
        dist.all_reduce(loss)  # each rank's share of the global-batch loss
        if rank == 0:
            torch.save({"loss": loss.reshape(1) / 2, "grads": grads, "weights": weights}, f"{out}/sharded.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_step_and_checkpoint_match_one_process(tmp_path):
    """Gradients by the rule of docs/design.md section 6 (float32 on both sides, against float64; the floor relative
    to each tensor's own size), as tests/train/test_train_distributed.py does for DDP. The checkpoint read in this
    one process holds exactly the weights the ranks gathered."""
    mp.spawn(_sharded_step, args=(str(tmp_path),), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "sharded.pt")
    single = {}
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        model = llip.create_model("llip-tiny", **ODD).to(dtype)
        images, tokens = _batch(model)
        loss, _ = compute_loss(
            model, model, images.to(dtype), tokens, backend="torch" if dtype == torch.float64 else None
        )
        loss.backward()
        single[dtype] = {"loss": loss.detach().reshape(1), **{n: p.grad for n, p in model.named_parameters()}}
    ref32, ref64 = single[torch.float32], single[torch.float64]
    check_rule("loss", sharded["loss"], ref64["loss"], ref32["loss"], torch.float32)
    assert sharded["grads"].keys() == model.state_dict().keys()
    for name, g in sharded["grads"].items():
        check_rule(name, g, ref64[name], ref32[name], torch.float32, floor=2e-5 * ref64[name].abs().max().item())

    saved = ckpt.load_checkpoint(tmp_path / "step_00000001.dcp")
    assert saved["step"] == 1 and saved["model"].keys() == sharded["weights"].keys()
    for name, w in sharded["weights"].items():
        assert torch.equal(saved["model"][name], w), name
    # Rank 1's shards lost (its folder was not on storage rank 0 sees): one error line, not DCP's traceback.
    (tmp_path / "step_00000001.dcp" / "__1_0.distcp").unlink()
    with pytest.raises(UsageError, match=r"a shard is missing or damaged.*FileNotFoundError") as lost:
        ckpt.load_checkpoint(tmp_path / "step_00000001.dcp")
    assert "\n" not in str(lost.value)


def test_sharded_checkpoints_are_found_pruned_and_cleaned(tmp_path):
    """Sharded folders count as checkpoints (listing, --resume, --keep); an interrupted sharded write is cleared."""
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (folder / f"step_{step:08d}.dcp").mkdir(parents=True)
        torch.save({"step": step, "config": {}}, folder / f"step_{step:08d}.dcp" / ckpt.SHARDED_STATE)
    (folder / ".step_00000004.dcp.tmp").mkdir()  # a kill during a sharded write left this
    # A kill between the two renames of step 3 written again: the old folder aside, the new one not yet named.
    os.replace(folder / "step_00000003.dcp", folder / ".step_00000003.dcp.old")
    (folder / ".step_00000003.dcp.tmp").mkdir()
    assert ckpt.remove_stale_temp_files(folder) == 2  # the two .tmp removed, step 3 put back
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [1, 2, 3]
    assert ckpt.find_resume("auto", folder).name == "step_00000003.dcp"
    assert ckpt.find_resume(str(tmp_path), folder).name == "step_00000003.dcp"  # a run folder: its newest
    assert ckpt.find_resume(str(folder / "step_00000002.dcp"), folder).name == "step_00000002.dcp"  # itself
    assert ckpt.load_checkpoint(folder / "step_00000002.dcp", assemble=False) == {"step": 2, "config": {}}
    ckpt.save_checkpoint({"step": 4, "model": {}, "config": {}}, folder, 4, keep=2)
    assert [p.name for _, p in ckpt.list_checkpoints(folder)] == ["step_00000003.dcp", "step_00000004.pt"]


def test_what_fsdp_cannot_do_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--fsdp", "--output", str(tmp_path / "x")]) == 2
    assert "--fsdp shards the model across processes: launch with torchrun" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before the process group would be joined
    assert main(["train", "--fsdp", "--precision", "fp16", "--output", str(tmp_path / "y")]) == 2
    assert "--fsdp does not support --precision fp16" in capsys.readouterr().err
    monkeypatch.delattr(fsdp, "fully_shard")  # a PyTorch before 2.6
    assert main(["train", "--fsdp", "--output", str(tmp_path / "y")]) == 2
    assert "--fsdp needs PyTorch 2.6 or newer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    torch.save({}, tmp_path / "step_00000002.pt")
    cfg = TrainConfig(fsdp=True, resume=str(tmp_path / "step_00000002.pt"))
    with pytest.raises(UsageError, match="single-file checkpoint of a run without --fsdp; resume it without --fsdp"):
        load_resume_state(cfg, tmp_path, None, None, None)

"""Atomic checkpoints and the RNG state they carry.

A checkpoint is one ``torch.save`` dict: model, optimiser, scheduler, scaler, RNG states (python, numpy, torch
CPU and CUDA), the step (which is the data position: batches are indexed by step) and the run's arguments.
It is written to a temporary file in the same folder, flushed and fsynced, then renamed over the final name
(``os.replace`` is atomic on POSIX), and the folder is fsynced: a kill at any moment leaves either the old or
the new checkpoint, never a torn one.

A run under ``--fsdp`` writes sharded checkpoints instead: a folder ``step_<n>.dcp`` in
``torch.distributed.checkpoint`` format, each rank writing its shards of the model and optimiser state, plus
``state.pt`` with everything else of the dict above. It is written under a temporary name and renamed in the same
way. :func:`load_checkpoint` reads either kind in one process (the sharded model assembled whole), so evaluation
does not care which kind a run wrote.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError

PATTERN = re.compile(r"^step_(\d+)\.(?:pt|dcp)$")
# What save_atomic and save_sharded_checkpoint write before the rename
TEMP_PATTERN = re.compile(r"^\.step_\d+\.(?:pt\.tmp\d+|dcp\.tmp|dcp\.old)$")
SHARDED_STATE = "state.pt"  # in a sharded checkpoint's folder: all but the model and optimiser


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: str | os.PathLike, *, hang_before_rename: bool = False) -> None:
    """``torch.save(obj, path)`` so that ``path`` is always either absent, the old file or the complete new one.
    A kill during the write leaves a temporary ``.<name>.tmp<pid>`` beside it, which :func:`remove_stale_temp_files`
    clears at the next start. ``hang_before_rename``: fault injection for the tests (they kill the process there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        while hang_before_rename:
            time.sleep(1)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_folder(path.parent)


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the ``step_<n>.pt`` files and sharded ``step_<n>.dcp`` folders in ``folder``, oldest
    first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := PATTERN.match(name))]
    return sorted(found)


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded checkpoint (a folder a run under ``--fsdp`` wrote)."""
    return (Path(path) / SHARDED_STATE).is_file()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _prune(folder: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (0: keep all)."""
    if keep > 0:
        for _, old in list_checkpoints(folder)[:-keep]:
            _remove(old)


def remove_stale_temp_files(folder: str | os.PathLike) -> int:
    """Delete the temporary files (and sharded checkpoint folders) that writes interrupted by a kill left in
    ``folder``; how many there were. A sharded checkpoint moved aside to be rewritten (``.step_<n>.dcp.old``)
    whose replacement never got its name is put back instead: it is the checkpoint, not a leftover."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [folder / name for name in os.listdir(folder) if TEMP_PATTERN.match(name)]
    removed = 0
    for path in stale:
        final = folder / path.name[1:].removesuffix(".old")
        if path.name.endswith(".dcp.old") and not final.exists():
            os.replace(path, final)  # killed between save_sharded_checkpoint's two renames
            continue
        _remove(path)
        removed += 1
    return removed


def save_checkpoint(
    state: dict, folder: str | os.PathLike, step: int, keep: int, *, hang_before_rename: bool = False
) -> Path:
    """Write ``folder/step_<step>.pt`` atomically, then delete all but the newest ``keep`` checkpoints."""
    path = Path(folder) / f"step_{step:08d}.pt"
    save_atomic(state, path, hang_before_rename=hang_before_rename)
    _prune(folder, keep)
    return path


def save_sharded_checkpoint(
    state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: str | os.PathLike, step: int,
    keep: int, *, hang_before_rename: bool = False,
) -> Path | None:  # fmt: skip
    """Every rank: write ``folder/step_<step>.dcp``, the model and optimiser state sharded as they are in memory
    (each rank writes its own shards, so ``folder`` must be one that every rank sees), and rank 0 writes ``state``
    (everything else) into it. The folder is written as ``.step_<step>.dcp.tmp`` and renamed once complete; then
    rank 0 deletes all but the newest ``keep`` checkpoints. Returns the path on rank 0, None on the others."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    path = folder / f"step_{step:08d}.dcp"
    tmp = folder / f".{path.name}.tmp"
    model_state, optim_state = get_state_dict(model, optimizer)
    # dcp.save writes (and fsyncs) every rank's shards, then rank 0 the index of them (.metadata), and returns only
    # after that, on every rank: when it returns the shards are complete.
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    if dist.get_rank() != 0:
        return None
    save_atomic(state, tmp / SHARDED_STATE)
    while hang_before_rename:
        time.sleep(1)
    old = folder / f".{path.name}.old"
    if path.exists():  # the same step written again (a run resumed from an older checkpoint): replace it
        # A folder cannot be renamed over a full one: the old one steps aside first. A kill before the next rename
        # leaves it as .old, which remove_stale_temp_files puts back at the next start.
        _remove(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_folder(folder)
    _remove(old)
    _prune(folder, keep)
    return path


def load_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's model and optimiser state into ``model`` and ``optimizer``, sharded or whole as
    they are here: each rank reads its own part of every tensor, so the number of ranks need not be the one that
    wrote it, and a process without ``--fsdp`` (one rank, or DDP) gets whole tensors. Every rank must call it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # this run's layout, filled in place by dcp.load
    single = not (dist.is_available() and dist.is_initialized())
    _dcp_load({"model": model_state, "optimizer": optim_state}, path, single=single)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def _read_sharded_model(path: Path) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's model state dict with whole tensors, read in this one process (no process group):
    the checkpoint's index gives every tensor's full shape and dtype, and DCP fills them from all ranks' shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    index = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    model = {
        key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in index.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    _dcp_load({"model": model}, path, single=True)
    return model


def _dcp_load(state: dict, path: str | os.PathLike, *, single: bool) -> None:
    """``dcp.load`` into ``state`` in place; ``single``: in this process alone, without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():  # one process reading what several wrote is intended here, not to be warned of
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        try:
            dcp.load(state, checkpoint_id=path, no_dist=single)
        except CheckpointException as e:  # a BaseException whose text is every failing rank's whole traceback
            rank, (error, _) = next(iter(e.failures.items()))
            detail = " ".join(str(error).split())[:200]
            raise UsageError(
                f"cannot read sharded checkpoint {path}: a shard is missing or damaged, or it is not an llip "
                f"checkpoint (rank {rank}: {type(error).__name__}: {detail})"
            ) from None


def find_resume(resume: str, folder: str | os.PathLike, *, what: str = "--resume") -> Path | None:
    """``resume``: a checkpoint path (a file, or a sharded checkpoint's folder), a folder of them (its newest), a
    run folder (the newest in its ``checkpoints/``), or ``auto`` (the newest in ``folder``, None when there is
    none). ``what`` names the argument in the error messages."""
    if resume == "auto":
        found = list_checkpoints(folder)
        return found[-1][1] if found else None
    path = Path(resume)
    if path.is_dir() and not is_sharded(path):
        found = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        if not found:
            raise UsageError(
                f"{what} {resume}: no step_*.pt checkpoint in that folder (nor a sharded step_*.dcp one, nor any in "
                "its checkpoints/)"
            )
        return found[-1][1]
    if not path.exists():
        raise UsageError(f"{what} {resume}: no such checkpoint file or folder")
    return path


def load_checkpoint(path: str | os.PathLike, *, assemble: bool = True) -> dict:
    """The checkpoint's dict; a clear :class:`~llip.errors.UsageError` for a truncated or foreign file. A sharded
    checkpoint gives the same dict without the optimiser state, its model assembled whole in this process
    (``assemble=False``: without the model either, for a resume that loads it sharded, :func:`load_sharded`)."""
    path = Path(path)
    sharded = is_sharded(path)
    try:
        # weights_only=False: the file holds RNG states (numpy arrays, tuples) we wrote ourselves.
        state = torch.load(path / SHARDED_STATE if sharded else path, map_location="cpu", weights_only=False)
        if sharded and assemble and isinstance(state, dict):
            state["model"] = _read_sharded_model(path)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises several types for a torn or foreign file
        detail = " ".join(str(e).split())[:200]
        raise UsageError(
            f"cannot read checkpoint {path}: the file is truncated or is not an llip checkpoint "
            f"({type(e).__name__}: {detail})"
        ) from None
    needed = {"step", "config"} | (set() if sharded and not assemble else {"model"})
    if not isinstance(state, dict) or not needed <= state.keys():
        raise UsageError(f"{path} is not an llip checkpoint (it lacks the step, model and config entries)")
    return state

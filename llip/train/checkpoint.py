"""Atomic checkpoints and the RNG state they carry.

A checkpoint is one ``torch.save`` dict: model, optimiser, scheduler, scaler, RNG states (python, numpy, torch
CPU and CUDA), the step (which is the data position: batches are indexed by step) and the run's arguments.
It is written to a temporary file in the same folder, flushed and fsynced, then renamed over the final name
(``os.replace`` is atomic on POSIX), and the folder is fsynced: a kill at any moment leaves either the old or
the new checkpoint, never a torn one.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError

PATTERN = re.compile(r"^step_(\d+)\.pt$")
TEMP_PATTERN = re.compile(r"^\.step_\d+\.pt\.tmp\d+$")  # what save_atomic writes before the rename


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
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of ``step_<n>.pt`` files in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := PATTERN.match(name))]
    return sorted(found)


def remove_stale_temp_files(folder: str | os.PathLike) -> int:
    """Delete the temporary files that writes interrupted by a kill left in ``folder``; how many there were."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [folder / name for name in os.listdir(folder) if TEMP_PATTERN.match(name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def save_checkpoint(
    state: dict, folder: str | os.PathLike, step: int, keep: int, *, hang_before_rename: bool = False
) -> Path:
    """Write ``folder/step_<step>.pt`` atomically, then delete all but the newest ``keep`` checkpoints."""
    path = Path(folder) / f"step_{step:08d}.pt"
    save_atomic(state, path, hang_before_rename=hang_before_rename)
    if keep > 0:
        for _, old in list_checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def find_resume(resume: str, folder: str | os.PathLike, *, what: str = "--resume") -> Path | None:
    """``resume``: a checkpoint path, a folder of them (its newest), a run folder (the newest in its
    ``checkpoints/``), or ``auto`` (the newest in ``folder``, None when there is none). ``what`` names the
    argument in the error messages."""
    if resume == "auto":
        found = list_checkpoints(folder)
        return found[-1][1] if found else None
    path = Path(resume)
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        if not found:
            raise UsageError(f"{what} {resume}: no step_*.pt checkpoint in that folder (nor in its checkpoints/)")
        return found[-1][1]
    if not path.is_file():
        raise UsageError(f"{what} {resume}: no such checkpoint file or folder")
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's dict; a clear :class:`~llip.errors.UsageError` for a truncated or foreign file."""
    try:
        # weights_only=False: the file holds RNG states (numpy arrays, tuples) we wrote ourselves.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a torn or foreign file
        detail = " ".join(str(e).split())[:200]
        raise UsageError(
            f"cannot read checkpoint {path}: the file is truncated or is not an llip checkpoint "
            f"({type(e).__name__}: {detail})"
        ) from None
    if not isinstance(state, dict) or not {"step", "model", "config"} <= state.keys():
        raise UsageError(f"{path} is not an llip checkpoint (it lacks the step, model and config entries)")
    return state

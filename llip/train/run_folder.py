"""The run folder (``--output``): what a run writes there, and the rule that no run is ever silently mixed into
another.

A run folder holds ``config.json``, ``metrics.jsonl``, ``curves.png``, ``checkpoints/step_*.pt`` (sharded runs:
``step_*.dcp`` folders) and ``tensorboard/``. A new run may start only in a folder without them; continuing one
takes ``--resume``, replacing one ``--overwrite`` (which removes exactly those entries, nothing else, and says so).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import UsageError
from .checkpoint import list_checkpoints

FILES = ("config.json", "metrics.jsonl", "curves.png")
FOLDERS = ("checkpoints", "tensorboard")


def run_contents(out_dir: Path) -> list[str]:
    """What of a run ``out_dir`` holds, described for a message (empty: no run there)."""
    found = [name for name in FILES if (out_dir / name).is_file()]
    ckpts = list_checkpoints(out_dir / "checkpoints")
    if ckpts:
        found.append(f"{len(ckpts)} checkpoint(s) up to step {ckpts[-1][0]}")
    if (out_dir / "tensorboard").is_dir():
        found.append("tensorboard/")
    return found


def check_writable(out_dir: Path, flag: str = "--output") -> None:
    """Create ``out_dir`` if needed and make sure files can be written in it; one clear error if not."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{flag} {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".llip-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to {flag} {out_dir}: {e.strerror or e}") from None


def claim(out_dir: Path, *, resume: str | None, overwrite: bool) -> list[str]:
    """Decide whether a run may use ``out_dir``; with ``overwrite``, first remove the run that is there. Returns
    what was removed (for a message). Raises :class:`~llip.errors.UsageError` if the folder holds a run and neither
    ``resume`` nor ``overwrite`` says what to do with it."""
    if resume is not None and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: continue the run, or replace it")
    contents = run_contents(out_dir) if out_dir.is_dir() else []
    if not contents:
        return []
    if resume is not None:
        if resume != "auto" and not Path(resume).resolve().is_relative_to(out_dir.resolve()):
            raise UsageError(
                f"--output {out_dir} already holds a run ({', '.join(contents)}); continuing {resume} there would "
                f"mix the two: resume into a new --output, or use --resume auto to continue the run in {out_dir}"
            )
        return []
    if not overwrite:
        raise UsageError(
            f"--output {out_dir} already holds a run ({', '.join(contents)}); pass --resume auto to continue it, "
            f"another --output for a new run, or --overwrite to replace it"
        )
    for name in FILES:
        (out_dir / name).unlink(missing_ok=True)
    for name in FOLDERS:
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)
    return contents

"""Test data helper: write a tar shard of named members (the webdataset layout: ``<key>.<ext>`` files)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_shard(path: str | Path, members: list[tuple[str, bytes]]) -> str:
    """Write ``members`` (member name, payload bytes), in order, to the tar file ``path``; returns ``str(path)``."""
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(path)

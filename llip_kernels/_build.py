"""Lazy, cached builds of our C++ / CUDA extensions with ``torch.utils.cpp_extension.load`` and ninja.

Nothing is compiled at import time. The first call of :func:`load_extension` builds into a cache directory
(:func:`llip_kernels.settings.cache_dir`: ``$LLIP_KERNELS_CACHE`` or ``~/.cache/llip_kernels``), in a sub-folder
named after a hash of the sources, the flags, and the torch and Python versions, so machines sharing a cache
never load a stale or foreign build.
The outcome, module or failure, is remembered for the life of the process: a failed build is not retried on
every call, and its message (one readable paragraph naming what is missing) is what backends report as their
``not_supported_reasons``. A compile in progress and a failure are each announced by one line on stderr.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

from . import settings

_results: dict[str, ModuleType | str] = {}
_lock = threading.Lock()


class ExtensionBuildError(RuntimeError):
    """The extension could not be built or loaded; the message says why and what to install."""


def source_dir(*parts: str) -> Path | None:
    """Locate a folder of ``csrc/`` (e.g. ``source_dir("cpu")``): at the repository root next to the package
    (source checkout or editable install), else inside the package (``llip_kernels/csrc``, an installed copy)."""
    pkg = Path(__file__).resolve().parent
    for root in (pkg.parent / "csrc", pkg / "csrc"):
        cand = root.joinpath(*parts)
        if cand.is_dir():
            return cand
    return None


def build_hash(sources: list[Path], flags: list[str], extra: str = "") -> str:
    """Short hash of everything that changes the binary: sources and headers next to them, flags, versions."""
    import torch

    h = hashlib.sha256()
    files = set(sources)
    for src in sources:  # headers beside the sources are inputs too
        files.update(p for p in src.parent.iterdir() if p.suffix in (".h", ".hpp", ".cuh"))
    for path in sorted(files):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update("\0".join(flags).encode())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{extra}".encode())
    return h.hexdigest()[:16]


def missing_tools() -> list[str]:
    """What a CPU build needs and cannot find: a C++ compiler (``$CXX`` or ``c++``) and ninja."""
    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set $CXX)")
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        missing.append("ninja is not installed (pip install ninja)")
    return missing


def load_extension(
    name: str,
    sources: list[Path],
    *,
    extra_cflags: list[str] | None = None,
    extra_ldflags: list[str] | None = None,
    extra_cuda_cflags: list[str] | None = None,
    with_cuda: bool = False,
) -> ModuleType:
    """Build (once) and import extension ``name``; raise :class:`ExtensionBuildError` with a readable message.

    Thread-safe; the result or the failure is cached per ``name`` for the process.
    """
    with _lock:
        if name not in _results:
            try:
                _results[name] = _build(
                    name, sources, extra_cflags or [], extra_ldflags or [], extra_cuda_cflags or [], with_cuda
                )
            except ExtensionBuildError as e:
                _results[name] = str(e)
                _say(f"{e} (the other backends still run; llip_kernels.backend_reasons() lists them)")
        result = _results[name]
    if isinstance(result, str):
        raise ExtensionBuildError(result)
    return result


def _say(message: str) -> None:
    """One line on stderr, once per build: the outcome is cached, so neither line repeats in a process."""
    print(f"llip_kernels: {message}", file=sys.stderr, flush=True)


def cached_failure(name: str) -> str | None:
    """The remembered failure message of ``name``'s build, or None (not tried yet, or it succeeded)."""
    res = _results.get(name)
    return res if isinstance(res, str) else None


def _build(name, sources, cflags, ldflags, cuda_cflags, with_cuda) -> ModuleType:
    missing = [str(p) for p in sources if not Path(p).is_file()]
    if missing:
        raise ExtensionBuildError(f"cannot build {name}: source files not found: {', '.join(missing)}")
    tools = missing_tools()
    if tools:
        raise ExtensionBuildError(f"cannot build the {name} extension: " + "; ".join(tools))
    try:
        from torch.utils import cpp_extension
    except Exception as e:  # pragma: no cover - torch without its build helpers
        raise ExtensionBuildError(f"cannot build {name}: torch.utils.cpp_extension unavailable ({e})") from e
    digest = build_hash([Path(p) for p in sources], cflags + ldflags + cuda_cflags + [str(with_cuda)])
    build_dir = settings.cache_dir() / f"{name}-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob(f"{name}*.so")):  # a compile of a minute or more: say so rather than seem to hang
        _say(f"building the {name} extension (once per version; about a minute on 2 cores) in {build_dir}")
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(p) for p in sources],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            extra_cuda_cflags=cuda_cflags or None,
            with_cuda=with_cuda,
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as e:
        detail = str(e).strip().splitlines()
        tail = " | ".join(line.strip() for line in detail[-6:] if line.strip())
        raise ExtensionBuildError(
            f"building the {name} extension failed ({type(e).__name__}: {tail}); the build folder is {build_dir}"
        ) from e

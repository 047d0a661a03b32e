"""The repository reads on its own: files small enough to read, and comments that cite docs/design.md, not
documents or trackers a reader of the repository cannot see."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".cpp", ".cu", ".h", ".md", ".sh", ".toml", ".cfg", ".txt", ".json"}
SKIP_DIRS = {".git", ".venv", ".venv-cuda", "build", "runs", ".cache", "__pycache__", ".pytest_cache", ".ruff_cache"}
MAX_LINES = 800
# Measurement records written by the benchmarks (one JSON object per row): data, not something one reads through.
DATA = ("bench/results/", "llip/assets/imagenet_classnames.txt")  # data, not text to read

# Assembled from parts so that this file does not match itself.
FORBIDDEN = [
    (re.compile("SP" + r"EC (section|§)"), "cite docs/design.md section N instead of the internal brief"),
    (re.compile(r"\b[Ii]ss" + r"ue [0-9]"), "say what the change is for instead of citing a tracker number"),
]


def _files():
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO)
        if path.is_file() and path.suffix in TEXT_SUFFIXES and not SKIP_DIRS & set(rel.parts[:-1]):
            yield rel


FILES = list(_files())


def test_the_walk_finds_the_sources():
    names = {str(p) for p in FILES}
    assert {"llip_kernels/algebra.py", "docs/design.md", "csrc/cpu/llip_cpu.cpp"} <= names


@pytest.mark.parametrize("rel", [p for p in FILES if not str(p).startswith(DATA)], ids=str)
def test_no_file_is_too_long_to_read(rel):
    lines = (REPO / rel).read_text(errors="replace").count("\n")
    assert lines <= MAX_LINES, f"{rel} has {lines} lines; split it (at most {MAX_LINES})"


def test_no_citation_of_what_a_reader_cannot_see():
    found = []
    for rel in FILES:
        for n, line in enumerate((REPO / rel).read_text(errors="replace").splitlines(), 1):
            for pattern, advice in FORBIDDEN:
                if pattern.search(line):
                    found.append(f"{rel}:{n}: {line.strip()[:80]} ({advice})")
    assert not found, "\n".join(found)

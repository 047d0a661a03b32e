"""The one entry point of the benchmarks: ``python -m bench <subcommand> [args]`` (``--help`` lists them).

Each subcommand is the ``main(argv)`` of one module of this package, imported only when chosen, so listing the
subcommands or asking one for ``--help`` needs neither a GPU nor Triton. Run from the repository root (it puts the
root on ``sys.path``) with the project venv and without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module of bench/, one line of help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "microbenchmarks: ops x modes x providers x shapes -> table + JSON"),
    "scaling": ("scaling", "time and peak memory against batch size, per provider -> JSON + PNG"),
    "e2e": ("e2e", "training-step time of Llip against SigLIP with identical towers -> JSON"),
    "report": ("report", "bench/results/REPORT.md from the saved result files"),
    "compare": ("compare", "regression guard between two result files (exit 1 on a slowdown)"),
    "pooled": ("pooled", "pooled SigLIP / CLIP loss: the plain [B, B] path, the blocked one, Llip with K = 1"),
    "tar-reader": ("tar_reader", "our tar-shard reader against the webdataset library (needs webdataset installed)"),
    "cpu-targets": ("cpu_targets", "the cpu backend's speed, memory and FLOP/s targets at the B/16 head"),
    "triton": ("triton_bench", "GPU: the triton backend at paper shapes -> JSON"),
    "cuda-check": ("cuda_check", "GPU: build and check the cuda backend, time it against the reference -> JSON"),
    "compile-table": ("triton_compile_table", "compile every Triton kernel ahead of time: registers, spills, smem"),
}

PROG = "python -m bench"


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [
        f"usage: {PROG} <subcommand> [args]   ({PROG} <subcommand> --help for its options)",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"{PROG}: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{SUBCOMMANDS[name][0]}")
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())

"""The shape of ``llip_kernels``: public API above dispatch above backends above the shared algebra, no import
running upward and no backend importing a peer (docs/design.md section 9). Read from the source with ``ast``, so
imports inside functions count too; the dispatcher's lazy ``importlib`` of backends is by design not an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import llip_kernels
from llip_kernels import dispatch
from llip_kernels.backends import REQUIRED

PACKAGE = Path(llip_kernels.__file__).resolve().parent

BOTTOM = {"algebra", "settings", "_validate", "_build", "_custom_ops"}
DISPATCH = {"dispatch"}
PUBLIC = {"__init__", "functional", "baselines", "nn", "distributed", "pooled", "open_clip"}
TEST_HELPERS = {"testing"}  # above the public API: it drives ops through it
LAYER_NAMES = ("bottom", "backends", "dispatch", "public", "testing")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts)  # "backends.triton.kernels", "algebra", "__init__"


def _layer(module: str) -> int:
    top = module.split(".")[0]
    if top in BOTTOM:
        return 0
    if top == "backends" or top == "reference":
        return 1
    if top in DISPATCH:
        return 2
    if top in PUBLIC:
        return 3
    if top in TEST_HELPERS:
        return 4
    raise AssertionError(f"llip_kernels/{module}: not assigned to a layer; add it to tests/kernels/test_layers.py")


def _backend_of(module: str) -> str | None:
    """The backend a module belongs to ("backends.triton.kernels" -> "triton", "reference" -> "reference")."""
    parts = module.split(".")
    if parts[0] == "reference":
        return "reference"
    if parts[0] == "backends" and len(parts) > 1 and parts[1] != "__init__":
        return parts[1]
    return None


def _imports(path: Path, source: str | None = None) -> set[str]:
    """Modules of llip_kernels that ``path`` (or ``source`` as if it were at ``path``) imports, relative to the
    package ("algebra", "backends.cpu", ...)."""
    module = _module_name(path)
    package = module.split(".")[:-1]  # the package a relative import starts from
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("llip_kernels."):
                    found.add(alias.name.removeprefix("llip_kernels."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif node.module and node.module.startswith("llip_kernels"):
                base = []
            else:
                continue
            target = base + ([] if not node.module else node.module.removeprefix("llip_kernels").strip(".").split("."))
            target = [p for p in target if p]
            for alias in node.names:  # `from . import settings` imports a module; `from .algebra import Op` a name
                candidate = ".".join([*target, alias.name])
                found.add(candidate if _is_module(candidate) else ".".join(target) or "__init__")
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_upward_and_no_backend_imports_a_peer(path):
    module = _module_name(path)
    mine, backend = _layer(module), _backend_of(module)
    for target in sorted(_imports(path)):
        theirs = _layer(target)
        assert theirs <= mine, (
            f"llip_kernels/{module} ({LAYER_NAMES[mine]}) imports {target} ({LAYER_NAMES[theirs]}): an upward arrow"
        )
        if backend is not None and theirs == 1:
            assert _backend_of(target) == backend, f"backend module {module} imports {target}, another backend"


def test_the_import_reader_sees_imports():
    """The reader finds the imports it must judge (else the layering test above could never fail)."""
    assert {"algebra", "_validate", "settings"} <= _imports(PACKAGE / "backends" / "torch.py")
    assert "dispatch" in _imports(PACKAGE / "functional.py")
    launch = {"settings", "algebra", "backends.triton.interpreter", "backends.triton.kernels"}
    assert launch <= _imports(PACKAGE / "backends" / "triton" / "launch.py")
    # what an offending backend would look like: a peer, the dispatcher, the test helpers
    fake = PACKAGE / "backends" / "triton" / "offender.py"
    source = "from ..torch import flops\nfrom ... import dispatch\nimport llip_kernels.testing\n"
    assert _imports(fake, source) == {"backends.torch", "dispatch", "testing"}


@pytest.mark.parametrize("name", sorted(dispatch.BACKEND_MODULES))
def test_every_backend_implements_the_interface(name):
    mod = dispatch.load_backend(name)
    assert not isinstance(mod, str), mod
    missing = [attr for attr in REQUIRED if not callable(getattr(mod, attr, None))]
    assert not missing, f"backend {name} lacks {missing} (llip_kernels.backends.Backend)"

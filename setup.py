"""Ships ``csrc/`` inside the wheel as ``llip_kernels/csrc`` so that an installed (non-editable) copy can still
build the cpu / cuda extensions on first use (``llip_kernels._build.source_dir`` looks there after the checkout).
Everything else about the package lives in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithKernelSources(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads csrc/ from the checkout itself
            return
        junk = shutil.ignore_patterns("*.so", "*.o", "*.cubin", "__pycache__")  # build leftovers are not sources
        target = Path(self.build_lib) / "llip_kernels" / "csrc"
        shutil.copytree(ROOT / "csrc", target, dirs_exist_ok=True, ignore=junk)


setup(cmdclass={"build_py": BuildPyWithKernelSources})

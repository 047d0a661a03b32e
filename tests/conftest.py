"""Shared pytest set-up. The Makefile runs the suite with TRITON_INTERPRET=1 so Triton kernels run on the CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

"""The CUDA kernels' own source, run on the CPU: ``csrc/cuda/llip_kernels.cu`` compiled as C++ with host threads
standing in for the GPU (``csrc/cuda/emu/cuda_host_emu.h``: real barriers, wmma fragments emulated exactly in float32,
alignment rules of the wmma API enforced, shared memory poisoned with NaN before each block) and checked through
the cuda backend against the fp64 reference with the rule of docs/design.md section 6.

What this catches that tests/kernels/test_cuda_emulated.py cannot: indexing, padding, tiling and tile-loop mistakes,
missing zero-fills, misaligned fragments, and the gradient plumbing of the kernels themselves. What it cannot catch:
real-GPU scheduling races, the hardware's own mma rounding, and launch limits (bench/cuda_check.py covers those).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from llip_kernels.backends import cuda as cuda_backend
from llip_kernels.testing import check_op_against_reference, make_llip_inputs

SRC = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
CUDA_HOME = cuda_backend.cuda_home()
CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(
    CUDA_HOME is None or CXX is None, reason="needs the CUDA headers (cuda_fp16.h) and a C++20 compiler"
)


class _Dims(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("Bi", "Bt", "H", "K", "d", "Kp", "dp", "HKp", "BT")] + [
        ("tau", ctypes.c_float)
    ]


class _Inputs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("k", "v", "q", "u", "g", "gscale", "t", "b")]


class _Grads(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("dk", "dv", "dq", "du", "dg", "dt_part", "db_part")]


class HostKernelExtension:
    """The functions of ``llip_binding.cpp`` (same arguments and outputs) over the host-compiled kernels."""

    def __init__(self, lib_path: Path):
        self.lib = ctypes.CDLL(str(lib_path))
        for name in ("emu_cosine", "emu_sigmoid_fwd", "emu_sigmoid_bwd"):
            getattr(self.lib, name).restype = ctypes.c_char_p
        self.lib.emu_smem_bytes.restype = ctypes.c_size_t
        self.lib.emu_pick_bt.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    @staticmethod
    def _call(k, v, q, u, g, gscale, t, b, tau):
        tensors = [x.contiguous() for x in (k, v, q, u, g, gscale, t, b)]
        Bi, H, K, d = k.shape
        dims = _Dims(Bi, q.shape[0], H, K, d, 0, 0, 0, 0, tau)
        inputs = _Inputs(*[x.data_ptr() for x in tensors])
        dtype = 1 if k.dtype == torch.bfloat16 else 0
        return tensors, dims, inputs, dtype

    def _check(self, err):
        if err is not None:
            raise RuntimeError(err.decode())

    def cosine(self, k, v, q, u, g, gscale, tau):
        one = torch.ones(())
        keep, dims, inputs, dtype = self._call(k, v, q, u, g, gscale, one, one, tau)
        out = torch.full((k.shape[0], q.shape[0]), float("nan"))  # an unwritten entry fails loudly
        self._check(
            self.lib.emu_cosine(dtype, ctypes.byref(inputs), ctypes.byref(dims), ctypes.c_void_p(out.data_ptr()))
        )
        return out

    def sigmoid_fwd(self, k, v, q, u, g, gscale, t, b, tau, pos_offset, has_pos, grid_x):
        keep, dims, inputs, dtype = self._call(k, v, q, u, g, gscale, t, b, tau)
        out = torch.zeros(k.shape[0], grid_x)
        err = self.lib.emu_sigmoid_fwd(
            dtype,
            ctypes.byref(inputs),
            ctypes.byref(dims),
            pos_offset,
            int(has_pos),
            ctypes.c_void_p(out.data_ptr()),
            grid_x,
        )
        self._check(err)
        return out

    def sigmoid_bwd(self, gout, k, v, q, u, g, gscale, t, b, tau, pos_offset, has_pos, deterministic):
        keep, dims, inputs, dtype = self._call(k, v, q, u, g, gscale, t, b, tau)
        Bi = k.shape[0]
        shapes = (k.shape, k.shape, q.shape, q.shape, g.shape, (Bi,), (Bi,))
        outs = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]  # the kernels' float64 accumulators
        grads = _Grads(*[x.data_ptr() for x in outs])
        gout = gout.contiguous()
        err = self.lib.emu_sigmoid_bwd(
            dtype,
            ctypes.byref(inputs),
            ctypes.byref(dims),
            pos_offset,
            int(has_pos),
            ctypes.c_void_p(gout.data_ptr()),
            ctypes.byref(grads),
            int(deterministic),
        )
        self._check(err)
        return tuple(x.float() for x in outs)


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_emu") / "llip_cuda_host_emu.so"
    cmd = [
        CXX,
        "-std=c++20",
        "-O2",
        "-pthread",
        "-shared",
        "-fPIC",
        "-I",
        str(SRC),
        "-I",
        str(Path(CUDA_HOME) / "include"),
        str(SRC / "emu" / "host_emulation.cpp"),
        "-o",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return HostKernelExtension(out)


@pytest.fixture
def host_kernels(host_lib, monkeypatch):
    monkeypatch.setattr(cuda_backend, "extension", lambda: host_lib)
    monkeypatch.setattr(cuda_backend, "not_supported_reasons", lambda problem: [])
    return host_lib


# (Bi, Bt, H, K, d): K = 5 and d = 20 pad inside one 16-tile; K = 17 takes two k-tiles per head and H = 3 makes
# the Gram matrix 96 wide; Bt = 70 is two text tiles (64 + 6), so the tile loop and a partial tile both run, and
# pos_offset = 64 puts the positives (the pairs with large gradients) in that second, partial tile.
CASES = [
    ((3, 5, 2, 5, 20), "gaussian", torch.bfloat16, 1),
    ((3, 5, 2, 5, 20), "non_unit", torch.float16, 1),
    ((2, 70, 3, 17, 16), "peaked", torch.bfloat16, 64),
    ((2, 70, 1, 5, 16), "large_scale", torch.bfloat16, 0),
]


@pytest.mark.parametrize(
    ("shape", "kind", "dtype", "pos_offset"),
    CASES,
    ids=["Bi{}-Bt{}-H{}-K{}-d{}".format(*c[0]) + f"-{c[1]}-{str(c[2])[6:]}-pos{c[3]}" for c in CASES],
)
def test_loss_forward_backward_through_kernel_source(host_kernels, shape, kind, dtype, pos_offset):
    x = make_llip_inputs(*shape, kind=kind, dtype=dtype, seed=7)
    check_op_against_reference("sigmoid_loss", x, "cuda", pos_offset=pos_offset)


def test_cosine_through_kernel_source(host_kernels):
    x = make_llip_inputs(3, 70, 2, 5, 20, dtype=torch.bfloat16, seed=8, requires_grad=False)
    check_op_against_reference("logits", x, "cuda", with_grad=False)


def test_opcheck_with_real_implementation(host_kernels):
    """Every torch.library.opcheck test (schema, fake vs real, autograd registration, AOT dispatch), with the real
    implementation running the kernel source."""
    x = make_llip_inputs(3, 5, 2, 5, 20, dtype=torch.bfloat16, seed=9)
    u, g = cuda_backend.text_and_gram(x.v.detach(), x.y.detach(), x.w_out.detach())
    args = (x.k, x.v, x.q, u.requires_grad_(), g.requires_grad_(), x.t, x.b, x.tau, 0, True, False)
    torch.library.opcheck(torch.ops.llip_kernels.cuda_sigmoid_loss.default, args)
    with torch.no_grad():
        torch.library.opcheck(torch.ops.llip_kernels.cuda_cosine.default, (x.k, x.v, x.q, u, g, x.tau))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_backward_modes_agree_and_deterministic_repeats(host_kernels, monkeypatch, deterministic):
    """The deterministic backward (image-side launch, then text-side launch without atomics) passes the reference
    check on two text tiles, agrees with the atomics path, and repeats bit for bit."""
    monkeypatch.setenv("LLIP_KERNELS_DETERMINISTIC", "1" if deterministic else "0")
    x = make_llip_inputs(3, 70, 2, 5, 16, kind="large_scale", dtype=torch.bfloat16, seed=10)
    check_op_against_reference("sigmoid_loss", x, "cuda", pos_offset=60)
    grads = []
    for _ in range(2):
        loss = cuda_backend.sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, pos_offset=60)
        grads.append(torch.autograd.grad(loss, [x.k, x.v, x.q, x.y, x.w_out, x.t, x.b]))
    if deterministic:
        for a, b in zip(*grads):
            assert torch.equal(a, b)


# (H, K, d, BT, backward): paper heads B/16 and G/14 (whose backward needs BT = 32), odd padded shapes, and the K = 512
# ablation that does not fit at all.
PLANS = [
    (8, 32, 64, 64, 0),
    (8, 32, 64, 64, 1),
    (8, 64, 160, 32, 1),
    (3, 5, 48, 16, 0),
    (1, 65, 20, 32, 1),
    (8, 512, 64, 16, 0),
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "H{}-K{}-d{}-BT{}-bwd{}".format(*p))
def test_shared_memory_plan_matches_python_mirror(host_lib, plan):
    """llip_kernels/cuda_backend.py mirrors the kernels' shared-memory map to give reasons before building anything."""
    H, K, d, BT, backward = plan
    Kp = (K + 15) // 16 * 16
    dims = _Dims(1, 1, H, K, d, Kp, (d + 15) // 16 * 16, H * Kp, BT, 1.0)
    smem = cuda_backend.smem_bytes(H, K, d, BT, bool(backward))
    assert host_lib.lib.emu_smem_bytes(ctypes.byref(dims), backward) == smem
    limit = 227 * 1024 - 1024
    bt = cuda_backend.pick_bt(H, K, d, bool(backward))
    assert host_lib.lib.emu_pick_bt(ctypes.byref(dims), backward, limit) == bt

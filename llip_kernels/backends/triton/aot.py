"""Ahead-of-time compilation of the kernels for a GPU target, with resource usage (no GPU needed).

Used by ``python -m bench compile-table`` and the tests. Must run in a process WITHOUT ``TRITON_INTERPRET`` (the
interpreter replaces ``@triton.jit`` functions). The launch specs come from the same :func:`.launch.tile_config`,
:func:`.launch.precision_for` and :func:`.launch.unused_pointers` the launcher uses, so what is compiled here is what
runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

from ...algebra import PAIR_OPS, Op

# name: (K, H, d) of docs/design.md section 2
PAPER_CONFIGS = {
    "B/32": (64, 8, 64),
    "B/16": (32, 8, 64),
    "L/14": (64, 8, 96),
    "H/14": (64, 8, 128),
    "G/14": (64, 8, 160),
}
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes per block (opt-in maximum)
_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class KernelSpec:
    label: str  # e.g. "backward[op=sigmoid_loss,pass=atomic]"
    fn: object
    constexprs: dict  # including the pointer arguments passed as None
    float64: tuple  # pointer arguments of float64 buffers
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # ptxas register cap, as the launcher passes it


def launch_specs(H: int, K: int, d: int, dtype: torch.dtype, Bt: int = 32768, capability: int = 90) -> list[KernelSpec]:
    """Every kernel variant the launcher can use for this head shape and dtype at a large text batch on a GPU
    of compute capability ``capability`` (90 = sm_90a, 80 = sm_80)."""
    from .kernels import forward_kernel
    from .kernels_backward import backward_kernel
    from .launch import (
        ATOMIC_PASSES,
        DETERMINISTIC_PASSES,
        float64_pointers,
        launch_constexprs,
        precision_for,
        tile_config,
        unused_pointers,
    )

    prec = precision_for(dtype)

    def config(backward: bool, text_pass: bool = False):
        cfg = tile_config(H, K, d, Bt, backward=backward, capability=capability, lowp=prec.lowp, text_pass=text_pass)
        return launch_constexprs(H, K, d, cfg, prec, backward), (cfg.num_warps, cfg.num_stages, cfg.maxnreg)

    consts, opts = config(backward=False)
    specs = []
    for op in PAIR_OPS:
        for text_stationary in (False, True) if op == Op.SOFTMAX_LOSS else (False,):
            label = f"forward[op={op}" + (",text-stationary]" if text_stationary else "]")
            c = dict(consts, OP=op.code, TEXT_STATIONARY=text_stationary)
            specs.append(KernelSpec(label, forward_kernel, c, float64_pointers("forward", op), *opts))
    for op in PAIR_OPS:
        for pass_ in ATOMIC_PASSES + DETERMINISTIC_PASSES:
            consts, opts = config(backward=True, text_pass=pass_ == "text")
            c = dict(consts, OP=op.code, PASS=pass_, **dict.fromkeys(unused_pointers("backward", op, pass_)))
            label = f"backward[op={op},pass={pass_}]"
            specs.append(KernelSpec(label, backward_kernel, c, float64_pointers("backward", op), *opts))
    return specs


def _signature(fn, constexprs: dict, dtype: torch.dtype, float64: tuple = ()) -> dict:
    from .launch import precision_for

    io = _TL_DTYPE[dtype]
    gram = _TL_DTYPE[precision_for(dtype).gram_dtype]
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("q_ptr", "k_ptr", "u_ptr", "v_ptr"):
            sig[name] = "*" + io
        elif name == "gram_ptr":
            sig[name] = "*" + gram
        elif name in float64:
            sig[name] = "*fp64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in ("scale2", "inv_tau"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers and spill bytes from ``ptxas -v`` (the metadata of a kernel compiled without a GPU lacks them)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return dict(
        registers=int(regs.group(1)) if regs else -1,
        spill_stores=int(stores.group(1)) if stores else 0,
        spill_loads=int(loads.group(1)) if loads else 0,
    )


def compile_spec(spec: KernelSpec, dtype: torch.dtype, capability: int) -> dict:
    """Compile one kernel for ``sm_<capability>`` (90 -> sm_90a) and report its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = _signature(spec.fn, spec.constexprs, dtype, spec.float64)
    src = ASTSource(fn=spec.fn, signature=signature, constexprs=spec.constexprs)
    target = GPUTarget("cuda", capability, 32)
    options = dict(num_warps=spec.num_warps, num_stages=spec.num_stages)
    if spec.maxnreg is not None:
        options["maxnreg"] = spec.maxnreg
    k = triton.compile(src, target=target, options=options)
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    usage = _ptxas_usage(k.asm["ptx"], arch)
    smem = int(k.metadata.shared)
    return dict(
        kernel=spec.label,
        arch=arch,
        dtype=_TL_DTYPE[dtype],
        shared_bytes=smem,
        smem_ok=smem <= SMEM_LIMIT[capability],
        num_warps=spec.num_warps,
        maxnreg=spec.maxnreg,
        **usage,
        wgmma="wgmma" in k.asm["ptx"],
    )

"""Ahead-of-time compilation of the kernels for a GPU target, with resource usage (no GPU needed).

Used by ``bench/triton_compile_table.py`` and ``tests/test_triton_compile.py``. Must run in a process
WITHOUT ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions). The launch specs come from
the same :func:`._ops.tile_config` / :func:`._ops.precision_for` the launcher uses, so what is compiled here
is what runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

# name: (K, H, d) of SPEC section 2
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
    label: str  # e.g. "bwd_image[MODE=1,atomic]"
    fn: object
    constexprs: dict
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # ptxas register cap, as the launcher passes it


def launch_specs(H: int, K: int, d: int, dtype: torch.dtype, Bt: int = 32768, capability: int = 90) -> list[KernelSpec]:
    """Every kernel variant the launcher can use for this head shape and dtype at a large text batch on a GPU
    of compute capability ``capability`` (90 = sm_90a, 80 = sm_80)."""
    from ._kernels import _fwd_image_kernel, _fwd_text_kernel
    from ._kernels_bwd import _bwd_image_kernel, _bwd_text_kernel
    from ._ops import precision_for, tile_config

    p = precision_for(dtype)

    def base(backward: bool):
        cfg = tile_config(H, K, d, Bt, backward, capability, p.LOWP)
        consts = dict(
            H=H,
            K=K,
            d=d,
            BT=cfg.BT,
            BK=cfg.BK,
            BD=cfg.BD,
            BG=cfg.BG,
            LOWP=p.LOWP,
            PREC=p.PREC,
            G_LOWP=p.G_LOWP,
            G_PREC=p.G_PREC,
        )
        return consts, (cfg.num_warps, cfg.num_stages, cfg.maxnreg)

    fwd, o = base(False)
    specs = [KernelSpec(f"fwd_image[MODE={m}]", _fwd_image_kernel, dict(fwd, MODE=m), *o) for m in (0, 1, 2)]
    specs.append(KernelSpec("fwd_text", _fwd_text_kernel, dict(fwd), *o))
    bwd, o = base(True)
    # atomics (default) or ordered (deterministic mode, followed by the text-stationary pass)
    for m in (0, 1, 2):
        for name, atomic in (("atomic", True), ("ordered", False)):
            consts = dict(bwd, MODE=m, DG_PREC=p.DG_PREC, DO_TXT=atomic, IMG_ATOMIC=atomic)
            specs.append(KernelSpec(f"bwd_image[MODE={m},{name}]", _bwd_image_kernel, consts, *o))
        specs.append(KernelSpec(f"bwd_text[MODE={m}]", _bwd_text_kernel, dict(bwd, MODE=m), *o))
    return specs


def _signature(fn, constexprs: dict, dtype: torch.dtype) -> dict:
    from ._ops import precision_for

    io = _TL_DTYPE[dtype]
    gram = _TL_DTYPE[precision_for(dtype).gram_dtype]
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("q_ptr", "k_ptr", "u_ptr", "v_ptr"):
            sig[name] = "*" + io
        elif name == "g_ptr":
            sig[name] = "*" + gram
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

    src = ASTSource(fn=spec.fn, signature=_signature(spec.fn, spec.constexprs, dtype), constexprs=spec.constexprs)
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

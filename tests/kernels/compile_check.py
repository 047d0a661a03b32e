"""``python tests/kernels/compile_check.py BACKEND COMPILER``: every public op compiled with
``torch.compile(fullgraph=True)``, forward and backward, on ``BACKEND``, against the same op run eagerly.

Run in a fresh process by ``test_compile.py``, so that its first compile is a cold start: nothing of the backend has
run before. Then the other ops, then ``dynamic=True`` on two batch shapes (one graph must serve both). Prints one
line per case and ``ok`` at the end; any mismatch or compile error raises.
"""

from __future__ import annotations

import sys

import torch

import llip_kernels as lk
from llip_kernels.testing import INPUT_NAMES, check_same_result, make_llip_inputs

OPS = ("sigmoid_loss", "logits", "softmax_loss")


TAU = 5.0  # a constant of the model, as in training (not an input of the compiled function)


def call(op: str, backend: str, k, v, q, y, w_out, t, b, tau: float = TAU):
    if op == "logits":
        return lk.llip_logits(k, v, q, y, w_out, tau=tau, logit_scale=t, logit_bias=b, backend=backend)
    if op == "sigmoid_loss":
        return lk.llip_sigmoid_loss(k, v, q, y, w_out, t, b, tau=tau, backend=backend)
    return lk.llip_softmax_loss(k, v, q, y, w_out, t, tau=tau, backend=backend)


def forward_backward(fn, op: str, Bi: int, Bt: int):
    """``fn``'s output and the gradients of a fixed cotangent w.r.t. every input."""
    x = make_llip_inputs(Bi, Bi if op == "softmax_loss" else Bt, 2, 5, 16, seed=Bi)
    tensors = [getattr(x, n) for n in INPUT_NAMES]
    out = fn(*tensors)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, tensors, cot, allow_unused=True)
    return out.detach(), [torch.zeros(()) if g is None else g for g in grads]


def main(backend: str, compiler: str) -> None:
    for dynamic in (False, True):
        for op in OPS:
            torch._dynamo.reset()

            def eager(*args, op=op):
                return call(op, backend, *args)

            compiled = torch.compile(eager, fullgraph=True, dynamic=dynamic, backend=compiler)
            for Bi, Bt in ((3, 5), (4, 7)) if dynamic else ((3, 5),):
                got, got_grads = forward_backward(compiled, op, Bi, Bt)
                want, want_grads = forward_backward(eager, op, Bi, Bt)
                # the same kernels either way; only the order of a few float32 sums may differ
                check_same_result(f"{op} output", got, want, dtype=torch.float32, terms=Bi * Bt)
                for name, g, w in zip(INPUT_NAMES, got_grads, want_grads):
                    check_same_result(f"{op} d{name}", g, w, dtype=torch.float32, terms=Bi * Bt)
            print(f"{backend} {compiler} {op} dynamic={dynamic}: ok", flush=True)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Registering a backend's kernels as ``torch.library`` custom ops, in one place.

A compiled kernel reaches autograd and ``torch.compile`` as a custom op ``torch.ops.llip_kernels.<name>``: a real
implementation (calls the extension), a fake one (shapes only, so ``torch.compile`` traces it and meta tensors
work without the extension) and, for a differentiable op, a backward that is itself a custom op. The pattern is
the same for every kernel, so backends declare it with :func:`define` and :func:`differentiate_with`::

    cos = define("cpu_cos", cpu_cos_impl, fake=lambda k, v, q, u, m, tau, ti, tj: k.new_empty(...))
    cos_backward = define("cpu_cos_backward", ..., fake=...)
    differentiate_with(cos, cos_backward, tensor_inputs=5)

Schemas are inferred from the implementation's type hints (``torch.library.custom_op``), so each implementation
keeps its typed signature; the tensor inputs come first, plain parameters (``tau``, tile sizes, flags) after.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Sequence

import torch

from ._validate import autocast_off

NAMESPACE = "llip_kernels"


def define(name: str, impl: Callable, *, fake: Callable) -> torch.library.CustomOpDef:
    """Register ``impl`` as the custom op ``llip_kernels::<name>`` (no input is mutated) with its fake twin.

    ``impl`` runs with autocast off on its tensors' device: a custom op has no autocast rule, so autocast would
    otherwise reach the plain torch ops inside it, e.g. when a backward pass is run inside an autocast region."""

    @functools.wraps(impl)
    def impl_without_autocast(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        with autocast_off(tensors[0].device) if tensors else contextlib.nullcontext():
            return impl(*args, **kwargs)

    # The schema is inferred from the signature; resolve impl's type hints in impl's module, not this one.
    impl_without_autocast.__signature__ = inspect.signature(impl, eval_str=True)

    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl_without_autocast, mutates_args=())
    op.register_fake(fake)
    return op


def differentiate_with(
    op: torch.library.CustomOpDef,
    backward_op: Callable,
    *,
    tensor_inputs: int,
    saved_outputs: Sequence[int] = (),
) -> None:
    """Give ``op`` the gradient computed by ``backward_op``.

    ``op``'s first ``tensor_inputs`` arguments are tensors and the rest plain parameters. The backward is called
    as ``backward_op(grad, *tensor inputs, *op outputs listed in saved_outputs, *parameters)`` and returns one
    gradient per tensor input; the parameters get None. ``grad`` is the cotangent of ``op``'s first output (the
    others, e.g. log-sum-exps kept for the backward pass, are not differentiated)."""

    def setup_context(ctx, inputs, output):
        saved = list(inputs[:tensor_inputs]) + [output[i] for i in saved_outputs]
        ctx.save_for_backward(*saved)
        ctx.params = tuple(inputs[tensor_inputs:])

    def backward(ctx, grad, *_grads_of_other_outputs):
        grads = backward_op(grad, *ctx.saved_tensors, *ctx.params)
        return (*grads, *([None] * len(ctx.params)))

    op.register_autograd(backward, setup_context=setup_context)


@contextlib.contextmanager
def autograd_inside():
    """Autograd for the body of a custom op's kernel. Kernels run below the autograd dispatch keys (the op's
    registered backward is what differentiates it), so a kernel that differentiates pieces of itself, as the torch
    backend's recomputing backward does with ``torch.autograd.grad`` on each chunk, must put those keys back."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther):
        excluded = excluded.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), torch.enable_grad():
        yield

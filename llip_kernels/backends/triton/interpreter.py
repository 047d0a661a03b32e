"""A fix for the Triton CPU interpreter, applied only when ``TRITON_INTERPRET=1``.

The interpreter (triton 3.6) stores bfloat16 tensors as raw ``uint16`` bit patterns and its ``create_dot``
hands them straight to ``np.matmul``, which then multiplies the integers (upstream: triton-lang/triton#11584): every
bf16 ``tl.dot`` is garbage on the CPU although it is right on a GPU. We wrap ``create_dot`` so bf16 operands
are widened to float32 first (exact: bf16 is the top half of an fp32). Compiled kernels are not affected.
"""

from __future__ import annotations

from ... import settings

_patched = False


def _bf16_bits_to_f32(x):
    import numpy as np

    bits = np.ascontiguousarray(x).view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32)


def patch_interpreter_bf16_dot() -> None:
    """Idempotent; a no-op unless the interpreter is on."""
    global _patched
    if _patched or not settings.triton_interpreting():
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            a_data = _bf16_bits_to_f32(a.data) if a.dtype == tl.bfloat16 else a.data.astype("float32")
            b_data = _bf16_bits_to_f32(b.data) if b.dtype == tl.bfloat16 else b.data.astype("float32")
            import numpy as np

            out = np.matmul(a_data, b_data, dtype=np.float32).astype(d.data.dtype) + d.data
            return interpreter.TensorHandle(out, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    _patched = True

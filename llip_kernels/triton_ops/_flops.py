"""FLOPs of what the triton backend runs (form 3 of SPEC section 4), without importing Triton.

Per (image, text) pair, forward: scores 2KD + value dots 2KD + quadratic form 2(HK)^2 = 4KD + 2(HK)^2.
Backward recomputes the forward with ``P = G a`` kept (same count) and adds dK, dV, dQ, dU (2KD each) and
dG (2(HK)^2): 8KD + 2(HK)^2 more. The deterministic mode recomputes the forward once more in the
text-stationary pass (4KD + 2(HK)^2, dQ and dU moving there). When K spans several tiles the value dots are
recomputed once more per head in the backward (+2KD). The softmax loss runs the forward twice (row and
column statistics). Precomputations: V' (2KD^2 per image), G = V'V'^T (2(HK)^2 D per image),
U = W_out y_hat (2D^2 per text), and their backward (about twice each).
"""

from __future__ import annotations


def pair_flops(
    H: int, K: int, d: int, *, backward: bool, deterministic: bool = False, multi_k_tile: bool = False
) -> float:
    """FLOPs per (image, text) pair of the kernels (forward, or forward recomputation + backward)."""
    D = H * d
    HK = H * K
    fwd = 4 * K * D + 2 * HK * HK
    if not backward:
        return float(fwd)
    bwd = fwd + 8 * K * D + 2 * HK * HK
    if multi_k_tile:
        bwd += 2 * K * D
    if deterministic:
        bwd += fwd
    return float(bwd)


def flops(
    op: str,
    Bi: int,
    Bt: int,
    H: int,
    K: int,
    d: int,
    backward: bool = False,
    *,
    deterministic: bool = False,
    block_k: int = 32,
) -> float:
    """FLOPs the triton backend performs for ``op`` (``logits``, ``sigmoid_loss``, ``softmax_loss``): the forward
    pass, or the backward pass alone when ``backward`` (the convention of every backend's ``flops``; a training
    step costs the sum). Counts the pair work and the precomputations.
    ``block_k``: the backward's token tile (``_ops.MAX_BLOCK_K_BWD``); K beyond it costs a recomputation."""
    if op not in ("logits", "sigmoid_loss", "softmax_loss"):
        raise ValueError(f"op must be logits, sigmoid_loss or softmax_loss, got {op!r}")
    D = H * d
    HK = H * K
    pre = Bi * (2 * K * D * D + 2 * HK * HK * D) + Bt * 2 * D * D
    if backward:
        multi = block_k < K
        pair = pair_flops(H, K, d, backward=True, deterministic=deterministic, multi_k_tile=multi)
        return float(Bi * Bt * pair + 2 * pre)
    passes = 2 if op == "softmax_loss" else 1
    return float(passes * Bi * Bt * pair_flops(H, K, d, backward=False) + pre)

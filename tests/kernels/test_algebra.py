"""The shared algebra (llip_kernels/algebra.py): the FLOP model against docs/design.md section 4's table, the form
choice, the form-3 precomputations against their definitions in float64, the positives window, and the op codes
that the compiled kernels switch on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llip_kernels import algebra
from llip_kernels.algebra import Op

# (K, H, d) -> forward MFLOP per pair of forms 1, 2, 3 (docs/design.md section 4, rounded to 2 decimals)
PAPER_TABLE = {
    "B/16": ((32, 8, 64), (0.59, 0.29, 0.20)),
    "B/32": ((64, 8, 64), (0.66, 0.59, 0.66)),
    "L/14": ((64, 8, 96), (1.38, 0.88, 0.72)),
    "H/14": ((64, 8, 128), (2.36, 1.18, 0.79)),
    "G/14": ((64, 8, 160), (3.60, 1.47, 0.85)),
}


@pytest.mark.parametrize("config", PAPER_TABLE)
def test_pair_flops_match_the_design_table(config):
    (K, H, d), mflops = PAPER_TABLE[config]
    got = [algebra.pair_flops(form, H, K, d) / 1e6 for form in (1, 2, 3)]
    assert [round(x, 2) for x in got] == list(mflops)


def test_flop_formulas():
    H, K, d = 3, 5, 7
    D = H * d
    assert algebra.pair_flops(1, H, K, d) == 4 * K * D + 2 * D * D
    assert algebra.pair_flops(2, H, K, d) == 2 * K * D * (1 + H)
    assert algebra.pair_flops(3, H, K, d) == 4 * K * D + 2 * (H * K) ** 2
    assert algebra.pair_grad_flops(H, K, d) == 8 * K * D + 2 * (H * K) ** 2
    assert algebra.image_flops(3, H, K, d) == 2 * K * D * D + 2 * (H * K) ** 2 * D
    assert algebra.image_flops(3, H, K, d, gram_from_m=True) == 2 * K * D * D + 2 * (H * K) ** 2 * d
    assert algebra.text_flops(3, H, d) == 2 * D * D and algebra.text_flops(2, H, d) == 0
    assert algebra.call_flops(2, 4, 6, H, K, d) == 24 * algebra.pair_flops(2, H, K, d) + 4 * 2 * K * D * D
    with pytest.raises(ValueError, match="form must be"):
        algebra.pair_flops(4, H, K, d)


def test_cheapest_form():
    # per pair: form 3 at B/16, L/14, G/14; form 2 at B/32; form 1 for the ablations' K = 512
    per_pair = [algebra.cheapest_form("logits", 8, K, d) for K, d in [(32, 64), (64, 96), (64, 160), (64, 64)]]
    assert per_pair == [3, 3, 3, 2]
    assert algebra.cheapest_form("logits", 8, 512, 64) == 1
    assert algebra.cheapest_form(Op.MIX, 8, 32, 64) == 2  # mix needs z: never form 3
    # with the batch: 128 texts do not pay for the Gram matrices at B/16, 32k do
    assert algebra.cheapest_form("logits", 8, 32, 64, 128, 128) != 3
    assert algebra.cheapest_form("logits", 8, 32, 64, 256, 32768) == 3


@pytest.mark.parametrize(
    "Bi,Bt,offset,expected",
    [(4, 6, 0, (0, 4)), (4, 6, 2, (0, 4)), (4, 6, 3, (0, 3)), (4, 6, -2, (2, 4)), (4, 6, 9, (0, 0)), (4, 6, -9, None)],
)
def test_positives(Bi, Bt, offset, expected):
    rows = algebra.positives(Bi, Bt, offset)
    assert all(0 <= i + offset < Bt for i in rows)  # every listed image has its positive text here...
    assert len(rows) == sum(0 <= i + offset < Bt for i in range(Bi))  # ...and no other image has one
    if expected is not None:
        assert (rows.start, rows.stop) == expected
    assert len(algebra.positives(Bi, Bt, None)) == 0
    labels = algebra.sigmoid_labels(Bi, Bt, offset, "cpu")
    assert int((labels == 1).sum()) == len(rows)


def test_precomputations_match_their_definitions():
    """U = W_out y_hat, V' per head, G = V' V'^T (also padded, and via M = W W^T), in float64."""
    g = torch.Generator().manual_seed(0)
    Bi, Bt, H, K, d = 3, 4, 2, 5, 3
    D = H * d
    v = torch.randn(Bi, H, K, d, generator=g, dtype=torch.float64)
    y = torch.randn(Bt, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, D, generator=g, dtype=torch.float64)
    u = algebra.text_projection(y, w)
    torch.testing.assert_close(u, torch.stack([w @ F.normalize(y[j], dim=0) for j in range(Bt)]))
    vp = algebra.projected_values(v, w)  # [Bi, HK, D]
    for h in range(H):
        torch.testing.assert_close(vp[:, h * K : (h + 1) * K], v[:, h] @ w[h * d : (h + 1) * d])
    gram = algebra.gram_matrices(v, w)
    torch.testing.assert_close(gram, vp @ vp.transpose(1, 2))
    padded = algebra.gram_matrices(v, w, pad_tokens_to=16)  # [Bi, H*16, H*16], zeros in the padding
    assert padded.shape == (Bi, 32, 32)
    for h in range(H):
        for g2 in range(H):
            block = padded[:, h * 16 : h * 16 + K, g2 * 16 : g2 * 16 + K]
            torch.testing.assert_close(block, gram[:, h * K : (h + 1) * K, g2 * K : (g2 + 1) * K])
    assert padded.abs().sum() == pytest.approx(gram.abs().sum())
    m = algebra.gram_factor(w)  # G_i[(h,k),(g,l)] = V_i[h,k] M[h-block, g-block] V_i[g,l]^T
    via_m = torch.einsum("ihkc,hcge,igle->ihkgl", v, m.view(H, d, H, d), v).reshape(Bi, H * K, H * K)
    torch.testing.assert_close(via_m, gram)


def test_mix_aligned_is_the_mixer():
    g = torch.Generator().manual_seed(1)
    B, H, K, d, tau = 3, 2, 4, 5, 0.7
    k, v = torch.randn(B, H, K, d, generator=g), torch.randn(B, H, K, d, generator=g)
    q, w = torch.randn(B, H, d, generator=g), torch.randn(H * d, H * d, generator=g)
    z = algebra.mix_aligned(k, v, q, w, tau)
    for i in range(B):
        heads = [torch.softmax(k[i, h] @ q[i, h] / tau, dim=0) @ v[i, h] for h in range(H)]
        torch.testing.assert_close(z[i], torch.cat(heads) @ w, rtol=1e-5, atol=1e-5)


def test_op_names_and_codes():
    assert [(op.value, op.code) for op in Op] == [("logits", 0), ("sigmoid_loss", 1), ("softmax_loss", 2), ("mix", 3)]
    assert Op("sigmoid_loss") is Op.SIGMOID_LOSS and Op.SIGMOID_LOSS == "sigmoid_loss"
    assert algebra.PAIR_OPS == (Op.LOGITS, Op.SIGMOID_LOSS, Op.SOFTMAX_LOSS)


def test_triton_kernels_use_the_same_codes():
    pytest.importorskip("triton")
    from llip_kernels.backends.triton import kernels

    codes = (kernels.OP_LOGITS.value, kernels.OP_SIGMOID_LOSS.value, kernels.OP_SOFTMAX_LOSS.value)
    assert codes == tuple(op.code for op in algebra.PAIR_OPS)


def test_cpu_kernel_uses_the_same_codes():
    from llip_kernels.backends import cpu

    if cpu.environment_reasons():
        pytest.skip("; ".join(cpu.environment_reasons()))
    ext = cpu.extension()
    codes = (ext.OP_LOGITS, ext.OP_SIGMOID_LOSS, ext.OP_SOFTMAX_LOSS)
    assert codes == tuple(op.code for op in algebra.PAIR_OPS)

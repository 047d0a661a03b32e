"""The torch backend's memory is bounded by its chunk budget in practice, not only on paper: peak RSS of one
forward + backward of the sigmoid loss at the B/16 head, measured by ``bench.memory`` in a fresh process.

Its live tensors are a few chunk budgets (the chunk itself, its recomputation, autograd's buffers) plus the
inputs' gradients and the text-side tensors, a few times the inputs: that is the bound. Before the backward pass
detached ``t`` and ``b``, every chunk's autograd graph hung on ``dt`` and ``db`` until the end, and the peak grew
with Bi * Bt (9.5 GB at Bi = Bt = 1024; 1.4 GB here)."""

from __future__ import annotations

from bench.memory import measure_subprocess
from bench.providers import Case
from llip_kernels import settings


def test_torch_backend_peak_rss_stays_within_its_budget(monkeypatch):
    monkeypatch.setenv(settings.TORCH_BUDGET_MB, "32")
    Bi = Bt = 384
    K, H, d = 32, 8, 64  # the B/16 head
    got = measure_subprocess(Case("sigmoid_loss", "fwd+bwd", "torch", "B/16", Bi, Bt), timeout_s=600, threads=1)
    assert "error" not in got, got
    inputs = 4 * (2 * Bi * H * K * d + 2 * Bt * H * d + (H * d) ** 2)  # bytes of k, v, q, y, w_out in float32
    bound = 4 * 32 * 2**20 + 4 * inputs
    assert got["peak_bytes"] <= bound, (
        f"peak RSS {got['peak_bytes'] / 2**20:.0f} MiB above the baseline > {bound / 2**20:.0f} MiB "
        f"(4 chunk budgets + 4x the inputs); {got['method']}"
    )

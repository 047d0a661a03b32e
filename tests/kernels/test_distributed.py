"""llip_kernels.distributed on 3 CPU processes (gloo; 3, not 2, so that a ring run the wrong way round fails):
each rank's loss and gradients against the single-process loss of the concatenated batch, in float64 so that
any normalisation or routing mistake shows.

The contract (see the module docstring): ``mean_r L_r == L``; each rank's activation gradients are
``W * dL/d(its slice)`` (the gathered texts' gradients are summed back to their owner); DDP averages parameter
gradients, so ``mean_r dL_r/dparam == dL/dparam``.

One launch runs every case (each process spends seconds importing torch): this file is also the worker script.
"""

import os
import subprocess
import sys
import tempfile

import pytest
import torch

import llip_kernels as lk
from llip_kernels import distributed as lkd
from llip_kernels.open_clip import ClipLoss, SigLipLoss
from llip_kernels.testing import check_same_result, make_llip_inputs

WORLD = 3
# name -> (local batch sizes per rank, exchange mode or "softmax", backend). Unequal sizes check the W/N
# normalisation (and, for the softmax, which columns each rank owns).
LLIP_CASES = {
    "all_gather-torch": ((3, 3, 3), "all_gather", "torch"),
    "ring-torch": ((3, 3, 3), "ring", "torch"),
    "all_gather-reference": ((3, 3, 3), "all_gather", "reference"),
    "ring-reference-unequal": ((2, 4, 1), "ring", "reference"),
    "all_gather-torch-unequal": ((4, 1, 3), "all_gather", "torch"),
    "softmax-torch": ((3, 3, 3), "softmax", "torch"),
    "softmax-reference-unequal": ((2, 4, 1), "softmax", "reference"),
}
POOLED_CASES = {
    "sigmoid": (3, 3, 3),
    "softmax": (3, 3, 3),
    "softmax-unequal": (2, 5, 1),
    "sigmoid-unequal": (5, 2, 3),
    "sigmoid-blocked-unequal": (5, 2, 3),
    "sigmoid-open_clip": (3, 3, 3),
    "softmax-open_clip": (3, 3, 3),
}
# blocked: llip_kernels.pooled scoring 2 image rows at a time; open_clip: the drop-in modules of llip_kernels.open_clip
H, K, d = 2, 5, 4
PARAMS = ("w_out", "t", "b")
ACTIVATIONS = ("k", "v", "q", "y")


def _llip_inputs(n: int):
    return make_llip_inputs(n, n, H, K, d, kind="non_unit", dtype=torch.float64, seed=n)


def _pooled_inputs(n: int):
    g = torch.Generator().manual_seed(n)
    img = torch.randn(n, 6, generator=g, dtype=torch.float64)
    txt = torch.randn(n, 6, generator=g, dtype=torch.float64)
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    return {n_: x.clone().requires_grad_() for n_, x in dict(img=img, txt=txt, t=t, b=b).items()}


def _run_llip(x, sizes, rank, mode, backend):
    """This rank's slice of the global batch -> (loss, {name: grad})."""
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    local = {n: getattr(x, n)[lo:hi].detach().clone().requires_grad_() for n in ACTIVATIONS}
    params = {n: getattr(x, n) for n in (PARAMS[:2] if mode == "softmax" else PARAMS)}
    args = (local["k"], local["v"], local["q"], local["y"], params["w_out"], params["t"])
    if mode == "softmax":
        loss = lkd.llip_softmax_loss_distributed(*args, tau=x.tau, backend=backend)
    else:
        loss = lkd.llip_sigmoid_loss_distributed(*args, params["b"], tau=x.tau, mode=mode, backend=backend)
    named = {**local, **params}
    grads = torch.autograd.grad(loss, list(named.values()))
    return loss.detach(), dict(zip(named, grads))


def _run_pooled(x, sizes, rank, kind):
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    img, txt = (x[n][lo:hi].detach().clone().requires_grad_() for n in ("img", "txt"))
    W = len(sizes)
    if kind == "sigmoid-open_clip":
        loss = SigLipLoss(rank=rank, world_size=W, block=2)(image_features=img, text_features=txt,
                                                            logit_scale=x["t"], logit_bias=x["b"])  # fmt: skip
    elif kind == "softmax-open_clip":
        clip = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=W)
        loss = clip(image_features=img, text_features=txt, logit_scale=x["t"], output_dict=True)["contrastive_loss"]
    elif kind.startswith("sigmoid"):
        block = 2 if "blocked" in kind else None
        loss = lkd.sigmoid_loss_distributed(img, txt, x["t"], x["b"], block=block)
    else:
        loss = lkd.softmax_loss_distributed(img, txt, x["t"])
    names = ("img", "txt", "t", "b") if kind.startswith("sigmoid") else ("img", "txt", "t")
    named = {n: v for n, v in dict(img=img, txt=txt, t=x["t"], b=x["b"]).items() if n in names}
    return loss.detach(), dict(zip(named, torch.autograd.grad(loss, list(named.values()))))


def _worker(rank: int, init_file: str, out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for name, (sizes, mode, backend) in LLIP_CASES.items():
        results["llip-" + name] = _run_llip(_llip_inputs(sum(sizes)), sizes, rank, mode, backend)
    for kind, sizes in POOLED_CASES.items():
        results["pooled-" + kind] = _run_pooled(_pooled_inputs(sum(sizes)), sizes, rank, kind)
    torch.save(results, out_path)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    """Launch the worker processes once and return each rank's results."""
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen([sys.executable, __file__, str(r), init, os.path.join(tmp, f"r{r}.pt")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for r in range(WORLD)
        ]  # fmt: skip
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=120)[0].decode(errors="replace"))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for r, p in enumerate(procs):
            assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-3000:]}"
        return [torch.load(os.path.join(tmp, f"r{r}.pt")) for r in range(WORLD)]


def _check(results, single_loss, single_grads, sizes, params):
    # float64 on every side; the ranks sum the same pairs in another order: the bound of a sum over every pair
    pairs = sum(sizes) ** 2
    losses = torch.stack([res[0] for res in results])
    check_same_result("loss", losses.mean(), single_loss, dtype=single_loss.dtype, terms=pairs)
    for name, g in single_grads.items():
        if name in params:  # replicated: DDP averages the ranks' gradients
            got = torch.stack([res[1][name] for res in results]).mean(0)
        else:  # activations: each rank holds W times the gradient of its slice
            got = torch.cat([res[1][name] for res in results]) / WORLD
        check_same_result(f"d{name}", got, g, dtype=g.dtype, terms=pairs)
    assert sum(sizes) == single_grads[next(n for n in single_grads if n not in params)].shape[0]


@pytest.mark.parametrize("case", list(LLIP_CASES))
def test_llip_losses_match_single_process(ranks, case):
    sizes, mode, backend = LLIP_CASES[case]
    x = _llip_inputs(sum(sizes))
    if mode == "softmax":
        loss = lk.llip_softmax_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, tau=x.tau, backend=backend)
    else:
        loss = lk.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend=backend)
    named = {n: getattr(x, n) for n in ACTIVATIONS + (PARAMS[:2] if mode == "softmax" else PARAMS)}
    single = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    _check([r["llip-" + case] for r in ranks], loss.detach(), single, sizes, PARAMS)


@pytest.mark.parametrize("case", list(POOLED_CASES))
def test_pooled_losses_match_single_process(ranks, case):
    sizes = POOLED_CASES[case]
    x = _pooled_inputs(sum(sizes))
    if case.startswith("sigmoid"):
        loss, names = lk.sigmoid_loss(x["img"], x["txt"], x["t"], x["b"]), ("img", "txt", "t", "b")
    else:
        loss, names = lk.softmax_loss(x["img"], x["txt"], x["t"]), ("img", "txt", "t")
    single = dict(zip(names, torch.autograd.grad(loss, [x[n] for n in names])))
    _check([r["pooled-" + case] for r in ranks], loss.detach(), single, sizes, ("t", "b"))


def test_without_a_process_group_it_is_the_local_op():
    x = make_llip_inputs(4, 4, H, K, d, requires_grad=False)
    local = lk.llip_sigmoid_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend="reference")
    for mode in lkd.MODES:
        got = lkd.llip_sigmoid_loss_distributed(
            x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, backend="reference", mode=mode
        )
        assert torch.equal(got, local)
    local = lk.llip_softmax_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, tau=x.tau, backend="reference")
    got = lkd.llip_softmax_loss_distributed(x.k, x.v, x.q, x.y, x.w_out, x.t, tau=x.tau, backend="reference")
    assert torch.equal(got, local)
    img, txt = x.y[:, :6], x.y[:, 2:8]
    assert torch.equal(lkd.sigmoid_loss_distributed(img, txt, 10.0, -10.0), lk.sigmoid_loss(img, txt, 10.0, -10.0))
    assert torch.equal(lkd.softmax_loss_distributed(img, txt, 10.0), lk.softmax_loss(img, txt, 10.0))


def test_bad_mode_is_rejected():
    x = make_llip_inputs(2, 2, H, K, d, requires_grad=False)
    with pytest.raises(ValueError, match="all_gather"):
        lkd.llip_sigmoid_loss_distributed(x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, mode="tree")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])

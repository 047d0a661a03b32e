"""End-to-end training-step time: Llip against SigLIP with identical towers (the cost of the mixer).

``python -m bench e2e [--configs tiny b16] [--backends reference torch cpu ...] [--batch N]``

One step = forward of both towers, loss, backward, AdamW step (``LlipModel.param_groups``, docs/design.md
section 2 hyperparameters), zero_grad. The SigLIP model is the same config with ``kind="siglip"``: same towers,
one pooled image vector instead of the K mixture tokens + mixer. Llip is timed once per llip_kernels backend.

On a CPU the towers are cut down so that a step takes seconds: the B/16-shaped configuration keeps the
image size (224 px: 196 patches + 32 mixture tokens), the context (77), every width and the mixer sizes of
ViT-B/16 (W 768, text 512, K 32, H 8, D 512) but uses 1 vision and 1 text layer, at batch 32; tiny is the
full llip-tiny model at batch 128. Llip's extra cost is then the 31 extra tokens in the vision tower, the
per-token k/v projections and the mixer + loss over Bi * Bt pairs; at the paper's batch sizes the pair term
grows. The GPU run uses the full models.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys

import torch

from .common import RESULTS, Timing, matmul_tflops, measure, run_metadata
from .harness import save, text_table

# name -> (llip model, siglip model, overrides on CPU, overrides on GPU, batch on CPU, batch on GPU)
SETUPS = {
    "tiny": ("llip-tiny", "siglip-tiny", {}, {}, 128, 1024),
    "b16": ("llip-vit-b16-k32", "siglip-vit-b16", dict(vision_layers=1, text_layers=1), {}, 32, 256),
}
E2E_BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")


def _step_fn(model, images, tokens, backend: str | None):
    opt = torch.optim.AdamW(model.param_groups(0.2), lr=1e-4, betas=(0.9, 0.95), eps=1e-6)

    def step():
        out = model(images, tokens)
        loss = model.loss(out, backend=backend)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.clamp_logit_scale()
        return loss

    return step


def _llip_reasons(model, images, tokens, backend: str) -> list[str]:
    """Whether ``backend`` can run this model's loss, asked through ``llip_kernels.backends``."""
    import llip_kernels

    with torch.no_grad():
        out = model(images[:2], tokens[:2])
    args = (out["k"], out["v"], out["q"], out["y"], out["w_out"])
    why = llip_kernels.backend_reasons(*args, tau=model.tau, op="sigmoid_loss")
    return list(why.get(backend, ["unknown backend"]))


def run_setup(
    name: str, backends: list[str], device: str, batch: int | None, max_time_s: float, rounds: int = 3
) -> list[dict]:
    """Time a training step of the SigLIP model and of the Llip model with each backend. The entries are
    measured in ``rounds`` interleaved rounds with their samples pooled, so that load from other processes
    falls on all of them alike."""
    import llip

    llip_name, siglip_name, cpu_over, gpu_over, cpu_batch, gpu_batch = SETUPS[name]
    gpu = device == "cuda"
    over = gpu_over if gpu else cpu_over
    B = batch or (gpu_batch if gpu else cpu_batch)
    base = {"setup": name, "batch": B, "device": device, "overrides": over}
    timing = dict(warmup=1, min_reps=2, max_reps=10, min_time_s=0.5, max_time_s=max_time_s / rounds)

    def ctx():  # bf16 autocast on a GPU (the paper's recipe); plain float32 on a CPU
        return torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)

    entries = []  # (row, step function or None, pooled samples)
    for model_name, backend_list in ((siglip_name, [None]), (llip_name, backends)):
        torch.manual_seed(0)
        model = llip.create_model(model_name, **over).to(device)
        c = model.config
        images = torch.randn(B, 3, c.image_size, c.image_size, device=device)
        tokens = torch.randint(1, c.vocab_size, (B, c.context_length), device=device)
        n_params = sum(p.numel() for p in model.parameters())
        for backend in backend_list:
            row = {
                **base,
                "model": model_name,
                "kind": c.kind,
                "backend": backend or "pooled",
                "params": n_params,
                "K": c.K,
                "H": c.H,
                "D": c.D,
                "status": "ok",
                "reasons": [],
            }
            why = _llip_reasons(model, images, tokens, backend) if backend is not None else []
            if why:
                row.update(status="skipped", reasons=why)
            entries.append((row, None if why else _step_fn(model, images, tokens, backend), []))
    for _ in range(rounds):
        for row, step, samples in entries:
            if step is None or row["status"] != "ok":
                continue
            try:
                with ctx():
                    samples += measure(step, device=device, **timing).samples
            except Exception as e:  # one backend failing must not end the run
                row.update(status="error", reasons=[f"{type(e).__name__}: {str(e)[:200]}"])
            gc.collect()
    rows = []
    for row, _, samples in entries:
        if row["status"] == "ok":
            row["time_ms"] = Timing.from_samples(samples).as_dict()
        rows.append(row)
    siglip_ms = next((r["time_ms"]["median"] for r in rows if r["kind"] == "siglip" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok" and siglip_ms:
            r["vs_siglip"] = r["time_ms"]["median"] / siglip_ms
    return rows


def format_rows(rows: list[dict]) -> str:
    header = ["setup", "model", "loss backend", "batch", "step ms (median)", "IQR ms", "vs SigLIP"]
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append(
                [r["setup"], r["model"], r["backend"], str(r["batch"]), r["status"], "; ".join(r["reasons"])[:60], ""]
            )
            continue
        t = r["time_ms"]
        out.append(
            [
                r["setup"],
                r["model"],
                r["backend"],
                str(r["batch"]),
                f"{t['median']:.1f}",
                f"{t['p25']:.1f}-{t['p75']:.1f}",
                f"{r.get('vs_siglip', float('nan')):.2f}x",
            ]
        )
    return text_table(header, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    p.add_argument("--backends", nargs="+", choices=list(E2E_BACKENDS), default=list(E2E_BACKENDS))
    p.add_argument("--batch", type=int, help="override the batch of every setup")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the whole run (CPU)")
    p.add_argument("--max-time", type=float, default=15.0, help="seconds of repetitions per row, at most")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the models and backends")
    p.add_argument("--out", help="JSON path (default bench/results/e2e_<cpu|gpu>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    given = argv if argv is not None else sys.argv[1:]
    result = {
        "meta": run_metadata(device, "python -m bench e2e " + " ".join(shlex.quote(a) for a in given)),
        "matmul": {"float32": matmul_tflops(device, torch.float32)},
        "rows": [],
    }
    for name in args.configs:
        rows = run_setup(name, args.backends, device, args.batch, args.max_time, args.rounds)
        result["rows"] += rows
        print(format_rows(rows), flush=True)
    out = save(result, args.out or RESULTS / f"e2e_{'gpu' if device == 'cuda' else 'cpu'}.json")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

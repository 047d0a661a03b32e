"""``llip eval CKPT_OR_RUN --zeroshot DIR | --data PAIRS``: evaluate a checkpoint on the user's own data.

Every input is checked before the checkpoint is loaded (one error line, exit 2); then each evaluation prints a
table (one row per ``--tau``) and the results go to a JSON file: ``--json-file PATH``, else beside the checkpoint
(``step_00000800.eval.json``). An existing file is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .data.skips import SkipLog
from .errors import UsageError

DEFAULT_MAX_SAMPLES = 5000  # the size of the COCO 5k test split: retrieval holds this many images in memory


def check_eval_args(args: argparse.Namespace) -> None:
    """Options that only mean something with another one are refused without it, rather than silently ignored."""
    needs = [
        ("--classnames", args.classnames, "--zeroshot", args.zeroshot),
        ("--templates", args.templates, "--zeroshot", args.zeroshot),
        ("--tau", args.tau, "--zeroshot or --data", args.zeroshot or args.data),
        ("--max-samples", args.max_samples, "--data", args.data),
    ]
    for option, given, other, present in needs:
        if given is not None and not present:
            raise UsageError(f"{option} applies to {other}; give {other} too")


def results_path(checkpoint: Path | None, json_file: str | None, overwrite: bool) -> Path | None:
    """Where the results JSON goes (``json_file``, else beside ``checkpoint``; None: nowhere), checked to be
    writable and, without ``overwrite``, not to exist yet."""
    if json_file is None and checkpoint is None:
        return None
    target = Path(json_file) if json_file is not None else checkpoint.with_suffix(".eval.json")
    what = f"--json-file {target}" if json_file is not None else f"the results file {target}"
    if target.is_dir():
        raise UsageError(f"{what} is a folder; give a file path")
    if target.exists() and not overwrite:
        raise UsageError(f"{what} exists; pass --overwrite to replace it, or another --json-file PATH")
    folder = target.parent
    if not folder.is_dir():
        raise UsageError(f"{what}: no such folder {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{what}: the folder {folder} is not writable; give --json-file PATH elsewhere")
    return target


def write_results(target: Path, results: dict, overwrite: bool) -> None:
    """``results`` as indented JSON; ``"x"`` mode without ``overwrite``, so a file that appeared meanwhile is not
    replaced either."""
    try:
        with open(target, "w" if overwrite else "x", encoding="utf-8") as f:
            f.write(json.dumps(results, indent=2) + "\n")
    except FileExistsError:
        raise UsageError(f"{target} exists; pass --overwrite to replace it") from None


def load_model(checkpoint: Path, device: str, backend: str | None):
    """``(model in eval mode on device, checkpoint dict without the weights)``: the model the checkpoint was
    trained as, with its weights."""
    import llip

    from .train.checkpoint import load_checkpoint
    from .train.placement import check_backend

    state = load_checkpoint(checkpoint)
    cfg = state["config"]
    model = llip.create_model(cfg["model"], **cfg.get("overrides", {}))
    model.load_state_dict(state.pop("model"))
    model.to(device).eval()
    check_backend(backend, model, device)
    return model, state


def run_user_data_eval(args: argparse.Namespace) -> int:
    """The ``--zeroshot`` and/or ``--data`` evaluation of ``args.checkpoint``; prints the tables (or the JSON
    with ``--json``) and writes the results file."""
    import llip

    from .eval_data import check_retrieval_source, read_retrieval_set
    from .eval_tasks import (
        evaluate_retrieval,
        evaluate_zero_shot,
        format_sweep,
        prepare_zero_shot,
        retrieval_title,
        zero_shot_title,
    )
    from .train.checkpoint import find_resume
    from .train.placement import pick_device

    # Every check that can refuse the command, before the checkpoint is read.
    task = prepare_zero_shot(args.zeroshot, args.classnames, args.templates or "imagenet") if args.zeroshot else None
    if args.data is not None:
        check_retrieval_source(args.data)
    checkpoint = find_resume(args.checkpoint, Path(args.checkpoint), what="llip eval")
    target = results_path(checkpoint, args.json_file, args.overwrite)
    device = pick_device(args.device)

    model, state = load_model(checkpoint, device, args.backend)
    if args.tau and model.kind != "llip":
        raise UsageError(f"--tau sets the Llip mixer temperature; {state['config']['model']} has no mixer")
    own_tau = model.tau if model.kind == "llip" else None
    tokenizer = llip.tokenizer_for(model.config)
    transform = llip.image_transform(model.image_size, train=False)
    skips = SkipLog()
    results = {"checkpoint": str(checkpoint), "step": state["step"], "model": state["config"]["model"]}
    results["model_tau"] = own_tau
    tables = []
    kw = dict(taus=args.tau, backend=args.backend, batch_size=args.batch_size)
    if task is not None:
        zs = evaluate_zero_shot(model, tokenizer, task, transform, skips, workers=args.workers, **kw)
        tables.append(format_sweep(zs, zero_shot_title(zs), own_tau))
        results["zeroshot"] = zs.to_json()
    if args.data is not None:
        max_samples = args.max_samples or DEFAULT_MAX_SAMPLES
        pairs = read_retrieval_set(
            args.data, transform, skips, max_samples=max_samples, batch_size=args.batch_size, workers=args.workers
        )
        rt = evaluate_retrieval(model, tokenizer, pairs, **kw)
        tables.append(format_sweep(rt, retrieval_title(rt, max_samples), own_tau))
        results["retrieval"] = rt.to_json()
    write_results(target, results, args.overwrite)
    if args.json:
        print(json.dumps(results, indent=2))
        print(f"results: {target}", file=sys.stderr)
    else:
        print("\n\n".join(tables))
        print(f"results: {target}")
    return 0

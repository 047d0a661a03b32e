"""The ``llip`` command: ``llip train``, ``llip eval``, ``llip compare``, ``llip plot`` (also ``python -m llip ...``).

``llip train`` with no arguments is the main job: llip-tiny on the built-in scenes, about five minutes on two
CPU cores, then a zero-shot and retrieval table against chance.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys

import torch

from llip_kernels import __version__
from llip_kernels.dispatch import BACKEND_MODULES

from .errors import UsageError, error_line
from .train.loop import TrainConfig

BACKENDS = ("auto", *BACKEND_MODULES)
MAIN_JOB = "llip-tiny on the built-in scenes: 800 steps of 128 on CPU (about five minutes on two cores)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line, ``llip <command>: error: ...`` (exit 2), like every other error
    of the command; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float, what: str):
    """An argparse type: a ``kind`` (int or float) of at least ``low``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


POSITIVE_INT = _number(int, 1, "a positive integer")
COUNT = _number(int, 0, "an integer >= 0")
POSITIVE_FLOAT = _number(float, 1e-300, "a positive number")
NONNEGATIVE_FLOAT = _number(float, 0.0, "a number >= 0")


def _override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE parsed as a Python literal when it is one (``K=16``, ``tau=3``, ``loss=softmax``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def _vary(text: str) -> tuple[str, list]:
    """``FIELD=V1,V2,...`` (``K=1,4,16,32``) with each value parsed as ``--set`` parses one."""
    if "=" not in text or not text.split("=", 1)[1].strip():
        raise argparse.ArgumentTypeError(f"--vary expects FIELD=V1,V2,..., got {text!r}")
    key, raw = text.split("=", 1)
    values = [_override(f"{key}={v}")[1] for v in raw.split(",") if v.strip()]
    if len(set(map(repr, values))) != len(values):
        raise argparse.ArgumentTypeError(f"--vary lists a value twice: {text!r}")
    return key.strip(), values


def _report_to(text: str) -> set[str]:
    """``--report-to tensorboard,wandb`` -> the set of names; ``none`` alone for none."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    if names == {"none"}:
        return set()
    unknown = names - {"tensorboard", "wandb"}
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of tensorboard, wandb (or none), got {text!r}"
        )
    return names


def _add_train_args(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default=defaults.model, help="registered model name (see `llip models`); default %(default)s"
    )
    g.add_argument(
        "--set",
        dest="overrides",
        type=_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model config field, repeatable: --set K=16 --set tau=3",
    )
    g.add_argument(
        "--pretrained",
        metavar="PATH",
        help="start the towers from an open_clip ViT CLIP or SigLIP checkpoint (state dict); add --set "
        "activation=gelu for weights trained with GELU (LAION's), the default quick_gelu fits OpenAI's and the "
        "-quickgelu models; SigLIP checkpoints go into the *-bigvision models, with --set tokenizer=PATH",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=defaults.data,
        help="'builtin' (default: procedurally drawn scenes, no download), webdataset tar shards "
        "('shards/{000..009}.tar') or a .csv/.tsv of image path + caption",
    )
    g.add_argument(
        "--workers", type=COUNT, default=defaults.workers, help="data loader processes (default %(default)s)"
    )
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=defaults.batch_size,
        help="global batch size, split across ranks (default %(default)s)",
    )
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=POSITIVE_INT, default=None, help="optimiser steps (default 800)")
    length.add_argument(
        "--epochs", type=POSITIVE_FLOAT, default=None, help="epochs over map-style data instead of --steps"
    )
    g.add_argument("--lr", type=POSITIVE_FLOAT, default=None, help="peak learning rate (default: the model config's)")
    g.add_argument(
        "--warmup",
        type=COUNT,
        default=defaults.warmup,
        help="linear warm-up steps (default: 10%% of the run, at most 2000)",
    )
    g.add_argument("--weight-decay", type=NONNEGATIVE_FLOAT, default=defaults.weight_decay, help="AdamW decay (0.2)")
    g.add_argument("--grad-clip", type=POSITIVE_FLOAT, default=None, metavar="NORM", help="clip the gradient norm")
    g.add_argument(
        "--accum-freq",
        type=POSITIVE_INT,
        default=defaults.accum_freq,
        metavar="N",
        help="run each rank's batch in N micro-batches with cached features: the loss still sees the whole batch and "
        "the gradients are those of one batch (memory of a micro-batch, about 1.3x the compute)",
    )
    g.add_argument("--lock-image", action="store_true", help="freeze the image tower (LiT); the Llip head trains")
    g.add_argument("--lock-text", action="store_true", help="freeze the text tower; the Llip head trains")
    g.add_argument(
        "--lock-image-unlocked-layers",
        type=COUNT,
        default=defaults.lock_image_unlocked_layers,
        metavar="N",
        help="with --lock-image: keep the last N transformer blocks (and the final norm) training",
    )
    g.add_argument(
        "--lock-text-unlocked-layers",
        type=COUNT,
        default=defaults.lock_text_unlocked_layers,
        metavar="N",
        help="with --lock-text: keep the last N transformer blocks (and the final norm) training",
    )
    g = p.add_argument_group("execution")
    g.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default=defaults.precision,
        help="auto: bf16 autocast on CUDA, fp32 on CPU; fp16: float16 autocast with a gradient scaler",
    )
    g.add_argument("--backend", default=None, choices=BACKENDS, help="llip_kernels backend (default: automatic)")
    g.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward pass")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard parameters, gradients and optimiser state across the ranks (FSDP) instead of "
        "keeping a full copy on each (DDP); checkpoints become sharded step_*.dcp folders",
    )
    g.add_argument("--seed", type=int, default=defaults.seed)
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, help="run folder (default runs/<model>)")
    g.add_argument(
        "--resume",
        default=None,
        metavar="CKPT|DIR|auto",
        help="continue from a checkpoint, the newest in a folder, or auto (newest in the run folder)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --output (its checkpoints, logs and config are removed first)",
    )
    g.add_argument("--save-every", type=POSITIVE_INT, default=defaults.save_every, help="checkpoint period in steps")
    g.add_argument("--keep", type=COUNT, default=defaults.keep, help="checkpoints kept, 0: all (default %(default)s)")
    g.add_argument(
        "--eval-every", type=COUNT, default=defaults.eval_every, help="evaluate every N steps (0: only at the end)"
    )
    g.add_argument(
        "--eval-images",
        type=POSITIVE_INT,
        default=defaults.eval_images,
        help="built-in validation scenes used for evaluation (default %(default)s)",
    )
    _add_val_args(p.add_argument_group("validation on your data (every --eval-every steps and at the end)"), defaults)
    g.add_argument("--log-every", type=POSITIVE_INT, default=defaults.log_every, help="samples/s measurement period")
    g.add_argument(
        "--report-to",
        type=_report_to,
        default=None,
        metavar="LIST",
        help="where metrics go besides metrics.jsonl: tensorboard (default), wandb, both (tensorboard,wandb) or none",
    )
    g.add_argument("--wandb-project", default=defaults.wandb_project, help="wandb project (default %(default)s)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="JSONL metrics only")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--hang-after", type=int, default=None, help=argparse.SUPPRESS)  # fault injection (tests)
    g.add_argument("--hang-in-checkpoint", type=int, default=None, help=argparse.SUPPRESS)  # fault injection (tests)


def _add_val_args(g, defaults: TrainConfig) -> None:
    """``llip train``'s held-out evaluations, logged as ``val/...`` and ``val_zeroshot/...`` eval metrics."""
    g.add_argument(
        "--val-data",
        metavar="SHARDS_OR_CSV",
        help="held-out image-text pairs (tar shards or .csv/.tsv, as --data): retrieval R@1/5/10 at each evaluation",
    )
    g.add_argument(
        "--val-samples",
        type=POSITIVE_INT,
        default=defaults.val_samples,
        help="images of --val-data read, and held in memory (default %(default)s)",
    )
    g.add_argument("--val-zeroshot", metavar="DIR", help="an image folder DIR/<class>/<images>: zero-shot top-1/5")
    g.add_argument(
        "--val-classnames", metavar="FILE|imagenet", help="class names of --val-zeroshot (default: folder names)"
    )
    g.add_argument(
        "--val-templates",
        metavar="FILE|imagenet|simple",
        default=defaults.val_templates,
        help="prompt templates of --val-zeroshot (default %(default)s: the 80 CLIP prompts)",
    )


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    """``llip eval``'s evaluations on the user's data (``llip/eval_command.py``)."""
    g = p.add_argument_group("zero-shot classification of an image folder")
    g.add_argument("--zeroshot", metavar="DIR", help="DIR/<class folder>/<images>; classes in sorted folder order")
    g.add_argument(
        "--classnames",
        metavar="FILE|imagenet",
        help="one class name per line in sorted folder order, or the shipped ImageNet-1k names (default: the "
        "folder names, _ read as spaces)",
    )
    g.add_argument(
        "--templates",
        metavar="FILE|imagenet|simple",
        help="prompt templates with {} for the class name: a file, the 80 CLIP prompts (imagenet, the default) or "
        "'a photo of a {}.' (simple)",
    )
    g = p.add_argument_group("image-text retrieval on held-out pairs")
    g.add_argument("--data", metavar="SHARDS_OR_CSV", help="tar shards ('val/{000..004}.tar') or a .csv/.tsv file")
    g.add_argument(
        "--max-samples",
        type=POSITIVE_INT,
        metavar="N",
        help="images read, and held in memory (default 5000, COCO's 5k test)",
    )
    g = p.add_argument_group("either evaluation")
    g.add_argument(
        "--tau",
        type=POSITIVE_FLOAT,
        nargs="+",
        metavar="T",
        help="Llip mixer temperatures to evaluate at, one row each (the paper sweeps 1 3 5 8 10; default: the "
        "model's own)",
    )
    g.add_argument("--batch-size", type=POSITIVE_INT, default=256, help="images per encoder call (default 256)")
    g.add_argument("--workers", type=COUNT, default=1, help="image decoding processes (default 1)")
    g.add_argument(
        "--json-file", metavar="PATH", help="write the results here (default: beside the checkpoint, *.eval.json)"
    )
    g.add_argument("--overwrite", action="store_true", help="replace an existing results file")


def _config_from(args: argparse.Namespace) -> TrainConfig:
    fields = {f for f in TrainConfig.__dataclass_fields__}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["overrides"] = dict(args.overrides)
    if args.report_to is not None:  # --no-tensorboard still turns TensorBoard off
        values["tensorboard"] = args.tensorboard and "tensorboard" in args.report_to
        values["wandb"] = "wandb" in args.report_to
    values["output"] = args.output or f"runs/{args.model}"
    return TrainConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="llip",
        description="Llip (latent language image pretraining): train, evaluate, compare.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  llip train                       # " + MAIN_JOB + "\n"
        "  llip train --model llip-tiny --set K=16 --set tau=3 --steps 500\n"
        "  torchrun --nproc_per_node=2 -m llip train --data 'shards/{000..009}.tar'\n"
        "  llip eval runs/llip-tiny\n  llip plot runs/llip-tiny\n  llip compare --steps 400 --seeds 5\n"
        "  llip compare --kinds llip --vary K=1,4,16,32 --seeds 3",
    )
    parser.add_argument("--version", action="version", version=f"llip {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = TrainConfig()
    p = sub.add_parser("train", help="train a model", description=f"Train a model. With no arguments: {MAIN_JOB}.")
    _add_train_args(p, defaults)

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (built-in scenes, or your image folder and image-text pairs)",
        description="Zero-shot and retrieval evaluation of a checkpoint: on the built-in scenes, or with --zeroshot "
        "and/or --data on your own data (results also written as JSON).",
    )
    p.add_argument("checkpoint", help="a checkpoint file, or a run folder (its newest checkpoint)")
    p.add_argument(
        "--eval-images",
        type=POSITIVE_INT,
        default=defaults.eval_images,
        help="built-in scenes evaluated without --zeroshot/--data (default %(default)s)",
    )
    p.add_argument("--backend", default=None, choices=BACKENDS)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_eval_args(p)

    p = sub.add_parser(
        "compare",
        help="train CLIP, SigLIP and Llip with identical towers and budget, over seeds",
        description="Train CLIP, SigLIP and Llip (same towers, data, steps, batch, lr) on the built-in scenes with "
        "one or more seeds; write a table (mean and standard deviation per model, paired differences from SigLIP "
        "with 95%% intervals; markdown + JSON) and a plot.",
    )
    p.add_argument("--size", default="tiny", help="tower size: the models are clip-/siglip-/llip-<size>")
    p.add_argument("--kinds", default="clip,siglip,llip", help="comma-separated model kinds (also register, avg)")
    p.add_argument("--steps", type=POSITIVE_INT, default=600)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=128)
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=None)
    p.add_argument("--warmup", type=COUNT, default=60)
    p.add_argument("--workers", type=COUNT, default=1)
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--seeds", type=POSITIVE_INT, default=1, help="seeds per model: --seed, --seed + 1, ...")
    p.add_argument("--eval-images", type=POSITIVE_INT, default=500)
    p.add_argument(
        "--vary",
        type=_vary,
        default=None,
        metavar="FIELD=V1,V2,...",
        help="an ablation: train every kind at each value of a model config field (--kinds llip --vary K=1,4,16,32)",
    )
    p.add_argument("--output", default="runs/compare")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--overwrite", action="store_true", help="replace runs already in --output")
    p.add_argument(
        "--resume", action="store_true", help="keep the runs already in --output (same settings), finish the rest"
    )

    p = sub.add_parser(
        "plot",
        help="draw a run's training curves",
        description="Draw a run folder's metrics.jsonl against the step (training loss, learning rate, logit "
        "scale, evaluation metrics) as one PNG; `llip train` draws it at the end of every run.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `llip train` (it holds metrics.jsonl)")
    p.add_argument("--output", default=None, metavar="PNG", help="where to write it (default RUN_DIR/curves.png)")

    sub.add_parser("models", help="list the registered model names")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (UsageError, ValueError, OSError) as e:  # what the user can fix: one line, no traceback
        print(f"llip {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llip {args.command}: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "models":
        import llip

        print("\n".join(llip.list_models()))
        return 0
    if args.command == "train":
        from .train.loop import TrainingDiverged, train

        try:
            train(_config_from(args))
        except TrainingDiverged as e:
            print(f"llip train: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "eval":
        from .eval_command import check_eval_args, results_path, run_user_data_eval, write_results
        from .train.evaluate import evaluate_checkpoint, format_table

        check_eval_args(args)
        if args.zeroshot or args.data:
            return run_user_data_eval(args)
        target = results_path(None, args.json_file, args.overwrite)  # built-in scenes: a file only when asked
        results = evaluate_checkpoint(
            args.checkpoint, eval_images=args.eval_images, backend=args.backend, device=args.device
        )
        if target is not None:
            write_results(target, results, args.overwrite)
        print(json.dumps(results, indent=2) if args.json else format_table(results))
        return 0
    if args.command == "compare":
        from .compare import compare

        compare(
            size=args.size,
            kinds=args.kinds.split(","),
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=args.warmup,
            workers=args.workers,
            seed=args.seed,
            seeds=args.seeds,
            eval_images=args.eval_images,
            vary=args.vary,
            output=args.output,
            progress=args.progress,
            overwrite=args.overwrite,
            resume=args.resume,
        )
        return 0
    if args.command == "plot":
        from .train.curves import plot_run

        print(plot_run(args.run_dir, output=args.output))
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

"""Our tar-shard reader (llip/data/webdata.py) against the webdataset library on the same shards, one process:
samples per second to read, decode (PIL) and transform every sample of the shards once (no shuffle buffer on
either side), alternating the two readers ``--repeats`` times.

Same work on both sides: before timing, both readers' outputs are compared, and must be equal (images bit for bit
with the evaluation transform; with ``--train`` each side draws its own random crops: ours seeded per sample, the
library's from torch's global RNG, so only captions and shapes are compared). Ours also does what the library
pipeline does not: caption checks, skip accounting and per-sample seeding. On a shared machine the ratio of the two
readers within one repeat (``ratio``) is steadier than either rate.

    pip install webdataset          # only for this measurement: llip does not depend on it
    python -m bench tar-reader      # 4 shards x 500 samples, 64 px PNG + .txt; writes bench/results/tar_reader_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

from .common import REPO, run_metadata


def write_shards(folder: Path, shards: int, per_shard: int, size: int) -> str:
    """Built-in scenes as PNG + caption shards; returns the brace pattern."""
    from PIL import Image

    from llip.data.builtin import make_scene, render

    n = 0
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s}.tar", "w") as tar:
            for _ in range(per_shard):
                scene = make_scene("train", n)
                buf = io.BytesIO()
                Image.fromarray(render(scene, size)).save(buf, format="PNG")
                for name, payload in ((f"{n:06d}.png", buf.getvalue()), (f"{n:06d}.txt", scene.captions[0].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                n += 1
    return str(folder / f"shard-{{0..{shards - 1}}}.tar")


def ours(spec: str, transform):
    """``(image [3, S, S], caption)`` of every sample through our reader (whole shards in its seeded shard order)."""
    from llip.data.webdata import WebDataset

    return WebDataset(spec, transform).one_pass()


def library(spec: str, transform):
    """The same through the webdataset library (shards in file order): PIL decoding to RGB, the same transform, the
    caption as text."""
    import webdataset as wds

    return wds.WebDataset(spec, shardshuffle=False).decode("pil").to_tuple("png", "txt").map_tuple(transform, str)


READERS = {"llip": ours, "webdataset": library}


def check_same_output(spec: str, transform, exact: bool) -> None:
    """Both readers give the same samples (the shard orders differ): the same captions with the same image tensors
    when ``exact``, else with images of the same shape."""

    def samples(reader):
        return sorted((c, hashlib.sha256(x.numpy().tobytes()).hexdigest() if exact else x.shape) for x, c in reader)

    assert samples(ours(spec, transform)) == samples(library(spec, transform)), "the readers' outputs differ"


def measure(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench tar-reader", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--train", action="store_true", help="the training transform (random resized crop)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "tar_reader_cpu.json"))
    args = p.parse_args(argv)
    import webdataset

    import llip

    transform = llip.image_transform(args.size, train=args.train)
    rates: dict[str, list[float]] = {name: [] for name in READERS}
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_shards(Path(tmp), args.shards, args.per_shard, args.size)
        check_same_output(spec, transform, exact=not args.train)
        for _ in range(args.repeats):
            for name, reader in READERS.items():
                t0 = time.perf_counter()
                n = sum(1 for _ in reader(spec, transform))
                rates[name].append(n / (time.perf_counter() - t0))
                assert n == args.shards * args.per_shard, (name, n)
    ratio = [a / b for a, b in zip(rates["llip"], rates["webdataset"])]
    result = {
        "meta": run_metadata("cpu", "python -m bench tar-reader " + " ".join(argv or [])),
        "webdataset_version": webdataset.__version__,
        "samples": args.shards * args.per_shard,
        "transform": repr(transform),
        "same_output": "images and captions" if not args.train else "captions and shapes",
        "samples_per_s": rates,
        "median_samples_per_s": {k: sorted(v)[len(v) // 2] for k, v in rates.items()},
        "ratio": ratio,  # llip / webdataset, per repeat
        "median_ratio": sorted(ratio)[len(ratio) // 2],
    }
    for name, median in result["median_samples_per_s"].items():
        print(f"{name:11s} {median:8.0f} samples/s (median of {args.repeats})")
    print(f"llip / webdataset: {', '.join(f'{r:.2f}' for r in ratio)} (per repeat)")
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    measure(argv)
    return 0


if __name__ == "__main__":
    main()

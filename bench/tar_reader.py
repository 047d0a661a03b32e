"""Our tar-shard reader (llip/data/webdata.py) against the webdataset library on the same shards, one process:
samples per second to read, decode (PIL) and transform every sample of the shards once (no shuffle buffer on
either side), alternating the two readers ``--repeats`` times.

    pip install webdataset          # only for this measurement: llip does not depend on it
    python -m bench tar-reader      # 4 shards x 500 samples, 64 px PNG + .txt; writes bench/results/tar_reader_cpu.json
"""

from __future__ import annotations

import argparse
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


def read_ours(spec: str, transform) -> int:
    from llip.data.webdata import WebDataset

    return sum(1 for _ in WebDataset(spec, transform).one_pass())


def read_webdataset(spec: str, transform) -> int:
    import webdataset as wds

    pipeline = wds.WebDataset(spec, shardshuffle=False).decode("pil").to_tuple("png", "txt").map_tuple(transform, str)
    return sum(1 for _ in pipeline)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench tar-reader", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "tar_reader_cpu.json"))
    args = p.parse_args(argv)
    import webdataset

    import llip

    transform = llip.image_transform(args.size, train=False)
    rates: dict[str, list[float]] = {"llip": [], "webdataset": []}
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_shards(Path(tmp), args.shards, args.per_shard, args.size)
        for _ in range(args.repeats):
            for name, read in (("llip", read_ours), ("webdataset", read_webdataset)):
                t0 = time.perf_counter()
                n = read(spec, transform)
                rates[name].append(n / (time.perf_counter() - t0))
                assert n == args.shards * args.per_shard, (name, n)
    result = {
        "meta": run_metadata("cpu", "python -m bench tar-reader " + " ".join(argv or [])),
        "webdataset_version": webdataset.__version__,
        "samples": args.shards * args.per_shard,
        "samples_per_s": rates,
        "median_samples_per_s": {k: sorted(v)[len(v) // 2] for k, v in rates.items()},
    }
    for name, median in result["median_samples_per_s"].items():
        print(f"{name:11s} {median:8.0f} samples/s (median of {args.repeats})")
    Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

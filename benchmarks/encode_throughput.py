"""Encode throughput: `tokenize-dataset encode` end to end vs a bare `model.encode` loop.

The CLI run reads the MNIST IDX files, encodes all 70,000 images in shards and writes Parquet
and HDF5 with manifest; the bare loop encodes the same images, preloaded as one float tensor,
at the same batch size: the limit on this hardware. The bare loop runs before and after the
CLI and their mean is the reference, so drift in machine load shows up as their spread.

    python benchmarks/encode_throughput.py --data-root ../shared/data/mnist \
        --checkpoint runs/quality/checkpoint --out runs/encode-bench

With ``--cluster local:2`` (or a scheduler address) the same encode runs a second time on
that Dask cluster, right after the single-process one, and the table adds its rate and its
ratio to the single-process run (on a 2-core machine the point is the cluster's overhead).

Reported: the flow's own rate (its timer spans planning, reading, encoding, writing and the
manifest) and the whole command's wall clock (adds Python imports and Prefect's temporary
server start). Last line: one JSON object, also written to OUT/encode_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from vqtok.tokenizer import load_tokenizer, save_checkpoint
from vqtok.tokenizer.checkpoint import build_model
from vqtok.tokenizer.config import Config, DataConfig
from vqtok.tokenizer.sources import open_source

TARGET = 0.85


def bare_loop(model, images: torch.Tensor, batch_size: int) -> float:
    """Images per second of model.encode over preloaded tensors."""
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            model.encode(images[i : i + batch_size])
    return len(images) / (time.perf_counter() - start)


def cli_encode(checkpoint: Path, data_root: str, out: Path, batch_size: int,
               cluster: str | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [str(Path(sys.executable).parent / "tokenize-dataset"), "encode",
               "--checkpoint", str(checkpoint), "--dataset", "mnist", "--data-root", data_root,
               "--out", str(out), "--format", "both", "--batch-size", str(batch_size), "--quiet"]
    if cluster:
        command += ["--cluster", cluster]
    if not Path(command[0]).exists():
        command[:1] = [sys.executable, "-m", "vqtok.flows.cli"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(),
                          cwd=Path(__file__).resolve().parent.parent)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"encode failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    match = re.search(r"(\d+) images encoded .* at (\d+) img/s", done.stdout)
    if not match:
        raise SystemExit(f"unexpected encode output:\n{done.stdout}")
    images = int(match.group(1))
    return {"images": images, "flow_images_per_second": float(match.group(2)),
            "wall_seconds": wall, "wall_images_per_second": images / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data/mnist")
    parser.add_argument("--checkpoint", help="trained tokenizer; default: an untrained one "
                        "(speed does not depend on the weights)")
    parser.add_argument("--out", default="runs/encode-bench")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cluster", help="also encode on this Dask cluster (local:N or "
                        "tcp://HOST:PORT) and compare with the single-process run")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = str(Path(args.data_root).resolve())

    checkpoint = Path(args.checkpoint).resolve() if args.checkpoint else out / "checkpoint"
    if not args.checkpoint:
        config = Config().with_overrides(**{"data.dataset": "mnist", "data.data_root": data_root})
        save_checkpoint(checkpoint, build_model(config), config)
    model = load_tokenizer(checkpoint)
    source = open_source(DataConfig(dataset="mnist", data_root=data_root))
    ids = [i for split in source.splits.values() for i in split]
    images, _ = source.load_batch(ids)

    bare_before = bare_loop(model, images, args.batch_size)
    print(f"bare model.encode loop: {bare_before:.0f} img/s", flush=True)
    cli = cli_encode(checkpoint, data_root, out / "run", args.batch_size)
    print(f"tokenize-dataset encode: flow {cli['flow_images_per_second']:.0f} img/s, "
          f"command wall clock {cli['wall_seconds']:.1f} s", flush=True)
    dask = None
    if args.cluster:
        dask = cli_encode(checkpoint, data_root, out / "run-cluster", args.batch_size,
                          args.cluster)
        print(f"tokenize-dataset encode --cluster {args.cluster}: flow "
              f"{dask['flow_images_per_second']:.0f} img/s, command wall clock "
              f"{dask['wall_seconds']:.1f} s", flush=True)
    bare_after = bare_loop(model, images, args.batch_size)
    print(f"bare model.encode loop: {bare_after:.0f} img/s", flush=True)

    bare = (bare_before + bare_after) / 2
    result = {
        "images": cli["images"],
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "bare_images_per_second": [round(bare_before, 1), round(bare_after, 1)],
        "flow_images_per_second": cli["flow_images_per_second"],
        "command_wall_seconds": round(cli["wall_seconds"], 2),
        "command_images_per_second": round(cli["wall_images_per_second"], 1),
        "ratio_flow_vs_bare": round(cli["flow_images_per_second"] / bare, 3),
        "ratio_command_vs_bare": round(cli["wall_images_per_second"] / bare, 3),
        "target": TARGET,
    }
    if dask:
        result["cluster"] = {
            "spec": args.cluster,
            "flow_images_per_second": dask["flow_images_per_second"],
            "command_wall_seconds": round(dask["wall_seconds"], 2),
            "command_images_per_second": round(dask["wall_images_per_second"], 1),
            "ratio_flow_vs_single": round(dask["flow_images_per_second"]
                                          / cli["flow_images_per_second"], 3),
            "ratio_command_vs_single": round(dask["wall_images_per_second"]
                                             / cli["wall_images_per_second"], 3),
        }
    print(f"\n{'measure':<34}{'img/s':>10}{'x bare':>9}")
    print(f"{'bare model.encode (mean)':<34}{bare:>10.0f}{1.0:>9.2f}")
    print(f"{'encode flow (read+encode+write)':<34}{cli['flow_images_per_second']:>10.0f}"
          f"{result['ratio_flow_vs_bare']:>9.2f}")
    print(f"{'whole command incl. start-up':<34}{cli['wall_images_per_second']:>10.0f}"
          f"{result['ratio_command_vs_bare']:>9.2f}")
    if dask:
        cluster = result["cluster"]
        print(f"\n{'--cluster ' + args.cluster:<34}{'img/s':>10}{'x single':>9}")
        print(f"{'encode flow':<34}{cluster['flow_images_per_second']:>10.0f}"
              f"{cluster['ratio_flow_vs_single']:>9.2f}")
        print(f"{'whole command incl. start-up':<34}{cluster['command_images_per_second']:>10.0f}"
              f"{cluster['ratio_command_vs_single']:>9.2f}")
    (out / "encode_throughput.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

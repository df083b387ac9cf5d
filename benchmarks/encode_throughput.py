"""Encode throughput: `tokenize-dataset encode` end to end vs a bare `model.encode` loop.

The CLI run reads the MNIST IDX files, encodes all 70,000 images in shards and writes Parquet
and HDF5 with manifest; the bare loop encodes the same images, preloaded as one float tensor,
at the same batch size: the limit on this hardware. The bare loop runs before and after the
CLI and their mean is the reference, so drift in machine load shows up as their spread. The
bare loop runs under the malloc policy the CLI's encode runs under (``tokenizer.heap``): the
reference is the same allocator, not a slower one.

    python benchmarks/encode_throughput.py --data-root ../shared/data/mnist \
        --checkpoint runs/quality/checkpoint --out runs/encode-bench

With ``--cluster local:2`` (or a scheduler address) the same encode runs a second time on
that Dask cluster, right after the single-process one, and the table adds its rate and its
ratio to the single-process run (on a 2-core machine the point is the cluster's overhead).

With ``--source webdataset`` (or ``parquet``) the 70,000 images are first written as 7 shards
of PNGs (tar members ``NNNNNN.png`` + ``.cls``, or Hugging Face image Parquet), and the encode
reads them with ``--workers 2``; the bare loop then decodes the same PNGs itself, in one
process, before calling ``model.encode``. Each of ``--repeats`` timed runs sits between two
bare loops and is compared with their mean; the worst ratio is reported. Peak memory comes
from two more runs, on the first shard alone and on all 7, sampled every 0.25 s: the
command's own RSS, and the sum over its whole process tree (CLI, Prefect server, DataLoader
workers) of RSS and of PSS. The timed run
is not sampled: reading a process's PSS walks all its mappings, which on 2 cores slowed the
encode by about 12 %.

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
import threading
import time
from pathlib import Path

import numpy as np
import torch
from vqtok.tokenizer import load_tokenizer, save_checkpoint
from vqtok.tokenizer.checkpoint import build_model
from vqtok.tokenizer.config import Config, DataConfig
from vqtok.tokenizer.heap import keep_freed_memory
from vqtok.tokenizer.sources import open_source

TARGET = 0.85
RSS_TARGET_GIB = 1.5
SHARDS = 7


def write_shards(images: torch.Tensor, labels: torch.Tensor, folder: Path, kind: str) -> str:
    """The images as SHARDS PNG shards in ``folder`` (kept for re-runs); the dataset name."""
    import io
    import tarfile

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".tar" if kind == "webdataset" else ".parquet"
    last = f"{SHARDS - 1:06d}"
    name = f"{kind}:{folder}/mnist-{{000000..{last}}}{suffix}"
    if kind == "parquet":
        name = f"parquet:{folder}"
    if (folder / f"mnist-{last}{suffix}").is_file():
        return name
    pixels = (images * 255).round().to(torch.uint8)[:, 0].numpy()
    per_shard = -(-len(pixels) // SHARDS)
    for shard in range(SHARDS):
        rows = range(shard * per_shard, min((shard + 1) * per_shard, len(pixels)))
        encoded = []
        for i in rows:
            buffer = io.BytesIO()
            Image.fromarray(pixels[i]).save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
        path = folder / f"mnist-{shard:06d}{suffix}"
        temp = path.with_name(f".{path.name}.tmp")
        if kind == "webdataset":
            with tarfile.open(temp, "w") as tar:
                for i, data in zip(rows, encoded, strict=True):
                    for ext, payload in (("png", data), ("cls", str(int(labels[i])).encode())):
                        info = tarfile.TarInfo(f"{i:06d}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            cells = [{"bytes": b, "path": f"{i:06d}.png"}
                     for i, b in zip(rows, encoded, strict=True)]
            image = pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
            table = pa.table({"image": image, "label": pa.array(labels[rows.start:rows.stop]
                                                                 .numpy(), pa.int64())})
            pq.write_table(table, temp, row_group_size=1000)
        temp.rename(path)
    return name


def shard_pngs(folder: Path, kind: str) -> list[bytes]:
    """Every PNG of the shards, in id order, as the bare loop reads them."""
    import tarfile

    out: list[bytes] = []
    for path in sorted(folder.glob("mnist-*")):
        if kind == "webdataset":
            with tarfile.open(path) as tar:
                out += [tar.extractfile(m).read() for m in tar if m.name.endswith(".png")]
        else:
            import pyarrow.parquet as pq

            out += [row["bytes"] for row in pq.read_table(path, columns=["image"])
                    .column("image").to_pylist()]
    return out


def bare_decode_loop(model, pngs: list[bytes], batch_size: int) -> float:
    """Images per second of decoding PNGs in this process, then model.encode on each batch."""
    import io

    from PIL import Image

    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(pngs), batch_size):
            batch = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("L"))
                              for b in pngs[i : i + batch_size]])
            model.encode(torch.from_numpy(batch)[:, None].float().div_(255))
    return len(pngs) / (time.perf_counter() - start)


class TreeMemory:
    """Peak memory of a process and all its descendants, sampled every 0.25 s in a thread:
    the command's own RSS, the sum of the tree's RSS (counts pages shared by forked workers
    once per process: an upper bound) and the sum of their PSS (shared pages split between
    the processes sharing them: what the tree really holds)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process, self._stop = psutil.Process(pid), threading.Event()
        self.peak = {"command_rss": 0, "tree_rss": 0, "tree_pss": 0}
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                tree = [self.process, *self.process.children(recursive=True)]
            except psutil.Error:
                return
            rss = pss = 0
            for proc in tree:
                try:
                    info = proc.memory_full_info()
                except psutil.Error:
                    continue
                rss, pss = rss + info.rss, pss + info.pss
                if proc is self.process:
                    self.peak["command_rss"] = max(self.peak["command_rss"], info.rss)
            self.peak["tree_rss"] = max(self.peak["tree_rss"], rss)
            self.peak["tree_pss"] = max(self.peak["tree_pss"], pss)
            self._stop.wait(0.25)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {key: round(value / 2**30, 3) for key, value in self.peak.items()}


def bare_loop(model, images: torch.Tensor, batch_size: int) -> float:
    """Images per second of model.encode over preloaded tensors."""
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            model.encode(images[i : i + batch_size])
    return len(images) / (time.perf_counter() - start)


def cli_encode(checkpoint: Path, data_root: str, out: Path, batch_size: int,
               cluster: str | None = None, dataset: str = "mnist", workers: int = 0,
               memory: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [str(Path(sys.executable).parent / "tokenize-dataset"), "encode",
               "--checkpoint", str(checkpoint), "--dataset", dataset, "--data-root", data_root,
               "--out", str(out), "--format", "both", "--batch-size", str(batch_size), "--quiet",
               "--workers", str(workers)]
    if cluster:
        command += ["--cluster", cluster]
    if not Path(command[0]).exists():
        command[:1] = [sys.executable, "-m", "vqtok.flows.cli"]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=os.environ.copy(), cwd=Path(__file__).resolve().parent.parent)
    sampler = TreeMemory(child.pid) if memory else None
    stdout, stderr = child.communicate()
    wall = time.perf_counter() - start
    peak = sampler.stop() if sampler else None
    done = subprocess.CompletedProcess(command, child.returncode, stdout, stderr)
    if done.returncode:
        raise SystemExit(f"encode failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    match = re.search(r"(\d+) images encoded\b.*? at (\d+) img/s", done.stdout)
    if not match:
        raise SystemExit(f"unexpected encode output:\n{done.stdout}")
    images = int(match.group(1))
    return {"images": images, "flow_images_per_second": float(match.group(2)),
            "wall_seconds": wall, "wall_images_per_second": images / wall,
            "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data/mnist")
    parser.add_argument("--checkpoint", help="trained tokenizer; default: an untrained one "
                        "(speed does not depend on the weights)")
    parser.add_argument("--out", default="runs/encode-bench")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cluster", help="also encode on this Dask cluster (local:N or "
                        "tcp://HOST:PORT) and compare with the single-process run")
    parser.add_argument("--source", choices=["mnist", "webdataset", "parquet"], default="mnist",
                        help="read the IDX files, or the same images as 7 PNG shards")
    parser.add_argument("--repeats", type=int, default=2, help="timed shard runs, each between "
                        "two bare loops; the worst ratio is reported")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers for --source webdataset/parquet")
    args = parser.parse_args()
    keep_freed_memory()  # as encode_ids does in the CLI
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

    if args.source != "mnist":
        return shard_benchmark(args, model, checkpoint, images, source, out, data_root)
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


def shard_benchmark(args, model, checkpoint: Path, images: torch.Tensor, source, out: Path,
                    data_root: str) -> None:
    """Encode from PNG shards with DataLoader workers vs decoding + encoding in one loop."""
    labels = torch.cat([source.load_batch(ids)[1] for ids in source.splits.values()])
    folder = out / f"{args.source}-shards"
    dataset = write_shards(images, labels, folder, args.source)
    first = sorted(folder.glob("mnist-*"))[0]
    pngs = shard_pngs(folder, args.source)
    del images
    one = cli_encode(checkpoint, data_root, out / "run-1-shard", args.batch_size,
                     dataset=f"{args.source}:{first}", workers=args.workers, memory=True)
    print(f"encode, 1 shard: peak {one['peak_gib']} GiB", flush=True)
    sampled = cli_encode(checkpoint, data_root, out / "run", args.batch_size, dataset=dataset,
                         workers=args.workers, memory=True)
    print(f"encode, {SHARDS} shards: peak {sampled['peak_gib']} GiB", flush=True)
    bares = [bare_decode_loop(model, pngs, args.batch_size)]
    print(f"bare decode + model.encode loop: {bares[-1]:.0f} img/s", flush=True)
    timed, ratios = [], []
    for _ in range(args.repeats):  # each timed run between two bare loops
        timed.append(cli_encode(checkpoint, data_root, out / "run", args.batch_size,
                                dataset=dataset, workers=args.workers))
        bares.append(bare_decode_loop(model, pngs, args.batch_size))
        ratios.append(timed[-1]["flow_images_per_second"] / ((bares[-2] + bares[-1]) / 2))
        print(f"encode, {SHARDS} shards: flow {timed[-1]['flow_images_per_second']:.0f} img/s; "
              f"bare decode + model.encode loop: {bares[-1]:.0f} img/s", flush=True)
    worst = min(range(len(ratios)), key=ratios.__getitem__)
    full = timed[worst]
    bare = float(np.mean(bares[worst : worst + 2]))
    result = {
        "source": args.source, "dataset": dataset, "workers": args.workers,
        "images": full["images"], "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "bare_decode_images_per_second": [round(b, 1) for b in bares],
        "flow_images_per_second_runs": [run["flow_images_per_second"] for run in timed],
        "ratios_flow_vs_bare": [round(r, 3) for r in ratios],
        "flow_images_per_second": full["flow_images_per_second"],  # the worst run's
        "command_wall_seconds": round(full["wall_seconds"], 2),
        "ratio_flow_vs_bare": round(full["flow_images_per_second"] / bare, 3),
        "ratio_command_vs_bare": round(full["wall_images_per_second"] / bare, 3),
        "peak_gib": {"1_shard": one["peak_gib"], f"{SHARDS}_shards": sampled["peak_gib"]},
        "target_ratio": TARGET, "target_rss_gib": RSS_TARGET_GIB,
    }
    print(f"\n{'measure (' + args.source + ', --workers ' + str(args.workers) + ')':<40}"
          f"{'img/s':>8}{'x bare':>8}")
    print(f"{'bare decode + model.encode (around it)':<40}{bare:>8.0f}{1.0:>8.2f}")
    print(f"{f'encode flow, {SHARDS} shards (worst run)':<40}{full['flow_images_per_second']:>8.0f}"
          f"{result['ratio_flow_vs_bare']:>8.2f}")
    print(f"{'  whole command incl. start-up':<40}{full['wall_images_per_second']:>8.0f}"
          f"{result['ratio_command_vs_bare']:>8.2f}")
    print(f"\n{'peak memory (GiB)':<40}{'cmd RSS':>9}{'tree PSS':>10}{'tree RSS':>10}")
    for label, run in (("encode, 1 shard", one), (f"encode, {SHARDS} shards", sampled)):
        peak = run["peak_gib"]
        print(f"{label:<40}{peak['command_rss']:>9.2f}{peak['tree_pss']:>10.2f}"
              f"{peak['tree_rss']:>10.2f}")
    (out / f"encode_throughput_{args.source}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""What ``tokenizer.heap.keep_freed_memory`` saves: CPU training steps, encode batches and
token-prior steps with the policy and without it (``VQTOK_KEEP_FREED_MEMORY=0``), side by
side.

Each measurement runs in a fresh process (the policy is per process), the two settings
alternating, on the bundled MNIST sample with the default config: ``--steps`` training steps
(batch 64, as ``train`` runs them after the warm-up: quantized, Adam), an encode of
``--images`` images in batches of 256 through ``encode_ids`` (what ``encode`` runs), and
``--steps`` steps of the default token prior (batch 128 of 7x7 grids over 512 codes, AdamW,
as ``prior train`` runs them). Each starts after a few untimed steps, as a long run would.
Reported per workload and setting: median wall and CPU seconds (every thread of the
process), system seconds, minor page faults and peak RSS; then the ratios of the medians.
Last line: one JSON object, also written to OUT/heap.json.

    python benchmarks/heap.py --repeats 3 --threads 2 --out runs/heap
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SETTINGS = {"kept": {}, "returned": {"VQTOK_KEEP_FREED_MEMORY": "0"}}
WORKLOADS = ("train", "encode", "prior")


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_stime, r.ru_minflt


def probe(workload: str, steps: int, images: int, threads: int) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import numpy as np
    import torch
    from vqtok.tokenizer.accel import Accel
    from vqtok.tokenizer.checkpoint import build_model
    from vqtok.tokenizer.config import Config
    from vqtok.tokenizer.encode import encode_ids
    from vqtok.tokenizer.heap import keep_freed_memory
    from vqtok.tokenizer.prior import train as prior_train
    from vqtok.tokenizer.prior.config import PriorConfig, PriorShape
    from vqtok.tokenizer.prior.model import TokenPrior
    from vqtok.tokenizer.sources import open_source
    from vqtok.tokenizer.training import make_optimizer

    torch.set_num_threads(threads)
    config = Config()
    source = open_source(config.data)
    torch.manual_seed(0)
    model = Accel.for_device("cpu").prepare(build_model(config, source.channels))
    ids = np.arange(len(source), dtype=np.int64)
    if workload == "train":
        optimizer = make_optimizer(model, config)
        batches = [source.load_batch(ids[i * 64:(i + 1) * 64])[0] for i in range(50)]

        def run(n: int) -> None:
            for i in range(n):
                loss = model(batches[i % len(batches)]).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        model.train()
        run(5)
        amount = steps
    elif workload == "prior":
        keep_freed_memory()  # as train_prior does
        prior_config = PriorConfig()
        prior = TokenPrior(PriorShape(vocab_size=512, grid_h=7, grid_w=7, num_classes=10),
                           prior_config.model).train()
        prior_optimizer = prior_train.make_optimizer(prior, prior_config)
        generator = torch.Generator().manual_seed(0)
        batch = prior_config.train.batch_size
        codes = torch.randint(512, (50, batch, 49), generator=generator)
        labels = torch.randint(10, (50, batch), generator=generator)

        def run(n: int) -> None:
            for i in range(n):
                loss = prior.loss(codes[i % 50], labels[i % 50])
                prior_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                prior_optimizer.step()

        run(5)
        amount = steps
    else:
        def run(n: int) -> None:
            for _ in encode_ids(model, source, ids[:n], 256):
                pass

        run(512)
        amount = images
    cpu, sys_s, faults = _usage()
    wall = time.perf_counter()
    run(amount)
    wall = time.perf_counter() - wall
    cpu2, sys2, faults2 = _usage()
    return {"wall_s": wall, "cpu_s": cpu2 - cpu, "sys_s": sys2 - sys_s,
            "minor_faults": faults2 - faults,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/heap")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--probe", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.steps, args.images, args.threads)))
        return

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for workload in args.workloads.split(","):
        runs[workload] = {name: [] for name in SETTINGS}
        for repeat in range(args.repeats):
            order = list(SETTINGS) if repeat % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                command = [sys.executable, __file__, "--probe", workload,
                           "--steps", str(args.steps), "--images", str(args.images),
                           "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, check=True,
                                      env={**os.environ, **SETTINGS[name]})
                runs[workload][name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary: dict[str, Any] = {"threads": args.threads, "steps": args.steps,
                               "images": args.images, "repeats": args.repeats, "runs": runs}
    print(f"\n{'workload':<10}{'malloc':<10}{'wall s':>8}{'CPU s':>8}{'sys s':>7}"
          f"{'faults':>10}{'peak RSS MiB':>14}")
    for workload, by_setting in runs.items():
        medians = {}
        for name, probes in by_setting.items():
            medians[name] = {key: statistics.median(p[key] for p in probes)
                             for key in probes[0]}
            m = medians[name]
            print(f"{workload:<10}{name:<10}{m['wall_s']:>8.2f}{m['cpu_s']:>8.2f}"
                  f"{m['sys_s']:>7.2f}{m['minor_faults']:>10.0f}{m['peak_rss_mib']:>14.0f}")
        kept, returned = medians["kept"], medians["returned"]
        summary[workload] = {"medians": medians,
                             "wall_ratio": kept["wall_s"] / returned["wall_s"],
                             "cpu_ratio": kept["cpu_s"] / returned["cpu_s"]}
        print(f"{workload:<10}kept / returned: wall {summary[workload]['wall_ratio']:.2f}x, "
              f"CPU {summary[workload]['cpu_ratio']:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heap.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

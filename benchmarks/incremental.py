"""Cost of an incremental update against a full encode (issue: growing datasets).

Writes a folder of MNIST PNGs, encodes it, then adds 1 %, rewrites 0.1 % and removes 0.1 %
of the images and encodes again, ``--repeats`` times; every encode runs in one process (one
Prefect server) after a small unreported warm-up encode and update, so the figures compare
the flows, not start-up. Reports walls and the CPU seconds of this process (the Prefect
server's own process is not counted: orchestration, not encoding) and their ratios, worst
run last, how much of the update's CPU went to threads that came and went within the flow
run (Prefect's heartbeat thread), and apart the first full-size cycle's: its update is the
first to touch memory at that size (fresh pages, faulted in: ~0.1 s of system time that
later cycles reuse), what a fresh scheduled process pays and a long-lived one (``serve``)
pays once. Checks that the update equals a ``--reencode`` of the same store row for row,
and, key for key, a fresh encode of the new folder.

    python benchmarks/incremental.py --data-root ../shared/data/mnist --out runs/bench/inc
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np


def write_folder(images: np.ndarray, folder: Path, names: range, offset: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in names:
        Image.fromarray(images[(i + offset) % len(images)]).save(folder / f"{i:06d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", default="runs/bench/incremental")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    import torch
    from prefect.testing.utilities import prefect_test_harness
    from vqtok.flows.encode_flow import encode_flow
    from vqtok.storage import load_grid
    from vqtok.tokenizer import save_checkpoint
    from vqtok.tokenizer.checkpoint import build_model
    from vqtok.tokenizer.config import parse_config
    from vqtok.tokenizer.sources import read_idx

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    mnist = read_idx(next(Path(args.data_root).glob("train-images-idx3-ubyte*")))
    folder = out / "images"
    write_folder(mnist, folder, range(args.images))
    config = parse_config({"data": {"dataset": f"imagefolder:{folder}", "channels": 1,
                                    "image_size": 28}})
    torch.manual_seed(0)
    model = build_model(config)
    model.train()(torch.rand(256, 1, 28, 28))  # k-means initialised codebook: varied codes
    checkpoint = out / "checkpoint"
    save_checkpoint(checkpoint, model, config)
    data = config.data.model_dump()

    def encode(target: Path, **extra: object) -> tuple[float, float, float, dict]:
        """(wall s, CPU s of this process - every thread, so torch's too -, CPU s of the
        threads that started and ended within the flow run, dict)."""
        wall, cpu, threads = time.perf_counter(), time.process_time(), thread_cpu()
        result = encode_flow(checkpoint=str(checkpoint), out=str(target), data=data,
                             progress=False, **extra)
        cpu, after = time.process_time() - cpu, thread_cpu()
        survivors = sum(after[tid] - threads.get(tid, 0.0) for tid in after)
        passing = max(cpu - survivors, 0.0) if after else 0.0  # {}: no /proc, not measured
        return time.perf_counter() - wall, cpu, passing, result

    n = args.images
    added, changed, removed = n // 100, n // 1000, n // 1000
    rng = np.random.default_rng(0)
    picked = [int(i) for i in rng.choice(n, changed + removed, replace=False)]
    runs = []
    with prefect_test_harness(server_startup_timeout=180):
        warm_up(mnist, out / "warm-up", checkpoint, data)
        for repeat in range(args.repeats):
            if repeat:  # back to the original folder, and a fresh store
                for i in range(n, n + added):
                    (folder / f"{i:06d}.png").unlink()
                write_folder(mnist, folder, picked)
                shutil.rmtree(out / "store")
            full_wall, full_cpu, _, _ = encode(out / "store")
            write_folder(mnist, folder, range(n, n + added))
            write_folder(mnist, folder, picked[:changed], offset=31_337)
            for i in picked[changed:]:
                (folder / f"{i:06d}.png").unlink()
            update_wall, update_cpu, passing, update = encode(out / "store")
            runs.append({"full_wall_s": full_wall, "full_cpu_s": full_cpu,
                         "update_wall_s": update_wall, "update_cpu_s": update_cpu,
                         "update_passing_threads_cpu_s": passing,
                         "wall_ratio": update_wall / full_wall,
                         "cpu_ratio": update_cpu / full_cpu,
                         "cpu_ratio_without_passing_threads": (update_cpu - passing) / full_cpu,
                         "changes": update["changes"], "encoded": update["encoded_images"]})
            print(f"run {repeat}: full {full_wall:6.2f} s wall {full_cpu:6.2f} s CPU | update "
                  f"{update_wall:5.2f} s wall {update_cpu:5.2f} s CPU ({passing:4.2f} in "
                  f"passing threads) | ratio wall {update_wall / full_wall:.3f} CPU "
                  f"{update_cpu / full_cpu:.3f} ({(update_cpu - passing) / full_cpu:.3f} "
                  f"without) | {update['changes']} ({update['encoded_images']} encoded)")
        encode(out / "store-fresh")  # a fresh full encode of the new folder
        shutil.copytree(out / "store", out / "store-reencoded", symlinks=True)
        encode(out / "store-reencoded", reencode=True)

    mine, again = load_grid(out / "store"), load_grid(out / "store-reencoded")
    rows_equal = (np.array_equal(mine.ids, again.ids) and np.array_equal(mine.codes, again.codes)
                  and np.array_equal(mine.labels, again.labels))
    mine_keys, fresh_keys = by_key(out / "store"), by_key(out / "store-fresh")
    keys_equal = mine_keys.keys() == fresh_keys.keys() and all(
        mine_keys[k][1:] == fresh_keys[k][1:] for k in mine_keys)  # label, codes
    # Splits follow ids (every tenth id is validation, and an image keeps its split), while
    # a fresh folder numbers its images afresh: they agree where the ids do. Counted only.
    same_split = sum(mine_keys[k][0] == fresh_keys.get(k, ("",))[0] for k in mine_keys)
    worst = max(runs, key=lambda run: run["cpu_ratio"])
    steady = runs[1:] or runs
    table = {"images": n, "threads": args.threads, "runs": runs,
             "worst_wall_ratio": max(run["wall_ratio"] for run in runs),
             "worst_cpu_ratio": worst["cpu_ratio"],
             "first_cycle_cpu_ratio": runs[0]["cpu_ratio"],
             "worst_cpu_ratio_after_first": max(run["cpu_ratio"] for run in steady),
             "worst_cpu_ratio_without_passing_threads": max(
                 run["cpu_ratio_without_passing_threads"] for run in runs),
             "equals_reencode_row_for_row": bool(rows_equal),
             "equals_fresh_encode_key_for_key": bool(keys_equal),
             "same_split_as_fresh_encode": same_split, "rows": len(mine_keys)}
    print(f"worst of {len(runs)}: wall ratio {table['worst_wall_ratio']:.3f}, CPU ratio "
          f"{table['worst_cpu_ratio']:.3f}; first cycle {table['first_cycle_cpu_ratio']:.3f}, "
          f"worst of the others {table['worst_cpu_ratio_after_first']:.3f}; without passing "
          f"threads {table['worst_cpu_ratio_without_passing_threads']:.3f}")
    print(f"update equals --reencode row for row: {rows_equal}; equals a fresh encode of the "
          f"new folder key for key (codes, labels): {keys_equal}; same split there for "
          f"{same_split} of {len(mine_keys)} keys (splits follow ids, kept across versions)")
    (out / "incremental.json").write_text(json.dumps(table, indent=2))
    print(json.dumps(table))


def thread_cpu() -> dict[int, float]:
    """CPU seconds of each live thread of this process, by thread id (Linux; {} elsewhere).
    What a flow run's CPU holds beyond its surviving threads' is that of threads that came
    and went within it: Prefect's flow-run heartbeat thread, here."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    found = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended while listed
            continue
        found[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return found


def warm_up(images: np.ndarray, where: Path, checkpoint: Path, data: dict) -> None:
    """A small full encode and update first, not reported: what a process does once (lazy
    imports, first calls into Arrow, HDF5 and PIL) is start-up, not either encode's cost."""
    from vqtok.flows.encode_flow import encode_flow

    folder = where / "images"
    write_folder(images, folder, range(100))
    settings = {**data, "dataset": f"imagefolder:{folder}"}
    for step in range(2):
        if step:
            write_folder(images, folder, range(100, 105))
            write_folder(images, folder, [3], offset=7)
            (folder / f"{5:06d}.png").unlink()
        encode_flow(checkpoint=str(checkpoint), out=str(where / "store"), data=settings,
                    progress=False)


def by_key(store: Path) -> dict[str, tuple]:
    """key -> (split, label, codes bytes), joined through the current version's key map:
    what must be equal between stores that gave ids in another order."""
    import pyarrow.parquet as pq
    from vqtok.storage import load_grid

    keys = pq.read_table(store / ".vqtok" / "current" / ".vqtok" / "keys.parquet",
                         columns=["key", "id", "present"]).to_pydict()
    key_of = {i: k for k, i, p in zip(keys["key"], keys["id"], keys["present"], strict=True)
              if p}
    grid = load_grid(store)
    names = grid.split_names
    return {key_of[int(i)]: (names[s], int(label), codes.tobytes())
            for i, s, label, codes in zip(grid.ids, grid.split_index, grid.labels, grid.codes,
                                          strict=True)}


if __name__ == "__main__":
    main()

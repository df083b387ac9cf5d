"""Cost of an incremental update against a full encode (issue: growing datasets).

Writes a folder of MNIST PNGs, encodes it, then adds 1 %, rewrites 0.1 % and removes 0.1 %
of the images and encodes again; both encodes run in one process (one Prefect server), so
the walls compare the flows, not start-up. Checks that the update equals a ``--reencode``
of the same store row for row, and, key for key, a fresh encode of the new folder.

    python benchmarks/incremental.py --data-root ../shared/data/mnist --out runs/bench/inc
"""

from __future__ import annotations

import argparse
import json
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

    def encode(target: Path, **extra: object) -> tuple[float, dict]:
        started = time.perf_counter()
        result = encode_flow(checkpoint=str(checkpoint), out=str(target), data=data,
                             progress=False, **extra)
        return time.perf_counter() - started, result

    with prefect_test_harness(server_startup_timeout=180):
        full_s, full = encode(out / "store")
        n = args.images
        added, changed, removed = n // 100, n // 1000, n // 1000
        write_folder(mnist, folder, range(n, n + added))
        rng = np.random.default_rng(0)
        picked = rng.choice(n, changed + removed, replace=False)
        write_folder(mnist, folder, [int(i) for i in picked[:changed]], offset=31_337)
        for i in picked[changed:]:
            (folder / f"{int(i):06d}.png").unlink()
        update_s, update = encode(out / "store")
        _, rebuilt = encode(out / "store-fresh")  # a fresh full encode of the new folder
        shutil.copytree(out / "store", out / "store-reencoded", symlinks=True)
        _, reencoded = encode(out / "store-reencoded", reencode=True)

    mine = load_grid(out / "store")
    again = load_grid(out / "store-reencoded")
    rows_equal = (np.array_equal(mine.ids, again.ids) and np.array_equal(mine.codes, again.codes)
                  and np.array_equal(mine.labels, again.labels))
    table = {
        "images": n, "full_seconds": full_s, "update_seconds": update_s,
        "ratio": update_s / full_s, "update_changes": update["changes"],
        "update_encoded_images": update["encoded_images"],
        "equals_reencode_row_for_row": bool(rows_equal),
        "fresh_encode_rows": rebuilt["images"],
    }
    print(f"full encode  {n} images   {full_s:7.2f} s")
    print(f"update       {update['changes']}   {update_s:7.2f} s "
          f"({update['encoded_images']} encoded)")
    print(f"ratio        {update_s / full_s:.3f}")
    print(f"update equals --reencode row for row: {rows_equal}")
    (out / "incremental.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()

"""Encode images/s and training steps/s on this machine's device, each next to its bare loop.

    python benchmarks/gpu_path.py [--dataset mnist --data-root DIR] [--checkpoint DIR]
        [--device auto] [--encode-batch N] [--train-steps 200] [--out runs/gpu-path]

Measured in one process, one after another:
- bare ``model.encode``: a loop over batches already on the device (same layout and autocast
  as the pipeline), nothing loaded or copied: the limit for encoding;
- ``encode_ids``: the pipeline's encoder, loading from the dataset, pinned memory,
  background prefetch, non-blocking copies;
- bare training step: forward, backward and Adam on one batch already on the device;
- training loop: the same steps fed by ``iterate_id_batches`` (prefetch, pinned copies).
Each pair is run with the device's defaults (``Accel.for_device``: on CUDA channels_last, bf16
autocast, pinned memory, prefetch) and with everything off (fp32, plain layout, inline
loading). On a CPU both settings are the same. Last line: one JSON object, also in OUT.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from vqtok.tokenizer import load_tokenizer
from vqtok.tokenizer.accel import Accel, encode_batch_size
from vqtok.tokenizer.checkpoint import build_model
from vqtok.tokenizer.config import Config, DataConfig
from vqtok.tokenizer.encode import encode_ids
from vqtok.tokenizer.sources import iterate_id_batches, open_source, split_batches
from vqtok.tokenizer.training import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_encode(model, images: torch.Tensor, batch: int, accel: Accel) -> float:
    on_device = [accel.to_device(images[i : i + batch]) for i in range(0, len(images), batch)]
    with torch.inference_mode(), accel.autocast():
        model.encode(on_device[0])  # warm-up (cuDNN autotuning, lazy init)
        _sync(accel.device)
        start = time.perf_counter()
        for x in on_device:
            model.encode(x)
        _sync(accel.device)
    return len(images) / (time.perf_counter() - start)


def pipeline_encode(model, source, ids, batch: int, accel: Accel) -> float:
    start = time.perf_counter()
    count = sum(len(codes) for codes, _, _ in encode_ids(model, source, ids, batch,
                                                        accel=accel))
    _sync(accel.device)
    return count / (time.perf_counter() - start)


def train_steps(config: Config, source, ids, steps: int, accel: Accel, bare: bool) -> float:
    torch.manual_seed(0)
    model = accel.prepare(build_model(config, source.channels)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    scaler = accel.grad_scaler()
    batches = split_batches(ids, config.train.batch_size)[: steps + 1]
    if bare:
        fixed = accel.to_device(source.load_batch(batches[0])[0])
        feed = ((fixed, None) for _ in range(len(batches)))
    else:
        feed = iterate_id_batches(source, batches, pin=accel.pin_memory,
                                  prefetch=accel.prefetch)
    start, done = 0.0, -1
    for images, _ in feed:
        if done == 0:  # the first step (k-means init, warm-up) is not timed
            _sync(accel.device)
            start = time.perf_counter()
        images = accel.to_device(images)
        with accel.autocast():
            loss = model(images).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        done += 1
    _sync(accel.device)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist-sample")
    parser.add_argument("--data-root")
    parser.add_argument("--checkpoint", help="default: an untrained model (speed does not "
                        "depend on the weights)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--encode-batch", type=int, help="default: fitted to the device")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--out", default="runs/gpu-path")
    args = parser.parse_args()
    device = resolve_device(args.device)
    config = Config().with_overrides(**{"data.dataset": args.dataset,
                                        "data.data_root": args.data_root})
    source = open_source(DataConfig.model_validate(config.data.model_dump()))
    ids = source.split_ids(config.data.train_split)
    images, _ = source.load_batch(ids)
    shape = tuple(images.shape[1:])

    def model():
        m = load_tokenizer(args.checkpoint) if args.checkpoint else build_model(config).eval()
        return m

    results = {"device": str(device), "gpu": torch.cuda.get_device_name(device)
               if device.type == "cuda" else None, "images": len(ids), "settings": {}}
    settings = {"defaults": Accel.for_device(device), "all off": Accel(device)}
    for name, accel in settings.items():
        m = accel.prepare(model())
        batch = args.encode_batch or encode_batch_size(m, shape, accel, 256)
        row = {"encode_batch": batch,
               "bare_encode_img_s": bare_encode(m, images, batch, accel),
               "encode_img_s": pipeline_encode(m, source, ids, batch, accel),
               "bare_train_steps_s": train_steps(config, source, ids, args.train_steps,
                                                 accel, bare=True),
               "train_steps_s": train_steps(config, source, ids, args.train_steps, accel,
                                            bare=False)}
        row["encode_vs_bare"] = row["encode_img_s"] / row["bare_encode_img_s"]
        row["train_vs_bare"] = row["train_steps_s"] / row["bare_train_steps_s"]
        row["train_img_s"] = row["train_steps_s"] * config.train.batch_size
        results["settings"][name] = row
        if device.type != "cuda":
            break  # on CPU both settings are the same
    print(f"\ndevice {results['gpu'] or device}; {len(ids)} images, train batch "
          f"{config.train.batch_size}")
    print(f"{'settings':<10}{'batch':>7}{'bare enc img/s':>16}{'encode img/s':>14}{'x bare':>8}"
          f"{'bare steps/s':>14}{'train steps/s':>15}{'x bare':>8}")
    for name, r in results["settings"].items():
        print(f"{name:<10}{r['encode_batch']:>7}{r['bare_encode_img_s']:>16,.0f}"
              f"{r['encode_img_s']:>14,.0f}{r['encode_vs_bare']:>8.2f}"
              f"{r['bare_train_steps_s']:>14.1f}{r['train_steps_s']:>15.1f}"
              f"{r['train_vs_bare']:>8.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_path.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""Determinism of encoding on CPU: do codes depend on the batch size?

Encodes every image of a dataset with the same checkpoint at several batch sizes, through
``tokenizer.encode.encode_ids`` (what ``tokenize-dataset encode`` runs per shard), and counts
the codes that differ from the batch-256 run. It also runs the bare ``model.encode`` at batch
1, which ``encode_ids`` avoids (it encodes a lone image as a batch of two copies), and says
why that one differs: the encoder's fp32 output depends slightly on the kernel PyTorch picks
for the batch, and a flipped code is a near tie between two codebook entries. For that it
measures the largest latent difference, re-quantises the reference latents one image at a
time to separate the quantiser's share, and reports the fp64 distance gap between the two
competing codes at every flipped position.

    python benchmarks/determinism.py --checkpoint runs/quality/checkpoint \
        --dataset mnist-sample --out runs/determinism

Last line: one JSON object, also written to OUT/determinism.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from vqtok.tokenizer import load_tokenizer, open_source
from vqtok.tokenizer.checkpoint import read_checkpoint_meta
from vqtok.tokenizer.config import DataConfig
from vqtok.tokenizer.encode import encode_ids
from vqtok.tokenizer.quantizers.vq import nearest_code

REFERENCE = 256


def encode_all(model, source, ids: np.ndarray, batch_size: int,
               bare: bool = False) -> tuple[np.ndarray, float]:
    """Codes of every image, through encode_ids or (``bare``) model.encode batch by batch."""
    start = time.perf_counter()
    if bare:
        codes = []
        with torch.inference_mode():
            for first in range(0, len(ids), batch_size):
                images, _ = source.load_batch(ids[first : first + batch_size])
                codes.append(model.encode(images).numpy())
    else:
        codes = [c for c, _, _ in encode_ids(model, source, ids, batch_size, "cpu")]
    return np.concatenate(codes), time.perf_counter() - start


@torch.no_grad()
def latents(model, source, ids: np.ndarray, batch_size: int) -> torch.Tensor:
    """(N*h*w, D) fp32 encoder outputs in raster order, computed at ``batch_size``."""
    out = []
    for start in range(0, len(ids), batch_size):
        images, _ = source.load_batch(ids[start : start + batch_size])
        z = model.latent(images).float()
        out.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
    return torch.cat(out)


def anatomy(model, source, ids: np.ndarray, small: int, ref_codes: np.ndarray,
            small_codes: np.ndarray) -> dict:
    """Why codes at batch ``small`` differ from batch REFERENCE, for the images that differ."""
    differ = (small_codes != ref_codes).reshape(len(ids), -1).any(axis=1)
    picked = ids[differ]
    if len(picked) == 0:
        return {}
    grid = ref_codes.shape[1] * ref_codes.shape[2]
    z_small = latents(model, source, picked, small)
    # The same images inside full reference batches: encode their whole batches, keep them.
    z_ref_rows = []
    for image in picked:
        position = int(np.flatnonzero(ids == image)[0])
        batch_start = position - position % REFERENCE
        batch = ids[batch_start : batch_start + REFERENCE]
        z = latents(model, source, batch, REFERENCE)
        offset = (position - batch_start) * grid
        z_ref_rows.append(z[offset : offset + grid])
    z_ref = torch.cat(z_ref_rows)
    codebook = model.quantizer.codebook.detach().float()
    # Quantiser alone: the reference latents, quantised one image at a time vs all at once.
    per_image = torch.cat([nearest_code(z_ref[i : i + grid], codebook)
                           for i in range(0, len(z_ref), grid)])
    together = nearest_code(z_ref, codebook)
    flipped = (small_codes[differ].reshape(-1) != ref_codes[differ].reshape(-1))
    a = torch.from_numpy(ref_codes[differ].reshape(-1)[flipped])
    b = torch.from_numpy(small_codes[differ].reshape(-1)[flipped])
    rows = torch.from_numpy(np.flatnonzero(flipped))
    z64 = z_ref[rows].double()
    e64 = codebook.double()
    d_a = ((z64 - e64[a]) ** 2).sum(1)
    d_b = ((z64 - e64[b]) ** 2).sum(1)
    gap = (d_a - d_b).abs() / d_a.clamp_min(1e-30)
    scale = z_ref.abs().max()
    return {
        "images_compared": int(len(picked)),
        "max_abs_latent_difference": float((z_small - z_ref).abs().max()),
        "latent_scale_max_abs": float(scale),
        "quantiser_flips_alone": int((per_image != together).sum()),
        "flipped_relative_distance_gap_max": float(gap.max()),
        "flipped_relative_distance_gap_median": float(gap.median()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", default=None, help="default: the checkpoint's own")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--batch-sizes", default="1,2,7,64,256,1000")
    parser.add_argument("--bare-batch-size", type=int, default=1,
                        help="also run the bare model.encode at this batch size (0: skip)")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--out", default="runs/determinism")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    meta = read_checkpoint_meta(args.checkpoint)
    data = DataConfig.model_validate(meta["config"]["data"])
    changes = {k: v for k, v in (("dataset", args.dataset), ("data_root", args.data_root)) if v}
    data = data.model_copy(update=changes)
    model = load_tokenizer(args.checkpoint)
    source = open_source(data)
    ids = np.concatenate([source.split_ids(s) for s in source.splits])[: args.limit]
    sizes = sorted({int(s) for s in args.batch_sizes.split(",")} | {REFERENCE})

    runs = {}
    for size in sizes:
        codes, seconds = encode_all(model, source, ids, size)
        runs[("encode_ids", size)] = (codes, seconds)
        print(f"encode_ids   batch {size:>5}: {seconds:7.1f} s", flush=True)
    if args.bare_batch_size:
        codes, seconds = encode_all(model, source, ids, args.bare_batch_size, bare=True)
        runs[("model.encode", args.bare_batch_size)] = (codes, seconds)
        print(f"model.encode batch {args.bare_batch_size:>5}: {seconds:7.1f} s", flush=True)
    ref = runs[("encode_ids", REFERENCE)][0]
    table = []
    for (path, size), (codes, seconds) in runs.items():
        diff = codes != ref
        table.append({"path": path, "batch_size": size, "codes_differing": int(diff.sum()),
                      "codes": int(diff.size), "fraction_codes": float(diff.mean()),
                      "images_differing": int(diff.reshape(len(ids), -1).any(axis=1).sum()),
                      "seconds": round(seconds, 2)})
    why = {}
    if args.bare_batch_size:
        bare = runs[("model.encode", args.bare_batch_size)][0]
        why = anatomy(model, source, ids, args.bare_batch_size, ref, bare)

    print(f"\n{len(ids)} images of {source.name}, {ref.shape[1]}x{ref.shape[2]} grids, "
          f"K={model.num_embeddings}, {torch.get_num_threads()} threads; reference batch "
          f"{REFERENCE}")
    print(f"{'path':<14}{'batch':>6}{'codes differing':>20}{'fraction':>11}{'images':>8}"
          f"{'seconds':>9}")
    for row in table:
        print(f"{row['path']:<14}{row['batch_size']:>6}{row['codes_differing']:>10} / "
              f"{row['codes']:<7}{row['fraction_codes']:>11.2e}{row['images_differing']:>8}"
              f"{row['seconds']:>9.1f}")
    if why:
        print(f"\nwhy bare model.encode at batch {args.bare_batch_size} differs (over the "
              f"{why['images_compared']} images that do):")
        print(f"  largest latent difference  {why['max_abs_latent_difference']:.3g} "
              f"(latents reach {why['latent_scale_max_abs']:.3g})")
        print(f"  flips from the quantiser's own GEMM, same latents: "
              f"{why['quantiser_flips_alone']}")
        print(f"  relative distance gap between the two codes at flipped positions: max "
              f"{why['flipped_relative_distance_gap_max']:.2e}, median "
              f"{why['flipped_relative_distance_gap_median']:.2e}")
    result = {"dataset": source.name, "images": int(len(ids)),
              "checkpoint": meta["weights_sha256"][:16], "threads": torch.get_num_threads(),
              "reference_batch_size": REFERENCE, "runs": table, "why": why}
    (out / "determinism.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

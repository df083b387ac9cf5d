"""A token file -> images, originals beside reconstructions, MSE/PSNR per image: the work
behind ``decode``.

Any token file decodes with the tokenizer that made it (prior samples too); a file from
another tokenizer is refused by the checkpoint hash in its metadata. Plain functions, no
Prefect: ``decode_flow`` runs ``decode_tokens`` as a task (recorded, with a table artifact),
and the CLI calls it directly when no Prefect server is configured (``flows.recording``).
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from vqtok.files.atomic import atomic_path
from vqtok.flows.errors import PipelineError
from vqtok.flows.runtime import cached_model, cached_source
from vqtok.storage import load_grid, read_meta
from vqtok.storage.keymap import KeyMap, rows_of
from vqtok.storage.versions import version_keymap_path
from vqtok.tokenizer.config import ENCODE_BATCH_SIZE, DataConfig
from vqtok.tokenizer.sources import DataError
from vqtok.tokenizer.stats import psnr
from vqtok.tokenizer.visualize import save_image_grid, save_reconstruction_grid


def _originals(tokens: str, meta_extra: dict[str, Any], fingerprint: str, ids: np.ndarray,
               logger: Any) -> tuple[torch.Tensor, np.ndarray] | None:
    """The source images of the rows with these ids that are still in the dataset as they
    were encoded, and a mask of those rows; None when there are none to compare with.

    A versioned store's ids are not source positions (removed images leave gaps, new ones
    come after every id given): its key map names each id's key and the hash of the bytes
    it was encoded from, so only rows whose image is still there, unchanged, are compared.
    Without a key map (a plain token file) ids are positions, trusted while the dataset's
    fingerprint is unchanged. Generated grids (prior samples) name no dataset image.
    """
    if "data" not in meta_extra or meta_extra.get("generated_by"):
        return None
    try:
        source = cached_source(DataConfig.model_validate(meta_extra["data"]))
    except (DataError, ValueError) as exc:
        logger.warning(f"originals unavailable ({exc}); decoding without a comparison")
        return None
    keymap_path = version_keymap_path(tokens)
    if keymap_path is None:
        if source.fingerprint != fingerprint:
            logger.warning(f"{source.name} changed since encoding; decoding without a "
                           "comparison")
            return None
        return source.load_batch(ids)[0], np.ones(len(ids), dtype=bool)
    keymap = KeyMap.read(keymap_path)
    rows = np.minimum(np.searchsorted(keymap.ids, ids), len(keymap.ids) - 1)  # by id
    known = keymap.ids[rows] == ids
    positions = np.full(len(ids), -1, dtype=np.int64)
    positions[known] = rows_of(keymap.keys[rows[known]],
                               np.asarray(source.item_keys(), dtype=object))
    found = positions >= 0
    same = np.zeros(len(ids), dtype=bool)
    same[found] = (np.asarray(source.content_hashes(positions[found]), dtype=object)
                   == keymap.hashes[rows[found]])
    if not same.all():
        logger.warning(f"{int((~same).sum())} of {len(ids)} images changed or left "
                       f"{source.name} since encoding; "
                       + ("compared on the others" if same.any() else
                          "decoding without a comparison"))
    if not same.any():
        return None
    return source.load_batch(positions[same])[0], same


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> Path:
    with atomic_path(path) as temp, open(temp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def decode_tokens(tokens: str, checkpoint: str, out: str, split: str | None = None,
                  limit: int = 1000, picture_count: int = 32, device: str = "auto",
                  logger: Any = None) -> dict[str, Any]:
    """Decode up to ``limit`` rows; PSNR is from the mean MSE over them. With originals, the
    result's ``table`` holds the first 50 rows' figures (the flow's artifact)."""
    logger = logger or logging.getLogger("vqtok.decode")
    model = cached_model(checkpoint, device)
    meta = read_meta(tokens)
    shape = (meta.grid_h, meta.grid_w, *((model.depth,) if model.depth > 1 else ()))
    meta.check_tokenizer(model.checkpoint_hash, model.num_embeddings, shape, where=tokens)
    grid = load_grid(tokens, split=split)
    rows = min(limit, len(grid.codes))
    if rows == 0:
        where = f" in split '{split}'" if split else ""
        raise PipelineError(f"{tokens}: no rows to decode{where}; pick another split")
    codes = torch.from_numpy(grid.codes[:rows].astype(np.int64))
    device_t = model.quantizer.codebook.device
    decoded = torch.cat([model.decode(codes[i : i + ENCODE_BATCH_SIZE].to(device_t)).cpu()
                         for i in range(0, rows, ENCODE_BATCH_SIZE)])
    ids, labels = grid.ids[:rows], grid.labels[:rows]
    found = _originals(tokens, meta.extra, meta.dataset_fingerprint, ids, logger)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"images": rows, "tokens": tokens}
    shown = min(picture_count, rows)
    if found is None:
        result["picture"] = str(save_image_grid(decoded[:shown], folder / "decoded.png"))
        return result
    originals, compared = found
    if not compared.all():  # only rows whose image is there as it was encoded
        keep = torch.from_numpy(compared)
        decoded, ids, labels = decoded[keep], ids[compared], labels[compared]
        shown = min(shown, len(ids))
    errors = ((decoded - originals) ** 2).flatten(1).mean(dim=1).numpy()
    splits = grid.splits[:rows][compared]
    table = [{"id": int(i), "label": int(lab), "split": str(s), "mse": float(e),
              "psnr": psnr(float(e))} for i, lab, s, e in zip(ids, labels, splits, errors,
                                                                strict=True)]
    result["metrics"] = str(_write_metrics(folder / "metrics.csv", table))
    result["picture"] = str(save_reconstruction_grid(originals[:shown], decoded[:shown],
                                                     folder / "reconstructions.png"))
    mean_mse = float(errors.mean())
    result.update(mse=mean_mse, psnr=psnr(mean_mse),
                  mean_image_psnr=float(np.mean([min(r["psnr"], 99.0) for r in table])))
    if int(model.mean_image_count) > 0:  # the trivial baseline on the same images
        baseline = model.mean_image.cpu()
        result["baseline_psnr"] = psnr(float(((originals - baseline) ** 2).mean()))
    result["table"] = [{k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v)
                        for k, v in r.items()} for r in table[:50]]
    return result


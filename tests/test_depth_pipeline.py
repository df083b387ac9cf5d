"""Codes with depth (residual VQ) and FSQ codes through the whole pipeline: run (train ->
encode -> stats -> decode), the stores, the prior and its decoded samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from vqtok.flows.cli import main
from vqtok.storage import load_grid
from vqtok.tokenizer import load_tokenizer, open_source
from vqtok.tokenizer.config import parse_config

from tests.conftest import TINY
from tests.helpers import write_npz

DEPTH = 3


def config(tmp_path, quantizer: dict) -> tuple[str, dict]:
    raw = json.loads(json.dumps(TINY))
    raw["data"]["dataset"] = f"npz:{write_npz(tmp_path / 'tiny.npz', n=40)}"
    raw["quantizer"].update(quantizer)
    if quantizer.get("kind") == "fsq":  # sizes follow from the levels
        del raw["model"]["embedding_dim"], raw["model"]["num_embeddings"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), raw


@pytest.fixture(scope="module")
def rvq_run(tmp_path_factory, prefect_harness):
    tmp_path = tmp_path_factory.mktemp("rvq")
    path, raw = config(tmp_path, {"kind": "rvq", "depth": DEPTH})
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--config", path, "--out", str(out),
                                       "--shard-size", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    return out, raw


def test_run_stores_codes_with_depth_that_decode_like_the_model(rvq_run):
    out, raw = rvq_run
    model = load_tokenizer(out)
    source = open_source(parse_config(raw).data)
    for fmt in ("parquet", "hdf5"):
        grid = load_grid(out, format=fmt)
        assert grid.codes.shape == (40, 2, 2, DEPTH) and grid.meta.depth == DEPTH
        images, _ = source.load_batch(grid.ids)
        direct = model.encode(images)
        assert direct.shape == (40, 2, 2, DEPTH)
        assert torch.equal(torch.from_numpy(grid.codes.astype(np.int64)), direct)
        # Stored (uint16) codes decode to exactly what the model's own codes decode to.
        assert torch.equal(model.decode(torch.from_numpy(grid.codes.copy())), model.decode(direct))
    assert len(np.unique(grid.codes[..., 1])) > 1  # the second level is used, not constant


def test_stats_report_every_level(rvq_run):
    out, _ = rvq_run
    stats = json.loads((out / "stats/stats.json").read_text())
    assert stats["depth"] == DEPTH and len(stats["levels"]) == DEPTH
    grid = load_grid(out)
    for level, report in enumerate(stats["levels"]):
        counts = np.bincount(grid.codes[..., level].reshape(-1), minlength=16)
        assert report["counts"] == counts.tolist()
        assert report["codes_used"] == int((counts > 0).sum())
        assert report["dead_codes"] == 16 - report["codes_used"]
    assert (out / "stats/usage.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "decode/reconstructions.png").is_file()


def test_prior_trains_and_samples_over_depth(rvq_run):
    out, _ = rvq_run
    result = CliRunner().invoke(main, [
        "prior", "train", "--tokens", str(out), "--out", str(out / "prior"), "--steps", "6",
        "--batch-size", "8", "--d-model", "16", "--layers", "1", "--heads", "2", "--device",
        "cpu"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["prior", "sample", "--prior", str(out / "prior"),
                                       "--n", "4", "--seed", "1", "--out", str(out / "samples")])
    assert result.exit_code == 0, result.output
    samples = load_grid(out / "samples" / "samples.parquet")
    assert samples.codes.shape == (4, 2, 2, DEPTH) and samples.meta.depth == DEPTH
    assert (out / "samples" / "decoded.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.usefixtures("prefect_harness")
def test_fsq_stats_report_each_dimension(tmp_path):
    path, _ = config(tmp_path, {"kind": "fsq", "levels": [3, 4]})
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--config", path, "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    grid = load_grid(out)
    assert grid.meta.codebook_size == 12 and grid.meta.extra["quantizer"]["levels"] == [3, 4]
    stats = json.loads((out / "stats/stats.json").read_text())
    first, second = stats["dimensions"]
    codes = grid.codes.reshape(-1).astype(np.int64)
    assert (first["levels"], second["levels"]) == (3, 4)
    assert first["codes_used"] == len(np.unique(codes % 3))  # dimension 0: least significant
    assert second["codes_used"] == len(np.unique(codes // 3))

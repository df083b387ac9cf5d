"""The Prefect flows end to end on a tiny model and a few dozen images."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from vqtok.storage import ParquetTokenWriter, TokenMeta, TokenStoreError, load_grid
from vqtok.tokenizer import load_tokenizer, open_source
from vqtok.tokenizer.config import parse_config

from tests.conftest import TINY
from tests.helpers import write_npz

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_harness):
    from vqtok.flows.encode_flow import encode_flow
    from vqtok.flows.train_flow import train_flow

    root = tmp_path_factory.mktemp("flows")
    npz = write_npz(root / "images.npz", n=40)
    raw = json.loads(json.dumps(TINY))
    raw["data"]["dataset"] = f"npz:{npz}"
    config = parse_config(raw)
    result = train_flow(config.model_dump(), str(root / "run"), False)
    encoded = encode_flow(result["checkpoint"], str(root / "run"), None, ["parquet", "hdf5"],
                          16, 8, "cpu", 0, False)
    return {"root": root, "config": config, "train": result, "encode": encoded}


def test_train_flow_returns_paths_and_figures(trained):
    result = trained["train"]
    assert result["step"] == 5 and result["checkpoint"].endswith("run/checkpoint")
    assert {"mse", "psnr", "usage", "perplexity"} <= set(result["validation"])
    assert load_tokenizer(result["checkpoint"]).checkpoint_hash == result["weights_sha256"]


def test_encoded_tokens_equal_model_encode_in_every_format(trained):
    encoded = trained["encode"]
    assert encoded["images"] == 40 and encoded["encoded_images"] == 40
    assert encoded["shards"] == 4  # train 36 rows -> 3 shards of 16; validation 4 -> 1
    model = load_tokenizer(trained["train"]["checkpoint"])
    source = open_source(trained["config"].data)
    for fmt in ("parquet", "hdf5"):
        grid = load_grid(encoded["tokens"], format=fmt)
        order = np.argsort(grid.ids)
        assert grid.ids[order].tolist() == list(range(40))
        images, labels = source.load_batch(grid.ids)
        assert np.array_equal(grid.codes, model.encode(images).numpy())
        assert np.array_equal(grid.labels, labels.numpy())
        assert grid.meta.checkpoint_hash == model.checkpoint_hash


def test_decoding_stored_tokens_reproduces_decode_of_encode_exactly(trained):
    from vqtok.flows.decode_flow import decode_flow

    model = load_tokenizer(trained["train"]["checkpoint"])
    grid = load_grid(trained["encode"]["tokens"], split="validation")
    images, _ = open_source(trained["config"].data).load_batch(grid.ids)
    expected = model.decode(model.encode(images))
    assert torch.equal(model.decode(torch.from_numpy(grid.codes.astype(np.int64))), expected)

    out = trained["root"] / "decoded"
    result = decode_flow(trained["encode"]["tokens"], trained["train"]["checkpoint"], str(out),
                         split="validation", device="cpu")
    assert result["images"] == 4
    assert (out / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    per_image = ((expected - images) ** 2).flatten(1).mean(dim=1)
    assert [int(r["id"]) for r in rows] == grid.ids.tolist()
    assert [float(r["mse"]) for r in rows] == pytest.approx(per_image.tolist(), rel=1e-6)
    assert result["psnr"] == pytest.approx(10 * math.log10(1 / float(per_image.mean())),
                                           rel=1e-6)


def test_rerun_skips_cached_shards_and_redoes_a_missing_one(trained):
    from vqtok.flows.encode_flow import encode_flow

    run = trained["root"] / "run"
    shard = run / "tokens/train/part-00001.parquet"
    before = {p: p.read_bytes() for p in sorted((run / "tokens").rglob("part-*"))}
    again = encode_flow(trained["train"]["checkpoint"], str(run), None, ["parquet", "hdf5"],
                        16, 8, "cpu", 0, False)
    # Nothing changed: version 1 stands, no shard task runs at all.
    assert not again["new_version"] and again["version"] == 1
    assert again["shards"] == 0 and again["encoded_images"] == 0
    assert {p: p.read_bytes() for p in before} == before

    # As if the first run had been killed before this shard: version 1 was never finalized
    # nor published (no manifest, version.json, current link or tokens/ and hdf5/ links).
    version = (run / ".vqtok/current").resolve()
    shard.unlink()
    (version / "hdf5/train/part-00001.h5").unlink()
    for name in ("done/train/part-00001.json", "manifest.json", "version.json"):
        (version / ".vqtok" / name).unlink()
    for link in ("tokens", "hdf5", ".vqtok/current"):
        (run / link).unlink()
    redo = encode_flow(trained["train"]["checkpoint"], str(run), None, ["parquet", "hdf5"],
                       16, 8, "cpu", 0, False)
    assert redo["skipped_shards"] == 3 and redo["encoded_images"] == 16
    assert redo["version"] == 1 and (run / ".vqtok/current").resolve() == version
    after = load_grid(run / "tokens")
    assert shard.is_file()
    assert {p: p.read_bytes() for p in before} == before  # the redone shard is the same
    assert np.array_equal(after.codes, load_grid(run / "tokens", format="hdf5").codes)


def _hand_made_tokens(path, checkpoint_hash="feed" * 16):
    meta = TokenMeta(codebook_size=4, grid_h=1, grid_w=2, dataset="hand", dataset_fingerprint="x",
                     checkpoint_hash=checkpoint_hash, vqtok_version="test")
    with ParquetTokenWriter(path, meta) as writer:
        writer.write(np.array([[[0, 0]], [[0, 1]], [[2, 0]]]), np.arange(3), None, "train")
    return path


def test_stats_of_a_hand_made_token_file_are_exact(tmp_path):
    from vqtok.flows.stats_flow import stats_flow

    tokens = _hand_made_tokens(tmp_path / "hand.parquet")
    result = stats_flow(str(tokens), str(tmp_path / "stats"))
    stats = json.loads((tmp_path / "stats/stats.json").read_text())
    # counts: code 0 four times, codes 1 and 2 once, code 3 never (6 tokens).
    entropy = -(4 / 6 * math.log2(4 / 6) + 2 * (1 / 6) * math.log2(1 / 6))
    assert stats["counts"] == [4, 1, 1, 0]
    assert (stats["codes_used"], stats["dead_codes"], stats["usage"]) == (3, 1, 0.75)
    assert stats["dead_code_ids"] == [3]
    assert stats["entropy_bits"] == pytest.approx(entropy)
    assert stats["perplexity"] == pytest.approx(2**entropy)
    both = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # each position: 2 of 3
    assert stats["position_entropy_bits"] == [[pytest.approx(both, abs=1e-4)] * 2]
    assert stats["position_distinct_codes"] == [[2, 2]]
    assert stats["most_used"][0] == {"code": 0, "count": 4}
    assert stats["least_used"][0] == {"code": 3, "count": 0}
    assert stats["splits"]["train"]["codes_used"] == 3
    assert result["usage"] == 0.75
    for plot in result["plots"]:
        assert open(plot, "rb").read(4) == b"\x89PNG"


def test_decode_refuses_tokens_from_another_tokenizer(trained, tmp_path):
    from vqtok.flows.decode_flow import decode_flow

    tokens = _hand_made_tokens(tmp_path / "other.parquet")
    with pytest.raises(TokenStoreError, match="made by checkpoint feedfeed"):
        decode_flow(str(tokens), trained["train"]["checkpoint"], str(tmp_path / "d"),
                    device="cpu")
    assert not (tmp_path / "d").exists()


def test_prefect_yaml_entrypoint_loads_the_pipeline_flow():
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    spec = yaml.safe_load((root / "prefect.yaml").read_text())
    deployment = spec["deployments"][0]
    flow = load_flow_from_entrypoint(str(root / deployment["entrypoint"]))
    assert flow.name == "tokenize-dataset"
    assert deployment["schedules"][0]["cron"] == "0 3 * * *"
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)


def test_serve_builds_a_scheduled_deployment_with_valid_parameters():
    from vqtok.flows.cli import build_config, serve_parameters
    from vqtok.flows.pipeline import tokenize_dataset

    params = serve_parameters(build_config(None), None, ["parquet"], 500, "runs/nightly")
    deployment = tokenize_dataset.to_deployment(name="nightly", cron="0 3 * * *",
                                                parameters=params)
    assert deployment.schedules[0].schedule.cron == "0 3 * * *"
    assert deployment.parameters["shard_size"] == 500
    assert deployment.parameters["config"]["data"]["dataset"] == "mnist-sample"

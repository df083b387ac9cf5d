"""Encoding on a Dask LocalCluster of 2 worker processes equals encoding in one process."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from vqtok.flows.cli import main
from vqtok.flows.dask_cluster import runner_options
from vqtok.flows.errors import PipelineError
from vqtok.storage import load_grid
from vqtok.tokenizer import save_checkpoint
from vqtok.tokenizer.checkpoint import build_model
from vqtok.tokenizer.config import parse_config

from tests.conftest import TINY
from tests.helpers import tree, version_folder, write_npz

pytest.importorskip("prefect_dask")


def test_cluster_specs():
    local = runner_options("local:3")
    assert local["cluster_class"] == "distributed.LocalCluster"
    assert local["cluster_kwargs"]["n_workers"] == 3
    assert local["cluster_kwargs"]["threads_per_worker"] == 1
    assert "env" not in local["cluster_kwargs"]
    # Local workers report to the driver's Prefect API (its temporary server, say).
    told = runner_options("local:2", "http://127.0.0.1:8123/api/")
    assert told["cluster_kwargs"]["env"] == {"PREFECT_API_URL": "http://127.0.0.1:8123/api/"}
    assert runner_options("tcp://10.0.0.5:8786") == {"address": "tcp://10.0.0.5:8786"}
    for bad in ("local:0", "local", "10.0.0.5:8786", "local:two"):
        with pytest.raises(PipelineError, match="--cluster"):
            runner_options(bad)


def test_a_bad_cluster_is_one_line_and_exit_1(tmp_path):
    result = CliRunner().invoke(main, ["encode", "--checkpoint", str(tmp_path), "--out",
                                       str(tmp_path / "o"), "--cluster", "localhost:8786"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: --cluster 'localhost:8786' is neither local:N nor a scheduler address; use "
        "e.g. local:4 or tcp://HOST:8786")


@pytest.mark.usefixtures("prefect_harness")
def test_two_dask_workers_write_the_same_tokens_as_one_process(tmp_path, monkeypatch):
    from vqtok.flows.encode_flow import encode_flow

    # One creation time for both runs, so the files can be compared byte for byte.
    monkeypatch.setattr("vqtok.storage.meta.utc_now_iso", lambda: "2026-01-01T00:00:00+00:00")
    raw = json.loads(json.dumps(TINY))
    raw["data"]["dataset"] = f"npz:{write_npz(tmp_path / 'images.npz', n=40)}"
    config = parse_config(raw)
    checkpoint = tmp_path / "checkpoint"
    save_checkpoint(checkpoint, build_model(config), config)
    args = (None, ["parquet", "hdf5"], 16, 8, "cpu", 0, False)

    single = encode_flow(str(checkpoint), str(tmp_path / "single"), *args)
    spread = encode_flow(str(checkpoint), str(tmp_path / "dask"), *args, "local:2")
    assert spread["shards"] == single["shards"] == 4
    assert spread["encoded_images"] == 40 and spread["skipped_shards"] == 0

    for fmt in ("parquet", "hdf5"):
        a, b = load_grid(single["tokens"], format=fmt), load_grid(spread["tokens"], format=fmt)
        assert np.array_equal(a.codes, b.codes) and a.codes.shape == (40, 2, 2)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.labels, b.labels)
    versions = {d: version_folder(tmp_path / d) for d in ("single", "dask")}
    assert versions["single"].name == versions["dask"].name == "000001"
    parquet = sorted(p.relative_to(versions["single"])
                     for p in versions["single"].rglob("*.parquet") if p.name != "keys.parquet")
    assert len(parquet) == 4
    for rel in parquet:
        assert (versions["single"] / rel).read_bytes() == (versions["dask"] / rel).read_bytes()
    manifest = [json.loads((versions[d] / ".vqtok/manifest.json").read_text())
                for d in ("single", "dask")]
    assert manifest[0] == manifest[1]

    # The workers' shard records are as good as local ones: byte for byte the same records
    # (paths relative to the version folder), and a re-run here finds the published version
    # up to date, encodes nothing and leaves the store as it was.
    done = [tree(versions[d] / ".vqtok" / "done") for d in ("single", "dask")]
    assert len(done[0]) == 4 and done[0] == done[1]  # 3 train shards, 1 validation shard
    before = tree(tmp_path / "dask" / ".vqtok")
    again = encode_flow(str(checkpoint), str(tmp_path / "dask"), *args)
    assert again["version"] == 1 and again["new_version"] is False
    assert again["encoded_images"] == 0 and again["shards"] == 0
    assert again["counts"] == {"added": 0, "changed": 0, "removed": 0, "unchanged": 40}
    assert tree(tmp_path / "dask" / ".vqtok") == before

    # An update spread over the workers (8 images more) equals the same update here.
    write_npz(tmp_path / "images.npz", n=48)  # the same 40 first images, then 8 new ones
    updates = [encode_flow(str(checkpoint), str(tmp_path / d), *args, *cluster)
               for d, cluster in (("single", ()), ("dask", ("local:2",)))]
    for update in updates:
        assert update["counts"] == {"added": 8, "changed": 0, "removed": 0, "unchanged": 40}
        assert (update["version"], update["encoded_images"]) == (2, 8)
    built = [tree(version_folder(tmp_path / d)) for d in ("single", "dask")]
    for files in built:  # what differs: when each was published
        assert b'"published_at"' in files.pop(".vqtok/version.json")
    assert built[0] == built[1]
    assert load_grid(tmp_path / "dask").num_rows == 48

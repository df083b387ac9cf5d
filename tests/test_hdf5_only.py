"""A store encoded with ``--format hdf5`` only has no tokens/ folder, so everything that
points users and later steps at "the tokens" must name hdf5/ instead; a store whose later
version drops Parquet keeps a tokens/ link that leads nowhere, and readers say why. Run as
users run it: the installed console command, from a folder outside the repo."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import yaml
from vqtok.storage import TokenStoreError, load_grid

from tests.helpers import console_command, make_checkpoint, tiny_raw, write_npz

TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kit(tmp_path_factory, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("hdf5-only")
    raw = tiny_raw(f"npz:{write_npz(root / 'images.npz', n=40)}")
    (root / "tiny.yaml").write_text(yaml.safe_dump(raw))
    outside = root / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(root / "prefect-home"),
               PREFECT_API_URL=str(PREFECT_API_URL.value()),
               COLUMNS="400")  # the run summary's table rows stay on one line each
    return {"root": root, "outside": outside, "env": env,
            "checkpoint": make_checkpoint(root / "checkpoint", raw)}


def _run(kit, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_command(), *args], cwd=kit["outside"],
                          env=kit["env"], capture_output=True, text=True, timeout=TIMEOUT_S)


def test_encode_names_hdf5_and_stats_finds_it(kit):
    out = kit["root"] / "encoded"
    done = _run(kit, "encode", "--checkpoint", str(kit["checkpoint"]), "--out", str(out),
                "--format", "hdf5", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(f"; version 1 -> {out / 'hdf5'}"), done.stdout
    assert sorted(p.suffix for p in (out / "hdf5").rglob("*.*")) == [".h5", ".h5"]

    stats = _run(kit, "stats", "--out", str(out))
    assert stats.returncode == 0, stats.stderr[-2000:]
    assert stats.stdout.strip().endswith(f"-> {out / 'stats' / 'stats.json'}"), stats.stdout
    assert (out / "stats" / "stats.json").is_file()

    assert load_grid(out).codes.shape == (40, 2, 2)  # the run folder reads either way
    assert not os.path.lexists(out / "tokens")  # no link to a format the store never had
    with pytest.raises(TokenStoreError, match="tokens: no such file or folder"):
        load_grid(out / "tokens")


def test_run_pipeline_with_hdf5_only(kit):
    out = kit["root"] / "pipeline"
    done = _run(kit, "run", "--config", str(kit["root"] / "tiny.yaml"), "--out", str(out),
                "--format", "hdf5", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "stats" / "stats.json").is_file()
    assert (out / "decode" / "reconstructions.png").is_file()
    rows = [line for line in done.stdout.splitlines() if line.startswith("│ tokens ")]
    assert len(rows) == 1 and f"{out / 'hdf5'} (hdf5)" in rows[0], done.stdout
    assert np.array_equal(np.sort(load_grid(out / "hdf5").ids), np.arange(40))


def test_a_version_without_parquet_leaves_a_link_readers_explain(kit):
    out = kit["root"] / "dropped"
    for fmt, version in (("both", 1), ("hdf5", 2)):
        done = _run(kit, "encode", "--checkpoint", str(kit["checkpoint"]), "--out", str(out),
                    "--format", fmt, "--quiet")
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"; version {version} -> " in done.stdout, done.stdout
    assert done.stdout.strip().endswith(f"-> {out / 'hdf5'}"), done.stdout
    assert (out / "tokens").is_symlink() and not (out / "tokens").exists()
    with pytest.raises(TokenStoreError, match="current version has no files of this format"):
        load_grid(out / "tokens")
    assert load_grid(out).codes.shape == (40, 2, 2)

"""Versioned, incremental token stores: a dataset that grows, shrinks and changes between
runs is re-encoded only where it changed, and readers always see one whole version."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from vqtok.flows.cli import main
from vqtok.storage import load_grid, read_tokens
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.keymap import KeyMap, reconcile
from vqtok.storage.versions import StoreVersions

from tests.helpers import console_command, fails, make_checkpoint, store_tree, tiny_raw

pytestmark = pytest.mark.usefixtures("prefect_harness")

SHARD = 8


def blob(seed: int, size: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(1, size - 2, 2)
    return (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4)).astype(np.uint8)


def write_images(folder: Path, names: range | list[int], seed_offset: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in names:
        Image.fromarray(blob(i + seed_offset)).save(folder / f"img-{i:04d}.png")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    return make_checkpoint(root / "checkpoint", tiny_raw(f"imagefolder:{root}/none"))


def encode(checkpoint: Path, folder: Path, out: Path, *extra: str) -> str:
    result = CliRunner().invoke(main, ["encode", "--checkpoint", str(checkpoint), "--dataset",
                                       f"imagefolder:{folder}", "--out", str(out),
                                       "--shard-size", str(SHARD), "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


def by_key(out: Path, version: int | None = None) -> dict[str, tuple[int, str, bytes]]:
    """key -> (id, split, codes bytes) of a store version, joined through its key map."""
    versions = StoreVersions(out)
    number = version or versions.current()
    keymap = KeyMap.read(versions.version_root(number) / ".vqtok" / "keys.parquet")
    grid = load_grid(out, version=version)
    key_of = dict(zip(keymap.ids.tolist(), keymap.keys.tolist(), strict=True))
    splits = grid.split_names
    return {key_of[int(i)]: (int(i), splits[s], c.tobytes())
            for i, s, c in zip(grid.ids, grid.split_index, grid.codes, strict=True)}


# -- the key map alone ------------------------------------------------------------------------

def test_reconcile_keeps_ids_gives_new_ones_and_never_reuses_them():
    hashes = {"a": "ha", "b": "hb", "c": "hc", "d": "hd", "e": "he"}

    def hash_of(keys):
        return lambda positions: [hashes[keys[p]] for p in positions]

    keys = ["a", "b", "c"]
    first = reconcile(None, keys, ["1", "1", "1"], hash_of(keys), np.array(["train"] * 3),
                      rule=lambda ids: np.array(["x"] * len(ids), dtype=object))
    assert first.keymap.ids.tolist() == [0, 1, 2] and first.keymap.next_id == 3
    assert first.keymap.splits.tolist() == ["train"] * 3  # the source's splits at first
    assert first.counts() == {"added": 3, "changed": 0, "removed": 0, "unchanged": 0}

    hashes.update(b="hb2")  # b rewritten: new stamp, new bytes; c touched only: same bytes
    keys = ["d", "a", "b", "c"]  # d sorts first but is new: it gets the next id, not 0
    read = []

    def tracked(positions):
        read.extend(keys[p] for p in positions)
        return hash_of(keys)(positions)

    second = reconcile(first.keymap, keys, ["1", "1", "2", "2"], tracked,
                       np.array(["train"] * 4), rule=lambda ids: np.where(
                           ids % 2 == 1, "validation", "train").astype(object))
    assert sorted(read) == ["b", "c", "d"]  # a's stamp is unchanged: its bytes are not read
    km = second.keymap
    assert dict(zip(km.keys, km.ids.tolist(), strict=True)) == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert km.splits[km.ids == 3].tolist() == ["validation"]  # the rule, on the new id
    assert second.added.tolist() == [3] and second.changed.tolist() == [1]
    assert second.counts() == {"added": 1, "changed": 1, "removed": 0, "unchanged": 2}
    assert second.keymap.position[np.argsort(km.ids)].tolist() == [1, 2, 3, 0]

    keys = ["a", "d"]  # b and c removed: tombstones keep their ids from being given again
    third = reconcile(second.keymap, keys, ["1", "1"], hash_of(keys), np.array(["train"] * 2),
                      rule=None)
    assert third.removed.tolist() == [1, 2] and third.summary() == (
        "0 added, 0 changed, 2 removed, 2 unchanged")
    assert third.keymap.present.tolist() == [True, False, False, True]
    keys = ["a", "d", "e", "c"]  # c comes back: its old id; e is new: past every id ever given
    fourth = reconcile(third.keymap, keys, ["1", "1", "1", "2"], hash_of(keys),
                       np.array(["train"] * 4), rule=None)
    assert dict(zip(fourth.keymap.keys, fourth.keymap.ids.tolist(), strict=True)) == {
        "a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
    assert fourth.added.tolist() == [2, 4] and fourth.keymap.next_id == 5


def test_key_map_file_round_trip(tmp_path):
    changes = reconcile(None, ["x/1.png", "x/2.png"], None, lambda p: ["h1", "h2"],
                        np.array(["train", "validation"], dtype=object), rule=None)
    changes.keymap.write(tmp_path / "keys.parquet")
    back = KeyMap.read(tmp_path / "keys.parquet")
    assert back.keys.tolist() == ["x/1.png", "x/2.png"] and back.next_id == 2
    assert back.splits.tolist() == ["train", "validation"] and back.hashes.tolist() == ["h1",
                                                                                       "h2"]
    assert pd.read_parquet(tmp_path / "keys.parquet").columns.tolist() == [
        "key", "id", "split", "sha256", "stamp", "present"]


def test_a_key_map_read_twice_is_shared_until_its_file_is_replaced(tmp_path):
    def write(keys):
        reconcile(None, keys, None, lambda p: [f"h{i}" for i in p],
                  np.array(["train"] * len(keys), dtype=object), rule=None,
                  ).keymap.write(tmp_path / "keys.parquet")

    write(["a", "b"])
    first = KeyMap.read(tmp_path / "keys.parquet")
    assert KeyMap.read(tmp_path / "keys.parquet") is first  # one read per process
    with pytest.raises(ValueError, match="read-only"):
        first.ids[0] = 7  # shared by every reader: nobody may change it
    write(["a", "b", "c"])  # published by rename: a new file
    again = KeyMap.read(tmp_path / "keys.parquet")
    assert again.keys.tolist() == ["a", "b", "c"] and first.keys.tolist() == ["a", "b"]
    (tmp_path / "keys.parquet").unlink()
    with pytest.raises(TokenStoreError, match="no key map"):
        KeyMap.read(tmp_path / "keys.parquet")


def test_a_salvage_keeps_rows_by_key_whose_image_is_unchanged_and_still_wanted():
    from vqtok.flows.incremental import Salvage

    # An abandoned first version had numbered a, b, c, d by position and finished them all.
    codes = np.arange(4 * 2 * 2, dtype=np.uint16).reshape(4, 2, 2)
    held = Salvage(np.array(["a", "b", "c", "d"], dtype=object), np.arange(4),
                   np.array(["ha", "hb", "hc", "hd"], dtype=object), codes,
                   np.array([10, 11, 12, 13]))
    # The folder then gained "0" in front (new positions), b changed, d went away.
    now = reconcile(None, ["0", "a", "b", "c"], None,
                    lambda p: [["h0", "ha", "hb2", "hc"][i] for i in p],
                    np.array(["train"] * 4, dtype=object), rule=None).keymap
    kept = held.usable(now, wanted=np.array([1, 2, 3]))  # ids the new plan encodes
    assert kept.ids.tolist() == [1, 3] and kept.keys.tolist() == ["a", "c"]
    assert np.array_equal(kept.codes, codes[[0, 2]]) and kept.labels.tolist() == [10, 12]
    assert held.usable(now, wanted=np.array([3])).keys.tolist() == ["c"]
    got_codes, got_labels = kept.rows(np.array([3]))
    assert np.array_equal(got_codes, codes[[2]]) and got_labels.tolist() == [12]


# -- whole encodes ----------------------------------------------------------------------------

def test_grown_shrunk_and_changed_folder_encodes_only_what_changed(checkpoint, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(30))
    line = encode(checkpoint, images, out)
    assert line.startswith("30 added, 0 changed, 0 removed, 0 unchanged: 30 images encoded")
    assert line.endswith(f"version 1 -> {out / 'tokens'}")
    first = by_key(out)
    assert [first[f"img-{i:04d}.png"][0] for i in range(30)] == list(range(30))

    write_images(images, range(30, 35))  # 5 new
    write_images(images, [3, 17], seed_offset=1000)  # 2 rewritten with other images
    for i in (5, 28):  # 2 removed
        (images / f"img-{i:04d}.png").unlink()
    line = encode(checkpoint, images, out)
    assert line.startswith("5 added, 2 changed, 2 removed, 26 unchanged: 7 images encoded")
    assert "version 2" in line
    second = by_key(out)
    assert set(second) == set(first) - {"img-0005.png", "img-0028.png"} | {
        f"img-{i:04d}.png" for i in range(30, 35)}
    for key, (ident, split, codes) in second.items():
        if key in first:  # same id and split forever; unchanged images keep their codes
            assert (ident, split) == first[key][:2]
            if key not in ("img-0003.png", "img-0017.png"):
                assert codes == first[key][2], key
    assert sorted(second[f"img-{i:04d}.png"][0] for i in range(30, 35)) == list(range(30, 35))

    # The result equals a fresh full encode of the new folder, key for key.
    fresh = tmp_path / "fresh"
    encode(checkpoint, images, fresh)
    assert {k: v[2] for k, v in by_key(fresh).items()} == {k: v[2] for k, v in second.items()}
    # ... and row for row a rebuild of every row of this store (same ids for the same keys).
    rebuilt = tmp_path / "rebuilt"
    encode(checkpoint, images, rebuilt)  # a store of its own history would give other ids
    line = encode(checkpoint, images, out, "--reencode")
    assert "33 images encoded" in line and "version 3" in line
    v2, v3 = load_grid(out, version=2), load_grid(out, version=3)
    assert np.array_equal(v2.ids, v3.ids) and np.array_equal(v2.codes, v3.codes)
    assert np.array_equal(v2.labels, v3.labels) and np.array_equal(v2.split_index,
                                                                   v3.split_index)

    # Nothing changed: no new version.
    line = encode(checkpoint, images, out)
    assert line == ("0 added, 0 changed, 0 removed, 33 unchanged: version 3 stands -> "
                    f"{out / 'tokens'}")
    assert StoreVersions(out).published() == [1, 2, 3]


@pytest.mark.parametrize("lost", ["manifest.json", "keys.parquet"])
def test_a_version_without_its_manifest_or_key_map_is_rebuilt_by_reencode(
        checkpoint, tmp_path, lost):
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(12))
    encode(checkpoint, images, out)
    before = by_key(out)
    gone = StoreVersions(out).version_root(1) / ".vqtok" / lost
    gone.unlink()
    message = fails("encode", "--checkpoint", checkpoint, "--dataset", f"imagefolder:{images}",
                    "--out", out, "--shard-size", SHARD, "--quiet")
    assert message.startswith(f"{gone}: "), message
    assert message.endswith("; version 1 of this store is damaged - pass --reencode to "
                            "rebuild it as a new version, or write to a new folder"), message
    line = encode(checkpoint, images, out, "--reencode")
    assert "12 images encoded" in line and "version 2" in line
    after = by_key(out)
    assert {k: v[2] for k, v in after.items()} == {k: v[2] for k, v in before.items()}
    if lost == "manifest.json":  # the key map was there: every key keeps its id and split
        assert after == before
    assert encode(checkpoint, images, out).endswith(f"version 2 stands -> {out / 'tokens'}")


def test_an_image_rewritten_in_place_is_seen_by_a_long_lived_process(checkpoint, tmp_path):
    """Nothing added or removed, so the folder's listing (and this process's cached source)
    stands; the rewritten file's stamp still gives it away."""
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(12))
    encode(checkpoint, images, out)
    before = by_key(out)
    write_images(images, [4], seed_offset=500)
    line = encode(checkpoint, images, out)
    assert line.startswith("0 added, 1 changed, 0 removed, 11 unchanged: 1 images encoded")
    after = by_key(out)
    assert {k for k in after if after[k] != before[k]} <= {"img-0004.png"}
    fresh = tmp_path / "fresh"
    encode(checkpoint, images, fresh)
    assert by_key(fresh)["img-0004.png"][2] == after["img-0004.png"][2]


def test_a_touched_file_is_hashed_once_not_on_every_run(checkpoint, tmp_path, monkeypatch):
    from vqtok.tokenizer.sources.imagefolder import ImageFolderSource

    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(6))
    encode(checkpoint, images, out)
    hashed = []
    real = ImageFolderSource.content_hashes
    monkeypatch.setattr(ImageFolderSource, "content_hashes",
                        lambda self, positions: hashed.append(list(positions))
                        or real(self, positions))
    stat = (images / "img-0002.png").stat()
    os.utime(images / "img-0002.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    for _ in range(2):
        line = encode(checkpoint, images, out)
        assert line.startswith("0 added, 0 changed, 0 removed, 6 unchanged: version 1 stands")
    assert hashed == [[2]]  # the first run hashed it, found it equal, recorded its stamp
    assert StoreVersions(out).published() == [1]


def test_readers_see_exactly_the_current_version(checkpoint, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(20))
    encode(checkpoint, images, out)
    for i in (0, 1, 2):
        (images / f"img-{i:04d}.png").unlink()
    write_images(images, range(20, 24))
    encode(checkpoint, images, out)
    current = load_grid(out)
    expected = sorted(current.ids.tolist())
    assert len(expected) == 21 and 0 not in expected and 23 in expected
    assert sorted(pd.read_parquet(out / "tokens")["id"].tolist()) == expected
    import pyarrow.dataset as ds

    assert sorted(ds.dataset(out / "tokens", format="parquet").to_table()["id"].to_pylist()) == (
        expected)
    assert sorted(read_tokens(out / "tokens")["id"].tolist()) == expected
    assert load_grid(out, version=1).num_rows == 20  # the older version, while kept
    assert load_grid(out / "tokens", format="hdf5").num_rows == 21
    with pytest.raises(Exception, match=r"no version 7 in this store \(kept: 1, 2\)"):
        load_grid(out, version=7)
    # Files written by version 2 carry -v2 in their names; the untouched ones are the same
    # files as version 1's (hard links), so they are byte for byte the same.
    names = sorted(p.name for p in (out / "tokens").rglob("*.parquet"))
    assert any(n.endswith("-v2.parquet") for n in names), names
    info = CliRunner().invoke(main, ["info", str(out / "tokens")])
    assert info.exit_code == 0, info.output
    assert "  versions" in info.output
    assert "20 added, 0 changed, 0 removed, 0 unchanged" in info.output
    assert "* 2" in info.output and "4 added, 0 changed, 3 removed, 17 unchanged" in info.output


def test_untouched_shards_are_hard_links_of_the_previous_version(checkpoint, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(40))  # train: 36 rows -> shards of 8, 8, 8, 8, 4
    encode(checkpoint, images, out)
    write_images(images, [41])  # id 40: train, appended to the last train shard
    encode(checkpoint, images, out)
    versions = StoreVersions(out)
    old = versions.version_root(1) / "tokens" / "train"
    new = versions.version_root(2) / "tokens" / "train"
    for index in range(4):
        a, b = old / f"part-{index:05d}.parquet", new / f"part-{index:05d}-v2.parquet"
        assert os.stat(a).st_ino == os.stat(b).st_ino, index
    last_old, last_new = old / "part-00004.parquet", new / "part-00004-v2.parquet"
    assert os.stat(last_old).st_ino != os.stat(last_new).st_ino


@pytest.mark.parametrize("damage", ["deleted", "cut"])
def test_a_lost_shard_file_is_encoded_again_on_the_next_run(checkpoint, tmp_path, damage):
    """An unchanged dataset over a version with a shard file gone (or cut short) does not
    stand: the next version encodes that shard's rows again and keeps the rest."""
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(40))  # train: shards of 8, 8, 8, 8, 4
    encode(checkpoint, images, out)
    before = by_key(out)
    lost = StoreVersions(out).version_root(1) / "hdf5" / "train" / "part-00001.h5"
    if damage == "deleted":
        lost.unlink()
    else:
        lost.write_bytes(lost.read_bytes()[:100])
    with pytest.raises(Exception, match="part-00001.h5"):
        load_grid(out, format="hdf5")
    line = encode(checkpoint, images, out)
    assert line.startswith("0 added, 0 changed, 0 removed, 40 unchanged; 8 rows of damaged "
                           "shards encoded again: 8 images encoded"), line
    assert "version 2" in line
    assert by_key(out) == before
    assert load_grid(out, format="hdf5").num_rows == 40
    again = encode(checkpoint, images, out)
    assert again.startswith("0 added, 0 changed, 0 removed, 40 unchanged: version 2 stands")


def test_keep_versions_bounds_what_stays_on_disk(checkpoint, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(10))
    encode(checkpoint, images, out, "--keep-versions", "2")
    for step in range(3):
        write_images(images, [100 + step])
        encode(checkpoint, images, out, "--keep-versions", "2")
    versions = StoreVersions(out)
    assert versions.published() == [3, 4] and versions.current() == 4
    assert versions.folders() == [3, 4]
    assert load_grid(out).num_rows == 13


def test_another_checkpoint_needs_reencode_or_a_new_folder(checkpoint, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(10))
    encode(checkpoint, images, out)
    other = make_checkpoint(tmp_path / "other", tiny_raw(f"imagefolder:{images}"), seed=1)
    message = fails("encode", "--checkpoint", other, "--dataset", f"imagefolder:{images}",
                    "--out", out, "--quiet")
    assert message == (f"{out}: holds tokens of another tokenizer (different checkpoint_hash); "
                       "write to a new output folder, or pass --reencode to rebuild the store "
                       "with this one as a new version")
    line = encode(other, images, out, "--reencode")
    assert "10 images encoded" in line and "version 2" in line
    assert load_grid(out).meta.checkpoint_hash != load_grid(out, version=1).meta.checkpoint_hash


def test_the_same_folder_spelled_another_way_is_the_same_store(checkpoint, tmp_path):
    """Where the data lives is not part of what the tokens mean: a link to the folder (or a
    relative path) updates the store; a setting that changes the pixels is named."""
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(10))
    encode(checkpoint, images, out)
    (tmp_path / "link").symlink_to(images)
    line = encode(checkpoint, tmp_path / "link", out)
    assert line.startswith("0 added, 0 changed, 0 removed, 10 unchanged: version 1 stands")
    write_images(images, [10])
    assert encode(checkpoint, tmp_path / "link", out).startswith("1 added, 0 changed")

    meta = load_grid(out).meta
    resized = dataclasses.replace(meta, dataset="imagefolder:elsewhere", extra={
        **meta.extra, "data": {**meta.extra["data"], "resize": "error", "data_root": "/x"}})
    assert meta.tokenizer_differences(resized) == ["extra.data.resize"]


def test_a_second_encode_on_a_locked_store_fails_with_one_line(checkpoint, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(10))
    encode(checkpoint, images, out)
    write_images(images, [10])
    with StoreVersions(out).lock():  # what a running encode holds
        message = fails("encode", "--checkpoint", checkpoint, "--dataset",
                        f"imagefolder:{images}", "--out", out, "--quiet")
    assert message == (f"{out}: another encode is updating this store (it holds .vqtok/lock);"
                       " wait for it to finish, or write to another folder")
    assert StoreVersions(out).published() == [1]
    assert "1 added" in encode(checkpoint, images, out)


def test_two_encodes_started_at_once_one_fails_with_one_line_the_other_publishes(
        checkpoint, tmp_path):
    """Two real processes: the first holds the store (paused once its version is planned);
    the second ends at once with one line and touches nothing; the first, killed, takes its
    lock with it, and a re-run finishes the update."""
    from prefect.settings import PREFECT_API_URL

    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(12))
    encode(checkpoint, images, out)
    write_images(images, [12, 13])
    marker = tmp_path / "first.paused"
    env = {**os.environ, "PYTHONPATH": "", "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    argv = [console_command(), "encode", "--checkpoint", str(checkpoint), "--dataset",
            f"imagefolder:{images}", "--out", str(out), "--quiet"]
    first = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             env={**env, "VQTOK_PAUSE_AT": "encode-started:1",
                                  "VQTOK_PAUSE_MARKER": str(marker)})
    try:
        deadline = time.monotonic() + 300  # a hang guard: the marker says when it is there
        while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), first.communicate(timeout=30)[1][-2000:]
        planned = store_tree(out)
        second = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True,
                                timeout=300, env=env)
        assert second.returncode == 1, second.stderr[-2000:]
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: {out}: another encode is updating this store (it holds .vqtok/lock); "
            "wait for it to finish, or write to another folder")
        assert store_tree(out) == planned  # (its own run log aside, in out/logs)
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert load_grid(out).num_rows == 12  # the published version, untouched
    assert encode(checkpoint, images, out).startswith("2 added, 0 changed, 0 removed")
    assert load_grid(out).num_rows == 14


def test_store_of_before_versions_is_refused_unless_reencode(checkpoint, tmp_path):
    from vqtok.storage import ShardedTokenStore, TokenMeta

    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(10))
    meta = TokenMeta(codebook_size=16, grid_h=2, grid_w=2, dataset="x", dataset_fingerprint="f",
                     checkpoint_hash="c", vqtok_version="0")
    store = ShardedTokenStore(out, meta, 10)
    with store.open_shard(store.plan("train", 1)[0]) as writer:
        writer.write(np.zeros((1, 2, 2), dtype=np.int64), [0])
    store.finalize()
    message = fails("encode", "--checkpoint", checkpoint, "--dataset", f"imagefolder:{images}",
                    "--out", out, "--quiet")
    assert message.startswith(f"{out / 'tokens'}: holds a token store written without versions")
    assert "--reencode" in message
    assert "10 added" in encode(checkpoint, images, out, "--reencode")
    assert load_grid(out).num_rows == 10


def test_console_command_updates_a_store_from_outside_the_repo(checkpoint, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(12))

    def run() -> str:
        done = subprocess.run(
            [console_command(), "encode", "--checkpoint", str(checkpoint), "--dataset",
             f"imagefolder:{images}", "--out", str(out), "--quiet"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": ""})
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1]

    assert run().startswith("12 added, 0 changed, 0 removed, 0 unchanged: 12 images encoded")
    write_images(images, [12, 13])
    (images / "img-0000.png").unlink()
    assert run().startswith("2 added, 0 changed, 1 removed, 11 unchanged: 2 images encoded")
    assert len(pd.read_parquet(out / "tokens")) == 13


def test_an_unreadable_image_fixed_after_a_failed_encode_costs_only_the_unfinished_rows(
        checkpoint, tmp_path):
    """The console command from outside the repo: a first encode stops at a corrupt file;
    once the file is fixed (the data changed, so the unfinished version is started again)
    the re-run copies the rows of the shards that had finished instead of encoding them."""
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(40))  # train: 36 ids in shards of 8; img-0030 is in the 4th
    (images / "img-0030.png").write_bytes(b"not a png")

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(
            [console_command(), "encode", "--checkpoint", str(checkpoint), "--dataset",
             f"imagefolder:{images}", "--out", str(out), "--shard-size", str(SHARD),
             "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": ""})

    failed = run()
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith(
        f"error: {images}/img-0030.png: cannot read image")
    write_images(images, [30])
    done = run()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith(
        "40 added, 0 changed, 0 removed, 0 unchanged: 16 images encoded at ")
    assert ", 24 rows kept from an unfinished earlier run; version 1" in done.stdout
    assert not list(out.rglob("salvage.npz"))  # copied into the shards, then removed
    encode(checkpoint, images, tmp_path / "fresh")
    mine, fresh = load_grid(out), load_grid(tmp_path / "fresh")
    assert np.array_equal(mine.ids, fresh.ids) and np.array_equal(mine.codes, fresh.codes)
    assert np.array_equal(mine.labels, fresh.labels)


def test_an_update_that_failed_keeps_its_newly_encoded_rows_once_the_image_is_fixed(
        checkpoint, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(16))
    assert encode(checkpoint, images, out).startswith("16 added")
    write_images(images, range(16, 36))  # train shards 1-3 gain rows; img-0033 is in shard 3
    (images / "img-0033.png").write_bytes(b"not a png")
    message = fails("encode", "--checkpoint", checkpoint, "--dataset", f"imagefolder:{images}",
                    "--out", out, "--shard-size", SHARD, "--quiet")
    assert "img-0033.png: cannot read image" in message
    assert load_grid(out).num_rows == 16  # version 1 still stands
    write_images(images, [33])
    line = encode(checkpoint, images, out)
    # Shard 1 had encoded id 16 and shard 2 ids 17-25 but 19: nine rows not encoded again.
    assert line.startswith("20 added, 0 changed, 0 removed, 16 unchanged: 11 images encoded ")
    assert ", 9 rows kept from an unfinished earlier run; version 2" in line
    encode(checkpoint, images, tmp_path / "fresh")
    assert by_key(out) == by_key(tmp_path / "fresh")


def test_scheduled_pipeline_over_a_growing_folder_publishes_one_version_per_change(
        checkpoint, tmp_path):
    from vqtok.flows.pipeline import tokenize_dataset

    images, out = tmp_path / "images", tmp_path / "nightly"
    write_images(images, range(20))
    config = tiny_raw(f"imagefolder:{images}")
    first = tokenize_dataset(config=config, out=str(out), checkpoint=str(checkpoint),
                             shard_size=SHARD, progress=False)
    assert first["encode"]["changes"] == "20 added, 0 changed, 0 removed, 0 unchanged"
    write_images(images, range(20, 26))  # the dataset grew before the next night
    second = tokenize_dataset(config=config, out=str(out), checkpoint=str(checkpoint),
                              shard_size=SHARD, progress=False)
    assert second["encode"]["changes"] == "6 added, 0 changed, 0 removed, 20 unchanged"
    assert (second["encode"]["version"], second["encode"]["encoded_images"]) == (2, 6)
    assert second["stats"]["images"] == 26  # the stats read the new version
    assert load_grid(out, version=1).num_rows == 20 and load_grid(out).num_rows == 26
    v1, v2 = by_key(out, version=1), by_key(out)
    assert all(v2[key] == value for key, value in v1.items())  # yesterday's rows, untouched


def test_decode_after_an_update_compares_each_row_with_its_own_image(checkpoint, tmp_path):
    """Ids of a store that lost images are not source positions: decode pairs each row with
    the image its key names, and leaves out rows whose image changed or left."""
    from vqtok.flows.decoding import decode_tokens

    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, range(20))
    encode(checkpoint, images, out)
    before = decode_tokens(str(out / "tokens"), str(checkpoint), str(tmp_path / "d1"),
                           split="train")
    (images / "img-0000.png").unlink()  # every later position moves down one
    write_images(images, [4], seed_offset=500)  # changed: its row is encoded again
    write_images(images, [20, 21])
    encode(checkpoint, images, out)
    after = decode_tokens(str(out / "tokens"), str(checkpoint), str(tmp_path / "d2"),
                          split="train")
    first = pd.read_csv(before["metrics"]).set_index("id")
    second = pd.read_csv(after["metrics"]).set_index("id")
    kept = first.index.difference([0, 4])  # 4: another image now, encoded again
    assert 0 not in second.index and set(kept) <= set(second.index)
    assert np.allclose(second.loc[kept, "mse"], first.loc[kept, "mse"])  # same pairs
    assert {20, 21} & set(second.index)  # new rows compared too (train split ids)

    (images / "img-0007.png").unlink()  # left the folder after encoding: not compared
    third = decode_tokens(str(out / "tokens"), str(checkpoint), str(tmp_path / "d3"),
                          split="train")
    assert 7 not in set(pd.read_csv(third["metrics"])["id"])

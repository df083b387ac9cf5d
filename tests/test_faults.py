"""Faults with real processes: kill -9 (and Ctrl-C) the CLI mid-run, re-run, compare.

The CLI runs in child processes forked by tests/fault_runner.py (imports paid once) against the
session's Prefect server. While a child runs, the test watches the output folder and reads
every file that appears under a final name: none may ever be partial.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from vqtok.storage import load_grid
from vqtok.tokenizer import load_tokenizer, save_checkpoint
from vqtok.tokenizer.checkpoint import build_model
from vqtok.tokenizer.config import parse_config

from tests.conftest import TINY
from tests.fault_runner import FaultRunner
from tests.helpers import STORE_FOLDERS, store_tree, version_folder, write_npz

pytestmark = pytest.mark.usefixtures("prefect_harness")

SEED = 20240607  # the kill points below are drawn from it
IMAGES = 400  # train 360 + validation 40 -> 20 shards of 20 rows
SHARD_ROWS = 20
EPOCH_SECONDS = "1700000000"  # SOURCE_DATE_EPOCH: byte-identical stores across runs


@pytest.fixture(scope="module")
def runner(prefect_harness, tmp_path_factory):
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        PREFECT_HOME=str(tmp_path_factory.mktemp("fault-prefect-home")),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        SOURCE_DATE_EPOCH=EPOCH_SECONDS,
    )
    helper = FaultRunner(env)
    yield helper
    helper.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint (k-means initialised, so codes vary) and 400 small images."""
    root = tmp_path_factory.mktemp("faults")
    npz = write_npz(root / "images.npz", n=IMAGES)
    raw = json.loads(json.dumps(TINY))
    raw["data"]["dataset"] = f"npz:{npz}"
    config = parse_config(raw)
    torch.manual_seed(0)
    model = build_model(config)
    model.train()(torch.rand(64, 1, 8, 8))
    save_checkpoint(root / "checkpoint", model, config)
    return {"root": root, "raw": raw, "checkpoint": root / "checkpoint"}


class StoreWatcher:
    """Reads every file under a final name once per version; partial content fails the test.

    Runs in a thread beside the test's kill loop, so reading files never delays a kill.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.seen: dict[Path, tuple[int, int, int]] = {}
        self.checked = 0
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.scan()
            time.sleep(0.001)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.scan()

    def scan(self) -> None:
        paths = [p for folder in STORE_FOLDERS for p in sorted((self.out / folder).rglob("*"))]
        for path in paths:
            if path.name.startswith(".") or path.is_dir():
                continue  # hidden temp files are where partial content is allowed to live
            try:
                st = path.stat()
                key = (st.st_ino, st.st_size, st.st_mtime_ns)
                if self.seen.get(path) == key:
                    continue
                self._check(path)
            except FileNotFoundError:
                continue  # removed between listing and reading (a record being redone)
            except Exception as exc:  # noqa: BLE001 - every problem is reported at the end
                self.problems.append(f"{path.relative_to(self.out)}: {exc!r}")
            self.seen[path] = key
            self.checked += 1

    def _check(self, path: Path) -> None:
        if path.name == "keys.parquet":  # the version's key map: every source key, once
            table = pq.read_table(path)
            assert table.num_rows == IMAGES, "partial key map"
            assert sorted(table.column("id").to_pylist()) == list(range(IMAGES))
        elif path.name == "plan.npz":  # the version's plan: every id of every split
            with np.load(path) as plan:
                ids = [plan[name] for name in plan.files if name.startswith("ids_")]
                assert ids and all(plan[name].size for name in plan.files), "partial plan"
            assert sorted(np.concatenate(ids).tolist()) == list(range(IMAGES)), "partial plan"
        elif path.name == "lock" and path.parent == self.out / ".vqtok":
            assert path.stat().st_size == 0, "the writer's lock file holds data"
        elif path.suffix == ".parquet":
            assert pq.read_table(path).num_rows == SHARD_ROWS, "partial Parquet file"
        elif path.suffix == ".h5":
            with h5py.File(path, "r") as f:
                assert f["codes"].shape[0] == SHARD_ROWS, "partial HDF5 file"
                assert "vqtok.meta" in f.attrs
        elif path.suffix == ".json":
            data = json.loads(path.read_text())  # a torn JSON file raises here
            if data.get("kind") == "vqtok-shard-record":
                version = path.parents[3]  # V/.vqtok/done/<split>/part-*.json
                assert version.parent == self.out / ".vqtok" / "versions", "record outside"
                for entry in data["files"].values():  # shard content is deterministic
                    file = version / entry["path"]  # relative to its version folder
                    digest = hashlib.sha256(file.read_bytes()).hexdigest()
                    assert digest == entry["sha256"], "record vouches for a different file"
        else:
            raise AssertionError("unexpected file")


def temps(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp")) if folder.is_dir() else []


def records(out: Path) -> int:
    """Finished shards of the newest version folder (the one being built or published)."""
    folders = sorted((out / ".vqtok" / "versions").glob("[0-9]" * 6))
    if not folders:
        return 0
    assert version_folder(out, int(folders[-1].name)) == folders[-1]
    return len(list((folders[-1] / ".vqtok" / "done").glob("*/*.json")))


def run_until(runner, argv, logs, pause=None, signum=signal.SIGKILL, at_pause=None):
    """Start the CLI with ``pause`` ("NAME:N", see tokenizer/faults.py); once the child has
    reached it and waits there, call ``at_pause()`` (if given), then send ``signum``. Returns
    the exit code: -signum when the signal interrupted the run, whatever the machine's
    speed."""
    marker = logs.with_suffix(".paused")
    env = {"VQTOK_PAUSE_AT": pause, "VQTOK_PAUSE_MARKER": str(marker)} if pause else {}
    runner.start(argv, logs, env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        code = runner.poll()
        if code is not None:
            return code
        if pause and marker.exists():
            if at_pause is not None:
                try:
                    at_pause()
                except BaseException:
                    runner.signal(signal.SIGKILL)
                    runner.wait()
                    raise
            runner.signal(signum)
            return runner.wait()
        time.sleep(0.002)
    return runner.wait(timeout=1)


def encode_argv(tiny, out):
    return ["encode", "--checkpoint", str(tiny["checkpoint"]), "--out", str(out),
            "--shard-size", str(SHARD_ROWS), "--batch-size", "2", "--device", "cpu", "--quiet"]


def test_encode_killed_at_random_points_ends_identical_to_an_uninterrupted_run(
    runner, tiny, tmp_path
):
    reference = tmp_path / "reference"
    assert run_until(runner, encode_argv(tiny, reference), tmp_path / "ref") == 0

    out = tmp_path / "run"
    watcher = StoreWatcher(out)
    rng = random.Random(SEED)
    plan = ["startup", "records", "records", "mid-write", "mid-write", "records", "ctrl-c"]
    rng.shuffle(plan)
    outcomes = []
    for i, mode in enumerate(plan):
        before = records(out)
        if mode == "startup":  # Prefect is up, the store planned, no shard started
            pause = "encode-started:1"
        elif mode == "mid-write":  # a shard's writer holds only its temp file
            pause = f"encode-batch-written:{rng.randint(1, 25)}"
        else:  # right after the n-th shard of this run was published
            pause = f"encode-shard-published:{rng.randint(1, 3)}"
        signum = signal.SIGINT if mode == "ctrl-c" else signal.SIGKILL
        code = run_until(runner, encode_argv(tiny, out), tmp_path / f"run{i}", pause, signum)
        outcomes.append((mode, code, records(out)))
        assert code == (130 if mode == "ctrl-c" else -signal.SIGKILL), outcomes
        if mode == "ctrl-c":
            err = (tmp_path / f"run{i}.err").read_text().strip().splitlines()
            assert err[-1].startswith("error: interrupted; re-run the same command"), err[-3:]
        if mode in ("records", "ctrl-c"):
            assert records(out) == before + int(pause.rsplit(":", 1)[1]), outcomes
        assert records(out) < 20, outcomes  # every interruption left work to do
    print("interruptions (mode, exit code, finished shards):", outcomes)

    code = run_until(runner, encode_argv(tiny, out), tmp_path / "final")
    watcher.close()
    assert code == 0, (tmp_path / "final.err").read_text()[-2000:]
    assert watcher.problems == []
    assert temps(out) == []
    assert (out / "tokens").resolve() == version_folder(out, 1) / "tokens"  # one version
    assert watcher.checked >= 40  # shards, records and the manifest were all read mid-run
    # Row for row and code for code, and in fact byte for byte (same SOURCE_DATE_EPOCH).
    mine, theirs = load_grid(out / "tokens"), load_grid(reference / "tokens")
    assert np.array_equal(mine.ids, theirs.ids) and np.array_equal(mine.codes, theirs.codes)
    assert np.array_equal(mine.labels, theirs.labels)
    assert store_tree(out) == store_tree(reference)


def write_pngs(pixels: np.ndarray, folder: Path, names, offset: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in names:
        Image.fromarray(pixels[(i + offset) % len(pixels)]).save(folder / f"{i:04d}.png")


def image_folder(tiny, tmp_path):
    """The tiny images as PNGs in tmp_path/images: (pixels, the folder, out -> encode argv
    over the folder)."""
    with np.load(tiny["root"] / "images.npz") as arrays:
        pixels = arrays["images"][:, 0]
    folder = tmp_path / "images"
    write_pngs(pixels, folder, range(IMAGES))

    def argv(out: Path) -> list[str]:
        return [*encode_argv(tiny, out), "--dataset", f"imagefolder:{folder}"]

    return pixels, folder, argv


def test_incremental_update_killed_at_random_points_keeps_the_previous_version_readable(
    runner, tiny, tmp_path
):
    """kill -9 at every stage of an update of a grown, changed and shrunk folder: whenever
    the writer stops, readers get exactly the previous version (or, once published, the
    new one), and re-running ends byte for byte where an uninterrupted update does."""
    pixels, folder, argv = image_folder(tiny, tmp_path)

    reference, out = tmp_path / "reference", tmp_path / "run"
    for store in (reference, out):
        assert run_until(runner, argv(store), tmp_path / f"{store.name}-v1") == 0
    before = load_grid(out)
    rng = random.Random(SEED + 1)
    picked = rng.sample(range(IMAGES), 20)
    write_pngs(pixels, folder, range(IMAGES, IMAGES + 40), offset=7)  # 40 added
    write_pngs(pixels, folder, picked[:10], offset=101)  # 10 changed
    for i in picked[10:]:  # 10 removed
        (folder / f"{i:04d}.png").unlink()
    assert run_until(runner, argv(reference), tmp_path / "reference-v2") == 0
    after = load_grid(reference)
    assert after.num_rows == IMAGES + 30

    seen = []

    def readers_see_one_whole_version() -> None:
        grid = load_grid(out)  # checks every shard's sha256 against the manifest
        which = [name for name, want in (("previous", before), ("new", after))
                 if np.array_equal(grid.ids, want.ids) and np.array_equal(grid.codes, want.codes)]
        assert len(which) == 1, "readers saw neither version whole"
        assert len(pd.read_parquet(out / "tokens")) == grid.num_rows
        seen.append(which[0])

    plan = ["startup", "mid-write", "mid-write", "records", "records"]
    rng.shuffle(plan)
    plan.append("finalized")  # every shard done: from here on only publishing is left
    points = {"startup": "encode-started:1", "finalized": "encode-version-finalized:1",
              "published": "encode-version-published:1"}
    outcomes = []
    for i, mode in enumerate([*plan, "published"]):
        pause = points.get(mode) or (f"encode-batch-written:{rng.randint(1, 3)}"
                                     if mode == "mid-write"
                                     else f"encode-shard-published:{rng.randint(1, 3)}")
        code = run_until(runner, argv(out), tmp_path / f"kill{i}", pause,
                         at_pause=readers_see_one_whole_version)
        outcomes.append((mode, pause, code))
        assert code == -signal.SIGKILL, (outcomes, (tmp_path / f"kill{i}.err").read_text())
        readers_see_one_whole_version()
    assert seen == ["previous"] * (2 * len(plan)) + ["new"] * 2, outcomes

    code = run_until(runner, argv(out), tmp_path / "final")
    assert code == 0, (tmp_path / "final.err").read_text()[-2000:]
    assert "version 2 stands" in (tmp_path / "final.out").read_text()
    assert temps(out) == []
    assert store_tree(out) == store_tree(reference)


def test_first_encode_killed_then_folder_changed_keeps_the_finished_rows(runner, tiny, tmp_path):
    """kill -9 after three shards of a first encode; before the re-run the folder grows and
    one finished image changes, so the unfinished version is started again: its finished
    rows are copied, not encoded, and the store ends byte for byte where an uninterrupted
    encode of the new folder does."""
    pixels, folder, argv = image_folder(tiny, tmp_path)

    out, reference = tmp_path / "run", tmp_path / "reference"
    code = run_until(runner, argv(out), tmp_path / "killed", "encode-shard-published:3")
    assert code == -signal.SIGKILL and records(out) == 3  # train rows 0-59 finished
    write_pngs(pixels, folder, range(IMAGES, IMAGES + 20), offset=7)  # 20 added
    write_pngs(pixels, folder, [0], offset=101)  # id 0, in a finished shard, changed
    assert run_until(runner, argv(out), tmp_path / "rerun") == 0
    line = (tmp_path / "rerun.out").read_text().strip().splitlines()[-1]
    assert line.startswith(f"{IMAGES + 20} added, 0 changed, 0 removed, 0 unchanged: "
                           f"{IMAGES + 20 - 59} images encoded at "), line
    assert ", 59 rows kept from an unfinished earlier run; version 1" in line, line
    assert run_until(runner, argv(reference), tmp_path / "reference") == 0
    assert temps(out) == []
    assert store_tree(out) == store_tree(reference)


def write_tar_shards(npz: Path, folder: Path, shards: int) -> str:
    """The npz's images as WebDataset shards of PNGs (``NNNNNN.png`` + ``.cls``)."""
    import io
    import tarfile

    from PIL import Image

    folder.mkdir(parents=True)
    with np.load(npz) as archive:
        images, labels = archive["images"][:, 0], archive["labels"]
    per = -(-len(images) // shards)
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard}.tar", "w") as tar:
            for i in range(shard * per, min((shard + 1) * per, len(images))):
                png = io.BytesIO()
                Image.fromarray(images[i]).save(png, format="PNG")
                for ext, payload in (("png", png.getvalue()), ("cls", b"%d" % labels[i])):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return f"webdataset:{folder}/shard-{{0..{shards - 1}}}.tar"


def test_encode_of_tar_shards_killed_twice_ends_identical(runner, tiny, tmp_path):
    dataset = write_tar_shards(tiny["root"] / "images.npz", tmp_path / "shards", 3)

    def argv(out):
        return [*encode_argv(tiny, out), "--dataset", dataset]

    reference = tmp_path / "reference"
    assert run_until(runner, argv(reference), tmp_path / "ref") == 0
    out = tmp_path / "run"
    for i, pause in enumerate(("encode-batch-written:7", "encode-shard-published:2")):
        code = run_until(runner, argv(out), tmp_path / f"run{i}", pause)
        assert code == -signal.SIGKILL
    assert 0 < records(out) < 20
    assert run_until(runner, argv(out), tmp_path / "final") == 0
    assert temps(out) == []
    assert store_tree(out) == store_tree(reference)
    grid = load_grid(out)
    assert grid.num_rows == IMAGES and grid.meta.dataset == dataset


def _train_step(checkpoint: Path) -> int:
    try:
        return int(json.loads((checkpoint / "train_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0  # not written yet, or between the two renames of a save


def test_training_killed_twice_resumes_where_it_stood(runner, tiny, tmp_path):
    raw = json.loads(json.dumps(tiny["raw"]))
    raw["train"].update(epochs=4, checkpoint_every=10)  # 45 steps per epoch, 180 in all
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(raw))

    def argv(out):
        return ["train", "--config", str(config), "--out", str(out), "--quiet"]

    reference = tmp_path / "reference"
    assert run_until(runner, argv(reference), tmp_path / "ref") == 0

    out = tmp_path / "run"
    checkpoint = out / "checkpoint"
    rng = random.Random(SEED + 1)
    stops = []
    # Saves at steps 10, 20, 30, 40, 45 (epoch end), 50, ...: kill right after one of them.
    for i, saves in enumerate((rng.randint(1, 6), rng.randint(3, 8))):
        code = run_until(runner, argv(out), tmp_path / f"train{i}",
                         f"train-checkpoint-saved:{saves}")
        assert code == -signal.SIGKILL
        load_tokenizer(out)  # what the kill left is a usable checkpoint
        stops.append(_train_step(checkpoint))
        if i:
            log = "".join((tmp_path / f"train{i}{ext}").read_text() for ext in (".out", ".err"))
            assert f"resuming from step {stops[0]}" in log
    assert 10 <= stops[0] < stops[1] < 180

    assert run_until(runner, argv(out), tmp_path / "final") == 0
    log = (tmp_path / "final.out").read_text() + (tmp_path / "final.err").read_text()
    assert f"resuming from step {stops[1]}" in log  # continued, did not start over
    ref = reference / "checkpoint"
    for name in ("config.json", "train_state.json"):
        mine, theirs = json.loads((checkpoint / name).read_text()), json.loads(
            (ref / name).read_text())
        assert mine == theirs, name  # weights hash, step 180, per-epoch history
    from safetensors.torch import load_file

    mine, theirs = load_file(checkpoint / "train_state.safetensors"), load_file(
        ref / "train_state.safetensors")
    assert mine.keys() == theirs.keys() and any(k.startswith("opt.") for k in mine)
    for key in mine:  # Adam's moments and step counts, and every RNG state
        assert torch.equal(mine[key], theirs[key]), key

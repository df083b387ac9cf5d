"""DDP training on 2 CPU processes (gloo) and the sharding rules behind it."""

import json
import os
import subprocess

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from vqtok.flows.cli import main
from vqtok.tokenizer import load_tokenizer, open_source
from vqtok.tokenizer.config import parse_config
from vqtok.tokenizer.distributed import shard_batch, shard_eval
from vqtok.tokenizer.training import evaluate

from tests.conftest import TINY
from tests.helpers import console_command, write_npz


def test_batch_shares_cover_the_global_batch_once_and_every_rank_gets_some():
    batch = np.arange(10, 17)  # 7 ids over 2 ranks
    shares = [shard_batch(batch, r, 2) for r in range(2)]
    assert [s.tolist() for s in shares] == [[10, 12, 14, 16], [11, 13, 15]]
    # A last batch smaller than the world: the rank left out repeats one id, so every rank
    # still runs the step (collectives must match up).
    tail = np.array([40])
    assert [shard_batch(tail, r, 3).tolist() for r in range(3)] == [[40], [40], [40]]
    assert shard_batch(np.array([7, 8]), 0, 1).tolist() == [7, 8]


def test_evaluation_shares_never_repeat_an_image():
    ids = np.arange(5)
    shares = [shard_eval(ids, r, 2).tolist() for r in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]
    assert sorted(sum(shares, [])) == ids.tolist()
    assert shard_eval(np.arange(1), 1, 2).tolist() == []


@pytest.mark.usefixtures("prefect_harness")
def test_two_process_training_keeps_every_rank_identical_and_resumes_exactly(tmp_path):
    from vqtok.tokenizer.launch import train_distributed

    npz = write_npz(tmp_path / "images.npz", n=50)  # validation: 5 images, 3 + 2 per rank
    raw = json.loads(json.dumps(TINY))
    raw["data"]["dataset"] = f"npz:{npz}"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = parse_config(raw)

    # Reference: two epochs in one go (45 train images, batch 8: 6 steps per epoch).
    straight = train_distributed(cfg.with_overrides(**{"train.epochs": 2}), tmp_path / "a", 2,
                                 progress=False)
    assert straight["world_size"] == 2 and straight["step"] == 12
    assert straight["rank_weights_sha256"] == [straight["weights_sha256"]] * 2

    # The same through the CLI, killed after one epoch and resumed.
    run = tmp_path / "b"
    runner = CliRunner()
    first = runner.invoke(main, ["train", "--config", str(config), "--out", str(run),
                                 "--nproc", "2", "--quiet"])
    assert first.exit_code == 0, first.output
    assert "2 processes; identical weights on every rank: yes" in first.output
    again = runner.invoke(main, ["train", "--config", str(config), "--out", str(run),
                                 "--nproc", "2", "--epochs", "2", "--quiet"])
    assert again.exit_code == 0, again.output
    assert "identical weights on every rank: yes" in again.output
    meta = json.loads((run / "checkpoint/config.json").read_text())
    assert meta["progress"]["step"] == 12
    assert meta["weights_sha256"] == straight["weights_sha256"]
    model = load_tokenizer(run)
    assert model.checkpoint_hash == meta["weights_sha256"]

    # The validation figures count each of the 5 images exactly once: they equal a
    # single-process evaluation of the saved weights.
    source = open_source(cfg.data)
    single = evaluate(model, source, source.split_ids("validation"), 16, "cpu")
    stored = meta["progress"]["validation"]
    assert stored["images"] == 5
    assert stored["mse"] == pytest.approx(single["mse"], rel=1e-6)
    assert stored["codes_used"] == single["codes_used"]


@pytest.mark.usefixtures("prefect_harness")
def test_train_nproc_2_from_the_console_command_outside_the_repo(tmp_path):
    """What users run: the installed script in a subprocess from another folder, bounded by a
    timeout (a hang fails the test, not the CI job)."""
    from prefect.settings import PREFECT_API_URL

    raw = json.loads(json.dumps(TINY))
    raw["data"]["dataset"] = f"npz:{write_npz(tmp_path / 'images.npz', n=50)}"
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [console_command(), "train", "--config", str(tmp_path / "tiny.yaml"), "--out",
         str(tmp_path / "run"), "--nproc", "2", "--quiet"],
        cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes; identical weights on every rank: yes" in result.stdout + result.stderr
    meta = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    assert meta["progress"]["step"] == 6  # 45 training images, batch 8, one epoch
    assert load_tokenizer(tmp_path / "run").checkpoint_hash == meta["weights_sha256"]


def test_too_many_processes_for_the_gpus_is_a_clear_error(tmp_path, monkeypatch, tiny_config):
    import vqtok.tokenizer.launch as launch
    from vqtok.tokenizer import TrainingError

    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launch.torch.cuda, "device_count", lambda: 1)
    cuda = tiny_config.with_overrides(**{"train.device": "auto"})
    with pytest.raises(TrainingError, match="--nproc 2 needs one GPU per process but 1 are"):
        launch.train_distributed(cuda, tmp_path / "run", 2)
    assert not (tmp_path / "run").exists()

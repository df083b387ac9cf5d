"""Training: learns, checkpoints every epoch, resumes exactly, stops cleanly on NaN."""

import json

import pytest
import torch

from tokenizer import TrainingError, load_tokenizer, open_source, train
from tokenizer.checkpoint import STATE, STATE_META


def quiet_train(config, out, **kwargs):
    return train(config, out, progress=False, log=lambda _: None, **kwargs)


def test_training_learns_and_writes_a_loadable_checkpoint(tmp_path, tiny_config):
    config = tiny_config.with_overrides(**{"train.epochs": 5, "train.lr": 1e-2})
    result = quiet_train(config, tmp_path / "run")
    assert result.step == 25 and result.epochs_done == 5  # 36 train images / batch 8 = 5 steps
    first, last = result.history[0]["validation"], result.history[-1]["validation"]
    assert last["mse"] < 0.7 * first["mse"]
    assert set(last) >= {"mse", "psnr", "usage", "perplexity"}
    ckpt = tmp_path / "run" / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "config.json", STATE,
                                               STATE_META}
    model = load_tokenizer(ckpt)
    assert model.checkpoint_hash == result.weights_sha256
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["progress"]["step"] == 25 and meta["progress"]["epochs_done"] == 5


def test_resumed_training_equals_an_uninterrupted_run(tmp_path, tiny_config):
    two = tiny_config.with_overrides(**{"train.epochs": 2})
    straight = quiet_train(two, tmp_path / "a")

    quiet_train(tiny_config, tmp_path / "b")  # one epoch, then "killed"
    resumed = quiet_train(two, tmp_path / "b")
    assert resumed.resumed_from_step == 5 and resumed.step == 10
    assert resumed.weights_sha256 == straight.weights_sha256
    assert len(resumed.history) == 2


def test_rerunning_a_finished_run_changes_nothing(tmp_path, tiny_config):
    first = quiet_train(tiny_config, tmp_path / "run")
    again = quiet_train(tiny_config, tmp_path / "run")
    assert again.weights_sha256 == first.weights_sha256 and again.step == first.step


def test_max_steps_stops_early(tmp_path, tiny_config):
    result = quiet_train(tiny_config.with_overrides(**{"train.max_steps": 3}), tmp_path / "r")
    assert result.step == 3


def test_resume_with_another_architecture_is_refused(tmp_path, tiny_config):
    quiet_train(tiny_config, tmp_path / "run")
    other = tiny_config.with_overrides(**{"model.num_embeddings": 32, "train.epochs": 2})
    with pytest.raises(TrainingError, match="different 'model'"):
        quiet_train(other, tmp_path / "run")


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config):
    source = open_source(tiny_config.data)
    calls = {"n": 0}
    clean = source.load_batch

    def poisoned(ids):
        images, labels = clean(ids)
        calls["n"] += 1
        if calls["n"] == 8:  # inside epoch 2 (epoch 1 is 5 batches + 3 validation batches)
            images[0, 0, 0, 0] = float("nan")
        return images, labels

    source.load_batch = poisoned
    config = tiny_config.with_overrides(**{"train.epochs": 3})
    with pytest.raises(TrainingError, match=r"loss became nan at step \d+; stopped"):
        quiet_train(config, tmp_path / "run", source=source)
    meta = json.loads((tmp_path / "run/checkpoint/config.json").read_text())
    assert meta["progress"]["step"] == 5  # the end of epoch 1
    assert torch.isfinite(load_tokenizer(tmp_path / "run").quantizer.codebook).all()


def test_image_size_must_fit_the_downsampling(tmp_path, tiny_config):
    config = tiny_config.with_overrides(**{"data.image_size": 10})
    with pytest.raises(TrainingError, match="not divisible by 2\\^num_downsamples = 4"):
        quiet_train(config, tmp_path / "run")

"""Training: learns, checkpoints every epoch, resumes exactly, stops cleanly on NaN."""

import json
import shutil

import pytest
import torch
from vqtok.tokenizer import CheckpointError, TrainingError, load_tokenizer, open_source, train
from vqtok.tokenizer.checkpoint_dir import STATE, STATE_META


def quiet_train(config, out, **kwargs):
    return train(config, out, progress=False, log=lambda _: None, **kwargs)


def test_training_learns_and_writes_a_loadable_checkpoint(tmp_path, tiny_config):
    config = tiny_config.with_overrides(**{"train.epochs": 20, "train.lr": 1e-2})
    result = quiet_train(config, tmp_path / "run")
    assert result.step == 100 and result.epochs_done == 20  # 36 train images / batch 8 = 5
    first, last = result.history[0]["validation"], result.history[-1]["validation"]
    assert last["mse"] < 0.7 * first["mse"]
    assert set(last) >= {"mse", "psnr", "usage", "perplexity", "baseline_psnr"}
    # Better than predicting the training mean image for every validation image, clearly.
    assert last["psnr"] > last["baseline_psnr"] + 2.0
    ckpt = tmp_path / "run" / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "config.json", STATE,
                                               STATE_META}
    model = load_tokenizer(ckpt)
    assert model.checkpoint_hash == result.weights_sha256
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["progress"]["step"] == 100 and meta["progress"]["epochs_done"] == 20


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
    with pytest.raises(TrainingError, match="different 'model.num_embeddings'"):
        quiet_train(other, tmp_path / "run")


def test_image_size_must_fit_the_downsampling(tmp_path, tiny_config):
    config = tiny_config.with_overrides(**{"data.image_size": 10})
    with pytest.raises(TrainingError, match="not divisible by 2\\^num_downsamples = 4"):
        quiet_train(config, tmp_path / "run")


def _opt_state(run):
    from safetensors.torch import load_file

    return load_file(run / "checkpoint" / STATE), json.loads((run / "checkpoint" / STATE_META)
                                                             .read_text())


def test_stopping_inside_an_epoch_and_resuming_equals_an_uninterrupted_run(tmp_path, tiny_config):
    two = tiny_config.with_overrides(**{"train.epochs": 2, "train.checkpoint_every": 3})
    straight = quiet_train(two, tmp_path / "a")

    stopped = quiet_train(two.with_overrides(**{"train.max_steps": 7}), tmp_path / "b")
    assert stopped.step == 7 and stopped.epochs_done == 1
    tensors, info = _opt_state(tmp_path / "b")
    assert info["step"] == 7 and info["epoch_batches"] == 2  # steps 6 and 7 of epoch 2
    assert len(info["history"]) == 1  # only whole epochs enter the history
    resumed = quiet_train(two, tmp_path / "b")
    assert resumed.resumed_from_step == 7 and resumed.weights_sha256 == straight.weights_sha256
    assert resumed.history == straight.history  # epoch 2's loss spans both runs
    (a, a_info), (b, b_info) = _opt_state(tmp_path / "a"), _opt_state(tmp_path / "b")
    assert a_info == b_info and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_every_saves_inside_the_epoch(tmp_path, tiny_config, monkeypatch):
    import importlib

    loop = importlib.import_module("vqtok.tokenizer.training")  # the module, not the function
    saved = []
    real = loop.save_checkpoint

    def spy(directory, model, config, progress=None, train_state=None):
        saved.append(progress["step"])
        return real(directory, model, config, progress, train_state)

    monkeypatch.setattr(loop, "save_checkpoint", spy)
    config = tiny_config.with_overrides(**{"train.epochs": 2, "train.checkpoint_every": 2})
    quiet_train(config, tmp_path / "run")
    assert saved == [2, 4, 5, 6, 8, 10]  # 5 steps per epoch: every 2nd step plus epoch ends


def test_a_crash_inside_the_checkpoint_swap_is_recovered_on_resume(tmp_path, tiny_config):
    two = tiny_config.with_overrides(**{"train.epochs": 2})
    straight = quiet_train(two, tmp_path / "a")
    quiet_train(tiny_config, tmp_path / "b")
    run = tmp_path / "b"
    # What a kill between save_checkpoint's two renames leaves: `.old` plus a complete `.tmp`.
    (run / "checkpoint").rename(run / "checkpoint.old")
    shutil.copytree(run / "checkpoint.old", run / "checkpoint.tmp")
    resumed = quiet_train(two, run)
    assert resumed.resumed_from_step == 5 and resumed.weights_sha256 == straight.weights_sha256
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_or_inf_inputs_stop_training_naming_the_step(tmp_path, tiny_config, poison):
    source = open_source(tiny_config.data)
    calls = {"n": 0}
    clean = source.load_batch

    def poisoned(ids):
        images, labels = clean(ids)
        calls["n"] += 1
        # epoch 2's first batch: before it, the mean image (1 batch), epoch 1 (5 batches) and
        # its validation (1 batch)
        if calls["n"] == 8:
            images[0, 0, 0, 0] = poison
        return images, labels

    source.load_batch = poisoned
    config = tiny_config.with_overrides(**{"train.epochs": 3, "train.eval_batch_size": 16})
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        quiet_train(config, run, source=source)
    assert str(info.value) == (
        f"loss became nan at step 6; stopped, the last good checkpoint ({run / 'checkpoint'}, "
        "step 5) is kept; lower train.lr or check the data")
    meta = json.loads((run / "checkpoint/config.json").read_text())
    assert meta["progress"]["step"] == 5  # the end of epoch 1
    assert torch.isfinite(load_tokenizer(run).quantizer.codebook).all()


def test_weights_that_turn_non_finite_are_never_saved(tmp_path, tiny_config, monkeypatch):
    config = tiny_config.with_overrides(**{"train.epochs": 2, "train.checkpoint_every": 2})
    real_step = torch.optim.Adam.step
    steps = {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == 4:  # right before the save at step 4
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"weights became non-finite \(encoder\.\S+\) at "
                                            r"step 4; stopped, the last good checkpoint"):
        quiet_train(config, run)
    assert json.loads((run / "checkpoint" / STATE_META).read_text())["step"] == 2
    load_tokenizer(run)  # finite, loadable


def test_damaged_training_state_is_named(tmp_path, tiny_config):
    quiet_train(tiny_config.with_overrides(**{"train.max_steps": 2}), tmp_path / "run")
    (tmp_path / "run/checkpoint" / STATE_META).write_text('{"step": 2')
    with pytest.raises(CheckpointError, match=r"checkpoint: training state unusable "
                                              r"\(JSONDecodeError: .*\); delete .* to start over"):
        quiet_train(tiny_config, tmp_path / "run")


def test_an_empty_validation_split_trains_without_validation(tmp_path):
    from vqtok.tokenizer.config import parse_config

    from tests.helpers import tiny_raw, write_npz

    npz = write_npz(tmp_path / "five.npz", n=5)  # ids 0..4: no id % 10 == 9
    logs = []
    result = train(parse_config(tiny_raw(f"npz:{npz}")), tmp_path / "run", progress=False,
                   log=logs.append)
    assert result.step == 1 and result.validation == {}
    assert logs[0] == f"split 'validation' of npz:{npz} is empty; training without validation"
    load_tokenizer(tmp_path / "run")

"""The health check (reconstruction against the mean-image baseline) and the mechanisms of the
robust default recipe: output bias at the data's mean, centred input, quantizer warm-up."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from vqtok.flows.cli import main
from vqtok.tokenizer import TrainingError, load_tokenizer, open_source, train
from vqtok.tokenizer.checkpoint import build_model, save_checkpoint
from vqtok.tokenizer.checkpoint_dir import weights_hash
from vqtok.tokenizer.config import LEGACY_DEFAULTS, Config
from vqtok.tokenizer.health import (
    HEALTHY,
    UNCHECKED,
    UNHEALTHY,
    UnhealthyCheckpointError,
    judge,
    mean_image,
    mean_image_ids,
    require_healthy,
)

from tests.helpers import console_command, version_folder

TRAIN = importlib.import_module("vqtok.tokenizer.training")  # the module, not the function


def quiet(config, out, **kwargs):
    return train(config, out, progress=False, log=lambda _: None, **kwargs)


# --- the verdict -------------------------------------------------------------------------------


def test_the_verdict_needs_the_margin_over_the_baseline():
    figures = {"psnr": 14.9, "baseline_psnr": 12.0}
    bad = judge(figures, 3.0)
    assert bad["status"] == UNHEALTHY and bad["gain_db"] == pytest.approx(2.9)
    assert bad["reason"] == (
        "validation PSNR 14.90 dB (mean-image baseline 12.00 dB) is only 2.90 dB above the "
        "baseline (at least 3 dB above it needed): the decoder has learned little or collapsed")
    assert judge({"psnr": 10.0, "baseline_psnr": 12.5}, 3.0)["reason"].startswith(
        "validation PSNR 10.00 dB (mean-image baseline 12.50 dB) is 2.50 dB below the baseline")
    assert judge({"psnr": 15.0, "baseline_psnr": 12.0}, 3.0)["status"] == HEALTHY
    assert judge(figures, None)["status"] == UNCHECKED
    assert judge({}, 3.0)["status"] == UNCHECKED


def test_mean_image_is_the_exact_mean_of_evenly_spread_images():
    ids = np.arange(25_000)
    picked = mean_image_ids(ids, limit=10_000)
    assert len(picked) == 10_000 and picked[0] == 0 and picked[-1] == 24_999
    assert len(np.unique(picked)) == 10_000
    assert mean_image_ids(ids[:300]).tolist() == list(range(300))

    images = torch.arange(5 * 2 * 3 * 3, dtype=torch.float32).view(5, 2, 3, 3) / 100
    mean, count = mean_image(lambda idx: (images[torch.as_tensor(idx)], None), np.arange(5),
                             batch_size=2)
    assert count == 5 and torch.allclose(mean, images.mean(dim=0))


# --- the mechanisms of the fix -----------------------------------------------------------------


def test_a_fresh_run_starts_the_output_at_the_data_mean(tiny_config):
    source = open_source(tiny_config.data)
    ids = source.split_ids("train")
    model = build_model(tiny_config)
    TRAIN.start_fresh(model, tiny_config, source, ids)
    images, _ = source.load_batch(ids)
    data_mean = float(images.mean())
    assert int(model.mean_image_count) == len(ids)
    assert torch.allclose(model.mean_image, images.mean(dim=0), atol=1e-6)
    assert float(model.output_layer.bias.detach()[0]) == pytest.approx(
        math.log(data_mean / (1 - data_mean)), rel=1e-5)


def _mean_outputs(overrides: dict, steps: int = 15) -> list[float]:
    """The mean decoder output over the first steps of the default model on the bundled
    MNIST sample (mean pixel 0.13), batch 64, as ``train`` runs them."""
    config = Config().with_overrides(**overrides)
    source = open_source(config.data)
    ids = source.split_ids("train")
    torch.manual_seed(0)
    model = build_model(config)
    TRAIN.start_fresh(model, config, source, ids[:2000])
    optimizer = TRAIN.make_optimizer(model, config)
    warmup = TRAIN.warmup_steps(config, len(ids) // 64)
    outputs = []
    for step in range(steps):
        x, _ = source.load_batch(ids[step * 64 : (step + 1) * 64])
        out = model(x, quantize=step >= warmup)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        outputs.append(float(out.reconstruction.detach().mean()))
    return outputs


def test_the_output_bias_at_the_mean_keeps_the_sigmoid_out_of_saturation():
    # The failure the fix removes: from 0.5, Adam's first steps drive every output past
    # MNIST's mean into the sigmoid's flat tail (under 0.01 within 15 steps), where the
    # gradients vanish: a decoder that outputs black, whatever the codebook's usage.
    assert min(_mean_outputs({"model.init_output_bias": False})) < 0.01
    # Starting at the mean there is no global shift to overshoot.
    assert min(_mean_outputs({})) > 0.06


def test_warmup_is_at_most_half_the_first_epoch():
    config = Config()
    assert TRAIN.warmup_steps(config, 938) == 100  # full MNIST, batch 64
    assert TRAIN.warmup_steps(config, 47) == 23  # 3,000 CIFAR images, batch 64
    assert TRAIN.warmup_steps(config.with_overrides(**{"quantizer.warmup_steps": 0}), 938) == 0


def test_warmup_passes_the_latent_through_and_leaves_the_codebook_alone(tiny_config):
    model = build_model(tiny_config).train()
    x = torch.rand(8, 1, 8, 8)
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    out = model(x, quantize=False)
    torch.testing.assert_close(out.reconstruction, model.decoder(model.latent(x)))
    assert float(out.loss.detach()) == pytest.approx(float(out.reconstruction_loss.detach()))
    assert all(torch.equal(before[k], v) for k, v in model.quantizer.state_dict().items())
    assert not bool(model.quantizer.initialized)
    model(x)  # the first quantized step fits the codebook (k-means) to the trained encoder
    assert bool(model.quantizer.initialized)


def test_training_warms_up_then_quantizes(tmp_path, tiny_config, monkeypatch):
    flags = []
    real = TRAIN.VQVAE.forward

    def spy(self, x, quantize=True):
        flags.append(quantize)
        return real(self, x, quantize)

    monkeypatch.setattr(TRAIN.VQVAE, "forward", spy)
    quiet(tiny_config.with_overrides(**{"train.epochs": 2}), tmp_path / "run")
    assert flags == [False, False] + [True] * 8  # 5 steps an epoch: warm-up 5 // 2 = 2


def test_the_input_is_centred_for_the_encoder(tiny_config):
    model = build_model(tiny_config)
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(model.latent(x), model.encoder(2 * x - 1))
    plain = build_model(tiny_config.with_overrides(**{"model.center_input": False}))
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain.latent(x), plain.encoder(x))


# --- a dead decoder trips the check ------------------------------------------------------------


def _kill_the_decoder(monkeypatch):
    """Start every run with the output bias far negative: the sigmoid saturates at ~0."""
    real = TRAIN.start_fresh

    def dead(model, config, source, ids):
        real(model, config, source, ids)
        with torch.no_grad():
            model.output_layer.bias.fill_(-30.0)

    monkeypatch.setattr(TRAIN, "start_fresh", dead)


def test_a_dead_decoder_fails_the_run_and_marks_the_checkpoint(tmp_path, tiny_config,
                                                               monkeypatch):
    _kill_the_decoder(monkeypatch)
    config = tiny_config.with_overrides(**{"train.min_gain_over_baseline_db": 3.0})
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        quiet(config, run)
    meta = json.loads((run / "checkpoint/config.json").read_text())
    health, v = meta["progress"]["health"], meta["progress"]["validation"]
    assert health["status"] == UNHEALTHY
    assert v["psnr"] < v["baseline_psnr"]  # black squares: worse than the mean image
    assert str(info.value) == (
        f"training ended unhealthy: {health['reason']}; {run / 'checkpoint'} is marked "
        "unhealthy (encode refuses it without --force); try another seed, a lower train.lr "
        "or more epochs")
    with pytest.raises(UnhealthyCheckpointError, match="is marked unhealthy"):
        require_healthy({**meta, "directory": str(run / "checkpoint")})
    require_healthy({**meta, "directory": str(run / "checkpoint")}, force=True)


def test_a_smoke_run_with_a_dead_decoder_only_warns(tmp_path, tiny_config, monkeypatch):
    _kill_the_decoder(monkeypatch)
    config = tiny_config.with_overrides(**{"train.min_gain_over_baseline_db": 3.0,
                                           "train.max_steps": 3})
    lines = []
    result = train(config, tmp_path / "run", progress=False, log=lines.append)
    assert result.step == 3 and result.health["status"] == UNHEALTHY
    assert lines[-1] == (f"warning: {result.health['reason']} (a smoke run stopped by "
                         "train.max_steps; the checkpoint is marked unhealthy)")
    meta = json.loads((tmp_path / "run/checkpoint/config.json").read_text())
    assert meta["progress"]["health"]["status"] == UNHEALTHY


@pytest.mark.usefixtures("prefect_harness")
def test_the_cli_says_it_in_one_line(tmp_path, tiny_config, monkeypatch):
    import yaml

    _kill_the_decoder(monkeypatch)
    raw = tiny_config.model_dump()
    raw["train"]["min_gain_over_baseline_db"] = 3.0
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["train", "--config", str(path), "--out",
                                       str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: training ended unhealthy: validation PSNR ")
    result = CliRunner().invoke(main, ["info", str(tmp_path / "run")])
    assert result.exit_code == 0
    assert "(mean-image baseline " in result.output
    assert "  health          UNHEALTHY: validation PSNR" in result.output


def test_encode_refuses_an_unhealthy_checkpoint_unless_forced(tmp_path, tiny_config,
                                                              monkeypatch):
    _kill_the_decoder(monkeypatch)
    config = tiny_config.with_overrides(**{"train.min_gain_over_baseline_db": 3.0,
                                           "train.max_steps": 3})
    quiet(config, tmp_path / "run")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    command = [console_command(), "encode", "--checkpoint", str(tmp_path / "run"), "--out",
               str(tmp_path / "enc"), "--quiet", "--format", "parquet"]
    refused = subprocess.run(command, cwd=outside, env=env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'run' / 'checkpoint'} is marked unhealthy: "
        + json.loads((tmp_path / "run/checkpoint/config.json").read_text())
        ["progress"]["health"]["reason"]
        + "; train again (another seed, a lower train.lr, more steps), or pass --force to "
        "use it anyway"]
    assert not (tmp_path / "enc").exists()
    forced = subprocess.run([*command, "--force"], cwd=outside, env=env, capture_output=True,
                            text=True, timeout=300)
    assert forced.returncode == 0, forced.stderr
    assert (version_folder(tmp_path / "enc") / ".vqtok/manifest.json").is_file()


# --- checkpoints from before ------------------------------------------------------------------


def test_a_checkpoint_from_before_loads_and_encodes_as_it_was_trained(tmp_path, tiny_config):
    """Written without the mean image and without the new config keys: it loads with the
    meaning those keys had (raw input, no warm-up) and gives the same codes."""
    legacy_config = tiny_config.with_overrides(**LEGACY_DEFAULTS)
    model = build_model(legacy_config).train()
    model(torch.rand(32, 1, 8, 8))  # fit the codebook
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, model, legacy_config)
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
             if not k.startswith("mean_image")}
    save_file(state, str(folder / "model.safetensors"))
    meta = json.loads((folder / "config.json").read_text())
    for key in LEGACY_DEFAULTS:  # keys the config of an older vqtok did not have
        section, leaf = key.split(".")
        del meta["config"][section][leaf]
    meta["weights_sha256"] = weights_hash(state)
    (folder / "config.json").write_text(json.dumps(meta))

    loaded = load_tokenizer(folder)
    assert loaded.center_input is False and int(loaded.mean_image_count) == 0
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in loaded.modules())
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded.encode(x), model.eval().encode(x))

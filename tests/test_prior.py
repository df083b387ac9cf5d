"""The token prior: it learns structure, is causal, samples reproducibly and by label, resumes."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import TensorDataset
from vqtok.tokenizer.errors import CheckpointError, ConfigError, TrainingError
from vqtok.tokenizer.prior.checkpoint import load_prior, read_prior_meta, save_prior
from vqtok.tokenizer.prior.config import (
    PriorConfig,
    PriorModelConfig,
    PriorShape,
    load_prior_config,
)
from vqtok.tokenizer.prior.model import TokenPrior, _draw
from vqtok.tokenizer.prior.train import evaluate_prior, learning_rate, train_prior

SMALL = PriorModelConfig(d_model=32, n_layers=2, n_heads=4, dropout=0.1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small are all per-op overhead; a second thread on a busy 2-core machine
    only adds synchronisation (5-10x slower). Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**dotted):
    base = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "train.device": "cpu",
            "train.batch_size": 32, "train.lr": 3e-3, "train.warmup_steps": 10,
            "train.checkpoint_every": 50}
    return PriorConfig().with_overrides(**{**base, **dotted})


def quiet_train(cfg, out, train, heldout=None, vocab=16, **kwargs):
    return train_prior(cfg, out, train, heldout, vocab_size=vocab, log=lambda _: None, **kwargs)


def counting_grids(n, seed=0):
    """3x3 grids x_t = (a + t) mod 16 with a random start a in 0..7: 3 bits of surprise per
    grid, so an ideal model pays 3/9 bit per token where the unigram pays ~4."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 8, n)
    codes = (starts[:, None] + np.arange(9)[None]) % 16
    return TensorDataset(torch.from_numpy(codes.reshape(n, 3, 3)),
                         torch.full((n,), -1, dtype=torch.long))


def class_grids(n, seed=0):
    """Label c in 0..2 draws every code uniformly from {4c, .., 4c + 3}."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    codes = 4 * labels[:, None] + rng.integers(0, 4, (n, 4))
    return TensorDataset(torch.from_numpy(codes.reshape(n, 2, 2)), torch.from_numpy(labels))


def test_loss_falls_on_tokens_with_structure(tmp_path):
    result = quiet_train(config(**{"train.steps": 150}), tmp_path / "p", counting_grids(512),
                         counting_grids(128, seed=1))
    first, last = result.history[0], result.history[-1]
    assert result.step == 150 and [h["step"] for h in result.history] == [50, 100, 150]
    h = last["heldout"]
    assert h["unigram_bits"] > 3.5  # 16 codes, none rare
    assert h["nll_bits"] < 1.0 < first["train_bits"]  # ideal: 0.33 bits/token
    assert h["nll_vs_unigram"] == pytest.approx(h["nll_bits"] / h["unigram_bits"])
    assert h["sequences"] == 128 and "nll_bits_unconditional" not in h  # no labels


def test_logits_never_depend_on_later_tokens():
    torch.manual_seed(0)
    model = TokenPrior(PriorShape(vocab_size=16, grid_h=3, grid_w=3, num_classes=4), SMALL).eval()
    codes = torch.randint(0, 16, (5, 9))
    labels = torch.tensor([0, 1, 2, 3, -1])
    base = model(codes, labels)
    for t in range(9):
        changed = codes.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.arange(5)) % 16
        logits = model(changed, labels)
        assert torch.equal(logits[:, : t + 1], base[:, : t + 1]), t  # exactly, not approx
        if t < 8:
            assert not torch.allclose(logits[:, t + 1], base[:, t + 1])  # the next one sees it
    other = model(codes, torch.tensor([1, 2, 3, -1, 0]))
    assert not torch.allclose(other[:, 0], base[:, 0])  # the label is read from position 0


def test_prefix_forward_equals_full_forward_on_the_prefix():
    torch.manual_seed(0)
    model = TokenPrior(PriorShape(vocab_size=16, grid_h=2, grid_w=3), SMALL).eval()
    codes = torch.randint(0, 16, (3, 6))
    full = model(codes)
    for t in range(1, 7):
        torch.testing.assert_close(model(codes[:, :t]), full[:, :t], rtol=1e-5, atol=1e-6)


def test_bad_labels_and_shapes_are_refused():
    model = TokenPrior(PriorShape(vocab_size=16, grid_h=2, grid_w=2, num_classes=3), SMALL)
    with pytest.raises(ValueError, match=r"label 5 is outside 0..2"):
        model(torch.zeros((1, 4), dtype=torch.long), torch.tensor([5]))
    with pytest.raises(ValueError, match="longer than the grid"):
        model(torch.zeros((1, 5), dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible"):
        TokenPrior(PriorShape(vocab_size=16, grid_h=2, grid_w=2),
                   PriorModelConfig(d_model=30, n_heads=4))


def test_draw_top_k_and_temperature():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.0]])
    argmax = torch.tensor([[1], [0]])
    assert torch.equal(_draw(logits, 0.0, None, None), argmax)  # temperature 0 is greedy
    assert torch.equal(_draw(logits, 1.0, 1, torch.Generator().manual_seed(0)), argmax)
    g = torch.Generator().manual_seed(0)
    drawn = torch.cat([_draw(logits, 2.0, 2, g) for _ in range(200)], dim=1)
    assert set(drawn[0].tolist()) == {1, 3} and set(drawn[1].tolist()) == {0, 3}


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = config(**{"train.steps": 110, "train.lr": 1e-3, "train.warmup_steps": 10,
                    "train.min_lr_ratio": 0.1})
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert learning_rate(cfg, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 60) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: mid point
    assert learning_rate(cfg, 110) == pytest.approx(1e-4)


@pytest.fixture(scope="module")
def class_prior(tmp_path_factory):
    out = tmp_path_factory.mktemp("prior") / "run"
    cfg = config(**{"train.steps": 200, "train.label_dropout": 0.0, "train.checkpoint_every": 200})
    quiet_train(cfg, out, class_grids(600), class_grids(90, seed=1))
    return out


def test_sampling_is_reproducible_with_a_seed(class_prior):
    model = load_prior(class_prior)
    labels = torch.tensor([0, 1, 2, -1] * 4)

    def draw(seed):
        return model.sample(16, labels, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(7), draw(7), draw(8)
    assert a.shape == (16, 2, 2) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_samples_respect_the_label(class_prior):
    model = load_prior(class_prior)
    g = torch.Generator().manual_seed(0)
    for label in range(3):
        grids = model.sample(64, torch.full((64,), label), top_k=4, generator=g)
        assert ((grids // 4) == label).all(), label  # every code from the class's own four
        assert len(torch.unique(grids)) == 4  # and it samples, not just repeats one code


def test_conditioning_lowers_heldout_nll(class_prior):
    model = load_prior(class_prior)
    held = class_grids(90, seed=1)
    codes, labels = held.tensors
    figures = evaluate_prior(model, codes, labels)
    assert figures["nll_bits"] == pytest.approx(2.0, abs=0.1)  # 2 bits: 4 codes per class
    assert figures["nll_bits_unconditional"] > figures["nll_bits"]
    assert read_prior_meta(class_prior)["shape"] == {"vocab_size": 16, "grid_h": 2,
                                                     "grid_w": 2, "num_classes": 3}


def test_checkpoint_round_trip_and_tamper_detection(tmp_path):
    torch.manual_seed(1)
    model = TokenPrior(PriorShape(vocab_size=16, grid_h=2, grid_w=2, num_classes=3), SMALL)
    cfg = config()
    ckpt = tmp_path / "run" / "checkpoint"
    digest = save_prior(ckpt, model, cfg, data={"tokens": "x"}, progress={"step": 3})
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "config.json"}
    assert not (tmp_path / "run" / "checkpoint.tmp").exists()
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["format"] == "vqtok-prior" and meta["weights_sha256"] == digest
    assert meta["progress"] == {"step": 3}
    for path in (tmp_path / "run", ckpt):  # the run folder or the checkpoint itself
        loaded = load_prior(path)
        assert loaded.checkpoint_hash == digest and not loaded.training
        assert loaded.prior_config == cfg and loaded.data_meta == {"tokens": "x"}
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name

    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.weight"][0, 0] += 1
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="content hash does not match config.json"):
        load_prior(ckpt)
    (ckpt / "model.safetensors").write_bytes(pickle.dumps({"head.weight": [1.0]}))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_prior(ckpt)
    meta["format"] = "vqtok-checkpoint"
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a prior checkpoint"):
        load_prior(ckpt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_prior(tmp_path / "nowhere")


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    cfg = config(**{"train.steps": 30, "train.checkpoint_every": 10, "train.label_dropout": 0.3})
    data = class_grids(100)
    straight = quiet_train(cfg, tmp_path / "a", data)
    first = quiet_train(cfg, tmp_path / "b", data, stop_at_step=10)
    assert first.step == 10
    resumed = quiet_train(cfg, tmp_path / "b", data)
    assert resumed.resumed_from_step == 10 and resumed.step == 30
    assert resumed.weights_sha256 == straight.weights_sha256
    again = quiet_train(cfg, tmp_path / "b", data)  # finished: nothing changes
    assert again.step == 30 and again.weights_sha256 == straight.weights_sha256


def test_resume_with_other_settings_is_refused(tmp_path):
    data = class_grids(64)
    quiet_train(config(**{"train.steps": 20, "train.checkpoint_every": 5}), tmp_path / "p",
                data, stop_at_step=5)
    with pytest.raises(TrainingError, match="different 'model.d_model'"):
        quiet_train(config(**{"train.steps": 20, "model.d_model": 64}), tmp_path / "p", data)
    with pytest.raises(TrainingError, match="different 'tokens"):
        quiet_train(config(**{"train.steps": 20, "train.checkpoint_every": 5}), tmp_path / "p",
                    data, vocab=32)


def test_damaged_training_state_is_one_checkpoint_error(tmp_path):
    """The prior restores its training state through the tokenizer's code: same message."""
    data = class_grids(64)
    cfg = config(**{"train.steps": 20, "train.checkpoint_every": 5})
    quiet_train(cfg, tmp_path / "p", data, stop_at_step=5)
    (tmp_path / "p/checkpoint/train_state.json").write_text('{"step": 5')
    with pytest.raises(CheckpointError, match=r"checkpoint: training state unusable "
                                              r"\(JSONDecodeError: .*\); delete .* to start over"):
        quiet_train(cfg, tmp_path / "p", data)


def test_a_file_stands_for_its_own_folder_only(tmp_path):
    data = class_grids(64)
    quiet_train(config(**{"train.steps": 5}), tmp_path / "p", data)
    assert read_prior_meta(tmp_path / "p/checkpoint/model.safetensors")["directory"] == str(
        tmp_path / "p/checkpoint")
    beside = tmp_path / "p" / "samples.parquet"  # not the run's checkpoint
    beside.write_bytes(b"PAR1")
    with pytest.raises(CheckpointError, match=f"^{beside} is not a prior checkpoint"):
        read_prior_meta(beside)


def test_codes_outside_the_codebook_are_refused(tmp_path):
    with pytest.raises(TrainingError, match=r"codes range over 0..11 but the codebook has 8"):
        quiet_train(config(), tmp_path / "p", class_grids(32), vocab=8)


def test_prior_config_is_strict(tmp_path):
    bad = tmp_path / "prior.yaml"
    bad.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match="unknown key 'model.d_modle'"):
        load_prior_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("seed: 3\ntrain:\n  lr: 1\n")  # YAML int for a float is fine
    assert load_prior_config(good).train.lr == 1.0
    assert math.isclose(PriorConfig().with_overrides(**{"train.lr": None}).train.lr, 2e-3)

"""Configs: YAML in configs/ are valid; unknown keys and wrong types name the key."""

from pathlib import Path

import pytest
from vqtok.tokenizer.config import Config, ConfigError, load_config, parse_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    assert isinstance(load_config(path), Config)


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"default.yaml", "mnist.yaml", "cifar10.yaml"}


def test_defaults_turn_on_ema_kmeans_and_restarts():
    q = Config().quantizer
    assert q.ema and q.kmeans_init and q.restart_after > 0 and q.beta == 0.25


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'model\.hiden_channels'"):
        parse_config({"model": {"hiden_channels": 3}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"key 'train\.batch_size'.*got 'big'"):
        parse_config({"train": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match=r"key 'quantizer\.ema'"):
        parse_config({"quantizer": {"ema": "yes"}})


def test_integers_are_accepted_for_floats():
    assert parse_config({"train": {"lr": 1}}).train.lr == 1.0


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_overrides_are_validated_too():
    cfg = Config().with_overrides(**{"train.epochs": 3, "data.dataset": "mnist"})
    assert cfg.train.epochs == 3 and cfg.data.dataset == "mnist"
    with pytest.raises(ConfigError, match="train.epochs"):
        Config().with_overrides(**{"train.epochs": 0})

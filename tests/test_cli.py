"""The tokenize-dataset CLI: help, train, and one-line errors with the right exit codes."""

import yaml
from click.testing import CliRunner

from flows.cli import main
from tests.conftest import TINY


def write_config(path, dataset, **train):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    raw["data"]["dataset"] = dataset
    raw["train"].update(train)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_help_everywhere():
    runner = CliRunner()
    assert "Train a VQ-VAE" in runner.invoke(main, []).output
    result = runner.invoke(main, ["train", "--help"])
    assert result.exit_code == 0 and "--config" in result.output and "--out" in result.output


def test_train_writes_checkpoint_and_picture(tmp_path, tiny_npz):
    config = write_config(tmp_path / "tiny.yaml", f"npz:{tiny_npz}", max_steps=2)
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--out",
                                       str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run/checkpoint/model.safetensors").is_file()
    png = tmp_path / "run/reconstructions.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "validation: mse" in result.output


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 3\n")
    result = CliRunner().invoke(main, ["train", "--config", str(bad), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {bad}: unknown key 'model.widht'; remove it or fix its spelling"]


def test_missing_data_is_one_line_and_exit_1(tmp_path):
    config = write_config(tmp_path / "c.yaml", f"npz:{tmp_path}/nothing.npz")
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--out",
                                       str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: npz:{tmp_path}/nothing.npz: file not found"
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
    config = write_config(tmp_path / "c.yaml", f"npz:{tmp_path}/nothing.npz")
    result = CliRunner().invoke(main, ["--debug", "train", "--config", str(config)])
    assert result.exit_code != 0 and result.exception is not None
    assert "file not found" in str(result.exception)

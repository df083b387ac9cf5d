"""The tokenize-dataset CLI: help, train, and one-line errors with the right exit codes."""

import pytest
import yaml
from click.testing import CliRunner
from vqtok.flows.cli import main

from tests.conftest import TINY
from tests.helpers import version_folder


def write_config(path, dataset, **train):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    raw["data"]["dataset"] = dataset
    raw["train"].update(train)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("command", ["train", "encode", "stats", "decode", "run", "info", "serve"])
def test_help_everywhere(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_top_level_help_lists_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "encode", "stats", "decode", "run", "info", "serve"):
        assert command in result.output


@pytest.mark.usefixtures("prefect_harness")
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


@pytest.mark.usefixtures("prefect_harness")
def test_run_encode_stats_decode_info_end_to_end(tmp_path, tiny_npz):
    runner = CliRunner()
    config = write_config(tmp_path / "tiny.yaml", f"npz:{tiny_npz}")
    run_dir = tmp_path / "run"
    result = runner.invoke(main, ["run", "--config", str(config), "--out", str(run_dir),
                                  "--shard-size", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    for label in ("codebook usage", "perplexity", "PSNR", "tokens/s", "checkpoint", "pictures"):
        assert label in result.output
    version = version_folder(run_dir)  # the published version the symlinks name
    assert version == version_folder(run_dir, 1) and (version / ".vqtok/manifest.json").is_file()
    assert (run_dir / "tokens").resolve() == version / "tokens"
    assert (run_dir / "stats/usage.png").is_file()
    assert (run_dir / "decode/reconstructions.png").is_file()

    # Encode again into another folder, parquet only, then stats and decode by hand.
    other = tmp_path / "other"
    result = runner.invoke(main, ["encode", "--checkpoint", str(run_dir), "--out", str(other),
                                  "--format", "parquet", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "40 images encoded" in result.output
    assert not list(other.rglob("*.h5")) and not (other / "hdf5").exists()
    assert not (version_folder(other) / "hdf5").exists()
    result = runner.invoke(main, ["stats", "--out", str(other)])
    assert result.exit_code == 0 and "usage" in result.output
    result = runner.invoke(main, ["decode", "--tokens", str(other / "tokens"), "--checkpoint",
                                  str(run_dir), "--out", str(other / "decode"), "--limit", "8"])
    assert result.exit_code == 0 and "decoded 8 images" in result.output

    info = runner.invoke(main, ["info", str(run_dir / "tokens")])
    assert info.exit_code == 0 and "rows            40 (train 36, validation 4)" in info.output
    info = runner.invoke(main, ["info", str(run_dir / "checkpoint")])
    assert info.exit_code == 0 and "codebook        16 x 4" in info.output


@pytest.mark.usefixtures("prefect_harness")
def test_decode_with_the_wrong_tokenizer_is_one_line_and_exit_1(tmp_path, tiny_npz):
    from vqtok.tokenizer import save_checkpoint
    from vqtok.tokenizer.checkpoint import build_model
    from vqtok.tokenizer.config import parse_config

    from tests.test_flows import _hand_made_tokens

    raw = yaml.safe_load(write_config(tmp_path / "c.yaml", f"npz:{tiny_npz}").read_text())
    config = parse_config(raw)
    save_checkpoint(tmp_path / "ckpt", build_model(config), config)
    tokens = _hand_made_tokens(tmp_path / "t.parquet")
    result = CliRunner().invoke(main, ["decode", "--tokens", str(tokens), "--checkpoint",
                                       str(tmp_path / "ckpt"), "--out", str(tmp_path / "d")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(f"error: {tokens}: tokens were made by checkpoint feedfeed")
    assert "Traceback" not in result.output


def test_encode_without_checkpoint_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["encode", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "encode needs --checkpoint" in result.output


def _interrupted_command(error: BaseException):
    import click
    from vqtok.flows.error_policy import friendly_errors

    @click.command()
    @friendly_errors
    def command() -> None:
        raise error

    return command


def _masked_interrupt() -> ValueError:
    """What Prefect raises when Ctrl-C lands while it creates a task run."""
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ValueError("Task run is not set")  # noqa: B904 - implicit chaining, as Prefect
    except ValueError as exc:
        return exc


@pytest.mark.parametrize("error", [KeyboardInterrupt(), _masked_interrupt()])
def test_ctrl_c_is_exit_130_even_when_prefect_masks_it(error):
    result = CliRunner().invoke(_interrupted_command(error), [])
    assert result.exit_code == 130
    assert result.output.strip() == ("error: interrupted; re-run the same command to continue "
                                     "(finished shards and checkpoints are kept)")


def test_an_unexpected_error_is_not_called_an_interrupt():
    result = CliRunner().invoke(_interrupted_command(ValueError("Task run is not set")), [])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)

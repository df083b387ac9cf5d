"""``tokenize-dataset prior train|sample`` and the prior flows on a tiny token store."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from vqtok.flows.cli import main
from vqtok.storage import ParquetTokenWriter, TokenMeta, load_grid, read_meta
from vqtok.tokenizer import __version__, open_source
from vqtok.tokenizer.checkpoint import build_model, load_tokenizer, save_checkpoint
from vqtok.tokenizer.config import parse_config

from tests.conftest import TINY
from tests.helpers import PREFECT_LINE, write_npz

TRAIN = ["--steps", "40", "--batch-size", "16", "--d-model", "16", "--layers", "1", "--heads",
         "2", "--checkpoint-every", "20", "--lr", "0.01", "--device", "cpu"]


def printed(result) -> list[str]:
    """What the command printed itself, without Prefect's time-stamped log lines."""
    return [line for line in result.output.strip().splitlines()
            if not PREFECT_LINE.match(line)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config_module):
    """RUN/checkpoint (a tiny untrained tokenizer: 2x2 grids, K = 16) and RUN/tokens.parquet
    whose label c (0..3) draws codes from {4c, .., 4c + 3}; ids name real images of the npz."""
    config = tiny_config_module
    root = tmp_path_factory.mktemp("prior-cli") / "run"
    model = build_model(config)
    digest = save_checkpoint(root / "checkpoint", model, config)
    source = open_source(config.data)
    meta = TokenMeta(codebook_size=16, grid_h=2, grid_w=2, dataset=source.name,
                     dataset_fingerprint=source.fingerprint, checkpoint_hash=digest,
                     vqtok_version=__version__,
                     extra={"data": config.data.model_dump(), "channels": 1, "image_size": 8})
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 4
    codes = (4 * labels[:, None] + rng.integers(0, 4, (40, 4))).reshape(40, 2, 2)
    with ParquetTokenWriter(root / "tokens.parquet", meta) as writer:
        writer.write(codes[:32], np.arange(32), labels[:32], "train")
        writer.write(codes[32:], np.arange(32, 40), labels[32:], "validation")
    return root


@pytest.fixture(scope="module")
def tiny_config_module(tmp_path_factory):
    raw = json.loads(json.dumps(TINY))
    raw["data"]["dataset"] = f"npz:{write_npz(tmp_path_factory.mktemp('npz') / 'tiny.npz')}"
    return parse_config(raw)


@pytest.fixture(scope="module")
def trained(run, prefect_harness):
    result = CliRunner().invoke(main, ["prior", "train", "--tokens", str(run / "tokens.parquet"),
                                       "--out", str(run / "prior"), *TRAIN])
    assert result.exit_code == 0, result.output
    return result


def test_prior_help():
    for args in (["prior", "--help"], ["prior", "train", "--help"],
                 ["prior", "sample", "--help"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "Usage:" in result.output
    assert "prior" in CliRunner().invoke(main, ["--help"]).output


def test_train_reports_heldout_bits_next_to_the_unigram(trained, run):
    lines = printed(trained)
    assert lines[0].startswith(f"prior {run / 'prior' / 'checkpoint'} (weights ")
    assert lines[0].endswith("step 40")
    assert lines[1].startswith("held-out (validation): ")
    assert "bits/token; unigram entropy" in lines[1]
    assert (run / "prior/checkpoint/model.safetensors").is_file()


def test_info_describes_a_prior(trained, run):
    result = CliRunner().invoke(main, ["info", str(run / "prior")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"prior {run / 'prior' / 'checkpoint'}"
    assert "1 layers, width 16, 2 heads, 4 classes" in lines[2]
    assert f"2 x 2 grid, codebook 16, from {(run / 'tokens.parquet').resolve()}" in lines[3]
    assert lines[4].split()[-1] == read_meta(run / "tokens.parquet").checkpoint_hash
    assert lines[5].split()[-3:] == ["40", "of", "40"]
    tokens = CliRunner().invoke(main, ["info", str(run / "tokens.parquet")])  # beside checkpoint/
    assert tokens.exit_code == 0 and tokens.output.startswith(f"tokens {run / 'tokens.parquet'}")
    assert re.fullmatch(r"  held-out        \d+\.\d{3} bits/token \(validation\); "
                        r"unigram \d+\.\d{3}", lines[6])


@pytest.mark.usefixtures("prefect_harness")
def test_sample_writes_a_token_file_and_decodes_it(trained, run):
    out = run / "samples3"
    args = ["prior", "sample", "--prior", str(run / "prior"), "--n", "8", "--label", "3",
            "--top-k", "4", "--seed", "5", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert printed(result) == [(f"8 samples -> {out / 'samples.parquet'}, decoded -> "
                                     f"{out / 'decoded.png'}")]
    grid = load_grid(out / "samples.parquet")
    assert grid.codes.shape == (8, 2, 2) and grid.split_names == ("sample",)
    assert grid.ids.tolist() == list(range(8)) and grid.labels.tolist() == [3] * 8
    train_meta = read_meta(run / "tokens.parquet")
    assert grid.meta.checkpoint_hash == train_meta.checkpoint_hash
    assert grid.meta.codebook_size == 16 and (grid.meta.grid_h, grid.meta.grid_w) == (2, 2)
    assert grid.meta.extra["generated_by"] == "prior"
    assert grid.meta.extra["prior"]["label"] == 3 and grid.meta.extra["prior"]["seed"] == 5
    assert (out / "decoded.png").read_bytes()[:4] == b"\x89PNG"
    # The ids 0..7 are real images of the dataset in extra["data"]: never compared with them.
    assert not (out / "metrics.csv").exists() and not (out / "reconstructions.png").exists()

    again = CliRunner().invoke(main, [*args[:-1], str(run / "samples3b")])
    assert again.exit_code == 0, again.output
    assert np.array_equal(load_grid(run / "samples3b/samples.parquet").codes, grid.codes)


@pytest.mark.usefixtures("prefect_harness")
def test_unconditional_samples_without_a_tokenizer_are_not_decoded(trained, run, tmp_path):
    from vqtok.flows.prior_flow import prior_sample_flow

    result = prior_sample_flow(str(run / "prior"), str(tmp_path / "s"), n=4, seed=1,
                               device="cpu")
    grid = load_grid(result["tokens"])
    assert grid.labels.tolist() == [-1] * 4 and result["label"] is None
    assert result["picture"] == str(tmp_path / "s" / "decoded.png")  # found beside the tokens

    (run / "checkpoint").rename(run / "moved")
    try:
        bare = prior_sample_flow(str(run / "prior"), str(tmp_path / "t"), n=4, seed=1,
                                 device="cpu")
    finally:
        (run / "moved").rename(run / "checkpoint")
    assert bare["picture"] is None and not (tmp_path / "t" / "decoded.png").exists()
    assert np.array_equal(load_grid(bare["tokens"]).codes, grid.codes)


def test_sample_refuses_an_unknown_label_and_a_foreign_tokenizer(trained, run, tmp_path,
                                                                   tiny_config_module):
    result = CliRunner().invoke(main, ["prior", "sample", "--prior", str(run / "prior"),
                                       "--label", "4", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "the prior knows labels 0..3" in result.output
    model = load_tokenizer(run / "checkpoint")  # the same tokenizer, one weight changed
    with torch.no_grad():
        model.quantizer.codebook.add_(1.0)
    other = tmp_path / "other"
    save_checkpoint(other, model, tiny_config_module)
    result = CliRunner().invoke(main, ["prior", "sample", "--prior", str(run / "prior"),
                                       "--checkpoint", str(other), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "did not make the prior's training tokens" in result.output


def test_prior_errors_are_one_line(tmp_path, run):
    result = CliRunner().invoke(main, ["prior", "sample", "--prior", str(run / "checkpoint"),
                                       "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: {run / 'checkpoint' / 'config.json'}: not a prior checkpoint (a tokenizer's?);"
        " pass the folder 'prior train' wrote"]
    bad = tmp_path / "prior.yaml"
    bad.write_text("train:\n  stpes: 3\n")
    result = CliRunner().invoke(main, ["prior", "train", "--tokens", str(run / "tokens.parquet"),
                                       "--out", str(tmp_path / "p"), "--config", str(bad)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {bad}: unknown key 'train.stpes'; remove it or " \
                                     "fix its spelling"
    binary = tmp_path / "prior.bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00binary")
    result = CliRunner().invoke(main, ["prior", "train", "--tokens", str(run / "tokens.parquet"),
                                       "--out", str(tmp_path / "p"), "--config", str(binary)])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {binary}: not a text file (not UTF-8); pass a "
                                     "YAML config")
    heads = tmp_path / "heads.yaml"
    heads.write_text("model:\n  d_model: 30\n  n_heads: 4\n")
    result = CliRunner().invoke(main, ["prior", "train", "--tokens", str(run / "tokens.parquet"),
                                       "--out", str(tmp_path / "p"), "--config", str(heads)])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {heads}: section 'model': d_model 30 is not "
                                     "divisible by n_heads 4; choose a width that is a multiple "
                                     "of the heads")
    assert not (tmp_path / "p").exists()

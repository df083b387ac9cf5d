"""Checkpoints: safetensors + JSON round trip, integrity checks, and no unpickling ever."""

import json
import pickle

import pytest
import torch
from vqtok.tokenizer import CheckpointError, load_tokenizer, save_checkpoint
from vqtok.tokenizer.checkpoint import build_model, read_checkpoint_meta


@pytest.fixture
def saved(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config)
    model.train()(torch.rand(8, 1, 8, 8))  # k-means init, so buffers differ from a fresh model
    digest = save_checkpoint(tmp_path / "checkpoint", model, tiny_config, {"step": 1})
    return tmp_path / "checkpoint", model.eval(), digest


def test_round_trip_gives_the_same_tokens(saved):
    path, model, digest = saved
    loaded = load_tokenizer(path)
    assert not loaded.training
    assert loaded.checkpoint_hash == digest
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))


def test_layout_is_safetensors_plus_json_and_loads_from_the_run_folder(saved):
    path, _, digest = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((path / "config.json").read_text())
    assert meta["weights_sha256"] == digest and meta["config"]["model"]["num_embeddings"] == 16
    assert load_tokenizer(path.parent).checkpoint_hash == digest  # the training output folder
    assert read_checkpoint_meta(path / "model.safetensors")["weights_sha256"] == digest
    beside = path.parent / "tokens.parquet"  # a file stands for its own folder, not the run's
    beside.write_bytes(b"PAR1")
    with pytest.raises(CheckpointError, match="is not a vqtok checkpoint"):
        read_checkpoint_meta(beside)
    beside.unlink()
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob("*.old"))


def test_resaving_replaces_the_checkpoint_atomically(saved, tiny_config):
    path, model, _ = saved
    with torch.no_grad():
        model.decoder[0].bias.add_(1.0)
    new_digest = save_checkpoint(path, model, tiny_config)
    assert load_tokenizer(path).checkpoint_hash == new_digest
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint", "tiny.npz"]


def test_a_crash_mid_swap_leaves_a_loadable_old_copy(saved):
    path, _, digest = saved
    path.rename(path.with_name("checkpoint.old"))  # what a crash between the renames leaves
    assert load_tokenizer(path.parent).checkpoint_hash == digest


def test_truncated_weights_are_refused(saved):
    path, _, _ = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_tokenizer(path)


def test_tampered_weights_fail_the_hash_check(saved):
    path, model, _ = saved
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["decoder.0.bias"] += 1
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="content hash does not match"):
        load_tokenizer(path)


def test_different_architecture_is_refused_by_name(saved, tiny_config):
    path, _, _ = saved
    other = build_model(tiny_config.with_overrides(**{"model.num_embeddings": 32}))
    save_checkpoint(path.parent / "other", other, tiny_config.with_overrides(
        **{"model.num_embeddings": 32}))
    # Weights of K=32 under a config that says K=16.
    (path / "model.safetensors").write_bytes((path.parent / "other/model.safetensors").read_bytes())
    meta = json.loads((path / "config.json").read_text())
    meta["weights_sha256"] = json.loads(
        (path.parent / "other/config.json").read_text())["weights_sha256"]
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        load_tokenizer(path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_named_model_safetensors_is_refused_without_running_it(saved, tmp_path):
    path, _, _ = saved
    marker = tmp_path / "pwned"
    (path / "model.safetensors").write_bytes(pickle.dumps(_Payload(str(marker))))
    torch.save({"x": _Payload(str(marker))}, path / "model.pt")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_tokenizer(path)
    assert not marker.exists()


def test_missing_or_foreign_folders(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a vqtok checkpoint"):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text("{\"format\": \"other\"}")
    with pytest.raises(CheckpointError, match="not a vqtok checkpoint"):
        load_tokenizer(tmp_path)

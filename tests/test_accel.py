"""The GPU path's switches (channels_last, autocast, loss scaling, prefetching), run on CPU."""

import threading

import numpy as np
import pytest
import torch
from vqtok.tokenizer import load_tokenizer, open_source, train
from vqtok.tokenizer.accel import CPU_WORKER_NICE, Accel, encode_batch_size, fit_batch_size
from vqtok.tokenizer.encode import encode_ids
from vqtok.tokenizer.quantizers.vq import nearest_code
from vqtok.tokenizer.sources import iterate_batches, prefetched

CPU = torch.device("cpu")
GPU_PATH_ON_CPU = {
    "channels_last + prefetch": Accel(CPU, channels_last=True, prefetch=2),
    "bf16 autocast": Accel(CPU, torch.bfloat16, channels_last=True, prefetch=2),
    "fp16 autocast + loss scaling": Accel(CPU, torch.float16, channels_last=True, prefetch=2),
}


def quiet_train(config, out, **kwargs):
    return train(config, out, progress=False, log=lambda _: None, **kwargs)


def test_defaults_turn_everything_on_for_cuda_only(monkeypatch):
    # On CPU only the DataLoader workers change: niced below the model's threads.
    assert Accel.for_device("cpu") == Accel(CPU, worker_nice=CPU_WORKER_NICE)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    gpu = Accel.for_device("cuda:1")
    assert (gpu.amp_dtype, gpu.channels_last, gpu.pin_memory, gpu.prefetch,
            gpu.worker_nice) == (torch.bfloat16, True, True, 2, 0)
    assert Accel.for_device("cuda", amp=False).amp_dtype is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a V100
    assert Accel.for_device("cuda").amp_dtype == torch.float16
    # Loss scaling for fp16 only: bf16 has fp32's exponent range.
    assert Accel(CPU, torch.float16).grad_scaler().is_enabled()
    assert not Accel(CPU, torch.bfloat16).grad_scaler().is_enabled()


def test_batch_size_is_the_largest_power_of_two_that_fits():
    assert fit_batch_size(per_image_bytes=1000, free_bytes=1_000_000) == 256  # 500 fit
    assert fit_batch_size(1000, 1_000_000, fraction=1.0) == 512  # 1000 fit
    assert fit_batch_size(1000, 10**12, cap=4096) == 4096
    assert fit_batch_size(10**9, 10**6) == 1
    assert fit_batch_size(0, 10**6, cap=64) == 64


def test_encode_batch_size_off_cuda_is_the_default(tiny_config):
    from vqtok.tokenizer.checkpoint import build_model

    model = build_model(tiny_config).eval()
    assert encode_batch_size(model, (1, 8, 8), Accel(CPU), 256) == 256


def test_prefetching_yields_the_same_batches_in_the_same_order(tiny_config):
    source = open_source(tiny_config.data)
    ids = source.split_ids("train")
    inline = list(iterate_batches(source, ids, 7))
    ahead = list(iterate_batches(source, ids, 7, prefetch=2))
    assert len(inline) == len(ahead) == 6
    for (a, la), (b, lb) in zip(inline, ahead, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_prefetch_raises_the_producers_error_at_its_place_and_stops_when_closed():
    def items():
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetched(items(), 2):
            got.append(item)
    assert got == [1, 2]

    endless = prefetched(iter(range(10**9)), 2)
    assert next(endless) == 0
    endless.close()  # must not leave the producer running
    assert not any(t.name == "vqtok-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("name", list(GPU_PATH_ON_CPU))
def test_training_runs_on_the_gpu_path_switches(tmp_path, tiny_config, name):
    accel = GPU_PATH_ON_CPU[name]
    config = tiny_config.with_overrides(**{"train.epochs": 3, "train.lr": 1e-2})
    result = quiet_train(config, tmp_path / "run", accel=accel)
    assert result.step == 15
    first, last = result.history[0]["validation"], result.history[-1]["validation"]
    assert last["mse"] < first["mse"]
    model = load_tokenizer(result.checkpoint)
    assert model.checkpoint_hash == result.weights_sha256
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not casting


def test_channels_last_and_prefetch_encode_to_the_same_codes(tmp_path, tiny_config):
    quiet_train(tiny_config, tmp_path / "run")
    source = open_source(tiny_config.data)
    ids = source.split_ids("train")

    def codes(accel):
        model = load_tokenizer(tmp_path / "run")
        return np.concatenate([c for c, _, _ in encode_ids(model, source, ids, 8, accel=accel)])

    assert np.array_equal(codes(Accel(CPU)), codes(GPU_PATH_ON_CPU["channels_last + prefetch"]))


def test_under_autocast_the_convolutions_are_bf16_and_the_codes_fp32(tmp_path, tiny_config):
    quiet_train(tiny_config, tmp_path / "run")
    model = load_tokenizer(tmp_path / "run")
    accel = GPU_PATH_ON_CPU["bf16 autocast"]
    source = open_source(tiny_config.data)
    ids = source.split_ids("validation")
    got = np.concatenate([c for c, _, _ in encode_ids(model, source, ids, 8, accel=accel)])
    images, _ = source.load_batch(ids)
    with torch.no_grad(), accel.autocast():
        latent = model.latent(accel.to_device(images))
    assert latent.dtype == torch.bfloat16
    flat = latent.float().permute(0, 2, 3, 1).reshape(-1, latent.shape[1])
    expected = nearest_code(flat, model.quantizer.codebook).view(len(ids), 2, 2)
    assert np.array_equal(got, expected.numpy())

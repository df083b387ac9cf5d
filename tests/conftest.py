"""Shared fixtures: a tiny config and a tiny in-memory dataset, so tests stay fast."""

from __future__ import annotations

import os
import tempfile

import pytest

# Prefect keeps its database and cached task results under PREFECT_HOME: never the user's.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="vqtok-test-prefect-")
# Test models are tiny: a second intra-op thread gains nothing and, on a busy 2-core machine,
# makes every step wait on a descheduled thread (test_train.py took 5x longer). Set before
# torch is first imported; an explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from vqtok.tokenizer.config import parse_config

from tests.helpers import write_npz

TINY = {
    "seed": 0,
    "data": {"dataset": "npz:PLACEHOLDER", "channels": 1, "image_size": 8},
    "model": {"hidden_channels": 8, "num_downsamples": 2, "latent_channels": 4,
              "embedding_dim": 4, "num_embeddings": 16},
    "quantizer": {"kmeans_iters": 2, "restart_after": 5},
    # Tiny models in a few steps stay near the mean-image baseline: the health check is off
    # here and tested on its own (tests/test_health.py).
    "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "eval_batch_size": 16,
              "min_gain_over_baseline_db": None},
}


@pytest.fixture
def tiny_npz(tmp_path):
    return write_npz(tmp_path / "tiny.npz")


@pytest.fixture
def tiny_config(tiny_npz):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    raw["data"]["dataset"] = f"npz:{tiny_npz}"
    return parse_config(raw)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (and database) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield

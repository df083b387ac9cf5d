"""Which commands Prefect records (``flows.recording``): one-shot reads run without Prefect
unless a server is configured, and are recorded as flow runs when one is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from vqtok.flows.recording import api_configured, uses_prefect

from tests.helpers import console_command, make_checkpoint, tiny_raw, write_npz

TIMEOUT_S = 300


def test_the_environment_and_the_active_profile_configure_a_server(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert not api_configured()  # no profiles file at all
    assert uses_prefect("train") and uses_prefect("encode") and not uses_prefect("stats")
    (tmp_path / "profiles.toml").write_text(
        'active = "local"\n[profiles.local]\nPREFECT_LOGGING_LEVEL = "INFO"\n'
        '[profiles.shared]\nPREFECT_API_URL = "http://prefect.internal:4200/api"\n')
    assert not api_configured()
    monkeypatch.setenv("PREFECT_PROFILE", "shared")
    assert api_configured() and uses_prefect("stats") and uses_prefect("info")
    monkeypatch.setenv("PREFECT_API_URL", "")  # the environment wins, even when empty
    assert not api_configured()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert api_configured() and uses_prefect("decode")
    (tmp_path / "profiles.toml").write_text("not [toml")
    monkeypatch.delenv("PREFECT_API_URL")
    assert not api_configured()  # a damaged profile file is no server


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_harness):
    """A tiny checkpoint and its encoded store, made through the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("recording")
    checkpoint = make_checkpoint(root / "checkpoint",
                                 tiny_raw(f"npz:{write_npz(root / 'images.npz', n=40)}"))
    outside = root / "elsewhere"
    outside.mkdir()
    api = str(PREFECT_API_URL.value())
    done = subprocess.run([console_command(), "encode", "--checkpoint", str(checkpoint),
                           "--out", str(root / "run"), "--quiet"], cwd=outside,
                          env=_env(root, PREFECT_API_URL=api), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return {"root": root, "checkpoint": checkpoint, "outside": outside, "api": api}


def _env(root, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(root / "prefect-home"), **extra}


def _run(store, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_command(), *args], cwd=store["outside"],
                          env=_env(store["root"], **env), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def test_one_shot_reads_start_no_prefect_without_a_server(store):
    root = store["root"]
    tokens = str(root / "run" / "tokens")
    home = {"PREFECT_HOME": str(root / "unused-prefect-home")}
    stats = _run(store, "stats", "--out", str(root / "run"), **home)
    info = _run(store, "info", tokens, **home)
    decode = _run(store, "decode", "--tokens", tokens, "--checkpoint", str(store["checkpoint"]),
                  "--out", str(root / "decoded"), **home)
    for result in (stats, info, decode):
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stderr == ""  # no temporary server, no Prefect log line at all
    report = json.loads((root / "run/stats/stats.json").read_text())
    assert stats.stdout.strip() == (
        f"usage {report['usage']:.1%} ({report['codes_used']}/16), perplexity "
        f"{report['perplexity']:.1f}, {report['entropy_bits']:.2f} bits/token -> "
        f"{root / 'run/stats/stats.json'}")
    assert (root / "run/stats/usage.png").is_file()
    assert info.stdout.splitlines()[:2] == [f"tokens {tokens}",
                                            "  rows            40 (train 36, validation 4)"]
    assert decode.stdout.startswith(f"decoded 40 images -> {root / 'decoded/reconstructions.png'}")
    assert (root / "decoded/metrics.csv").read_text().count("\n") == 41
    assert not (root / "unused-prefect-home").exists()  # Prefect never even set up its home


IMPORTS_OF = """
import json, sys
from vqtok.flows.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules,
                  "prefect": "prefect" in sys.modules, "pandas": "pandas" in sys.modules}))
"""


@pytest.mark.parametrize("command", ["stats", "info"])
def test_read_only_commands_import_neither_torch_nor_prefect(store, command):
    """What keeps ``stats`` and ``info`` at about a second: no torch (its import alone takes
    1.5-2 s here), no Prefect, no pandas; checked on the modules, not on a clock."""
    run = str(store["root"] / "run")
    args = ["stats", "--out", run] if command == "stats" else ["info", f"{run}/tokens"]
    done = subprocess.run([sys.executable, "-c", IMPORTS_OF, *args], cwd=store["outside"],
                          env=_env(store["root"]), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report == {"code": 0, "torch": False, "prefect": False, "pandas": False}


def _completed_runs(name: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))
    return sum(1 for run in runs if run.state and run.state.is_completed())


def test_with_a_server_every_command_is_a_recorded_flow_run(store):
    root = store["root"]
    tokens = str(root / "run" / "tokens")
    commands = {"stats": ("stats", "--tokens", tokens, "--out", str(root / "recorded")),
                "info": ("info", tokens),
                "decode": ("decode", "--tokens", tokens, "--checkpoint",
                           str(store["checkpoint"]), "--out", str(root / "recorded-decode"))}
    before = {name: _completed_runs(name) for name in commands}
    for args in commands.values():
        result = _run(store, *args, PREFECT_API_URL=store["api"])
        assert result.returncode == 0, result.stderr[-2000:]
    after = {name: _completed_runs(name) for name in commands}
    assert {name: after[name] - before[name] for name in commands} == {
        "stats": 1, "info": 1, "decode": 1}

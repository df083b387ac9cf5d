"""Start DDP training on this machine: torchrun with N processes running ``tokenizer.train_main``.

Gloo on CPU, NCCL with one GPU per process on CUDA (``distributed.init_from_env``). For several
machines, run torchrun yourself on each (README, "Training on several processes").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .training import TrainingError

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_ERROR_LINE = re.compile(r"^(?:[\w.]+)?(?:Error|Exception): .+")


def _wants_cuda(device: str) -> bool:
    return torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))


def torchrun_command(config_path: Path, out_dir: Path, nproc: int, result: Path,
                     progress: bool) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "vqtok.tokenizer.train_main",
            "--config", str(config_path), "--out", str(out_dir), "--result", str(result),
            *([] if progress else ["--quiet"])]


def _failure_line(stderr: str) -> str:
    """The workers' own error line, not torchrun's ChildFailedError banner."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.match(line) and "ChildFailedError" not in line:
            return line
    return lines[-1] if lines else "no output"


def train_distributed(config: Config, out_dir: str | Path, nproc: int,
                      progress: bool = True) -> dict[str, Any]:
    """Train with ``nproc`` processes; returns rank 0's summary (``train_main --result``).

    The summary holds the ``TrainResult`` fields plus ``world_size`` and
    ``rank_weights_sha256`` (every rank's final weights hash). Worker output streams to this
    process's stdout; their stderr is kept and, on failure, saved next to the checkpoint.
    """
    if nproc < 1:
        raise TrainingError(f"--nproc must be at least 1, got {nproc}")
    if _wants_cuda(config.train.device) and nproc > torch.cuda.device_count():
        raise TrainingError(
            f"--nproc {nproc} needs one GPU per process but {torch.cuda.device_count()} are "
            "visible; use a smaller --nproc or --device cpu"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vqtok-ddp-") as tmp:
        config_path, result = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config_path.write_text(json.dumps(config.model_dump()))
        env = os.environ.copy()
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
        done = subprocess.run(torchrun_command(config_path, out_dir, nproc, result, progress),
                              env=env, stderr=subprocess.PIPE, text=True)
        if result.is_file():
            payload = json.loads(result.read_text())
            if "error" in payload:
                raise TrainingError(payload["error"])
            if done.returncode == 0:
                return payload
        log = out_dir / "torchrun-stderr.log"
        log.write_text(done.stderr or "")
        raise TrainingError(
            f"training with {nproc} processes failed (exit {done.returncode}): "
            f"{_failure_line(done.stderr or '')}; worker output in {log}"
        )

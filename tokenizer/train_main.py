"""What each torchrun process runs: join the process group, train, report.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        -m tokenizer.train_main --config run-config.json --out runs/ddp

``--config`` is a JSON (or YAML) file holding a full config. Rank 0 writes checkpoints and,
with ``--result PATH``, a JSON summary: the training result plus every rank's weights hash
(equal when the ranks agree), or ``{"error": ...}`` when training stopped with a known error.
No Prefect here: ``tokenizer.launch.train_distributed`` (used by ``tokenize-dataset train
--nproc N``) starts torchrun and reads that file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vqtok.files.atomic import write_json_atomic

from . import distributed as dist
from .config import Config, load_config, parse_config
from .errors import CheckpointError, ConfigError, DataError, TrainingError
from .training import train

KNOWN_ERRORS = (TrainingError, DataError, CheckpointError, ConfigError)


def _write(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        write_json_atomic(Path(path), payload)


def read_config(path: str) -> Config:
    """JSON as written by the launcher (exact floats), or a YAML config file."""
    if path.endswith(".json"):
        return parse_config(json.loads(Path(path).read_text()), source=path)
    return load_config(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="full config as JSON or YAML")
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", help="rank 0 writes a JSON summary here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    config = read_config(args.config)
    launch = dist.init_from_env(config.train.device)
    main_rank = launch.rank == 0
    try:
        result = train(config, args.out, progress=not args.quiet and main_rank,
                       log=lambda line: print(line, flush=True))
        # Rank 0 reports the hash of what it saved, the others that of their own weights.
        hashes = dist.all_gather_objects(result.weights_sha256)
        if main_rank:
            payload = asdict(result)
            payload.update(world_size=launch.world_size, rank_weights_sha256=hashes,
                           device=str(launch.device))
            _write(args.result, payload)
        return 0
    except KNOWN_ERRORS as exc:
        if main_rank:
            _write(args.result, {"error": str(exc).splitlines()[0]})
            print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
        return 1
    finally:
        dist.shutdown()


def exit_now(code: int) -> None:
    """Leave without the interpreter's finalization: there a gloo rank's C++ threads were
    destroyed while still joinable ("terminate called without an active exception", SIGABRT
    after training had finished and the process group was destroyed) in about one run in ten
    on a busy 2-core machine. Everything this process writes is written and flushed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())

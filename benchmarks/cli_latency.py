"""CLI latency: wall time of the one-shot commands (`stats`, `info`, `decode`) on a run
folder, next to the bare work each does, called in-process.

    python benchmarks/cli_latency.py --run runs/demo --out runs/cli-latency

Each command runs `--repeats` times (median reported) as users run it: the installed console
script in a subprocess, without a Prefect server configured, so the difference to the bare
work is Python start-up and imports. Last line: one JSON object, also written to
OUT/cli_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 2.5


def wall(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds


def bare(name: str, run: Path, out: Path) -> float:
    """The command's work, in this (already warm) process."""
    from vqtok.flows.decoding import decode_tokens
    from vqtok.flows.summary import describe
    from vqtok.flows.usage_stats import usage_stats

    work = {"stats": lambda: usage_stats(str(run / "tokens"), str(out / "bare-stats")),
            "info": lambda: describe(run / "tokens"),
            "decode": lambda: decode_tokens(str(run / "tokens"), str(run / "checkpoint"),
                                            str(out / "bare-decode"), device="cpu")}[name]
    work()  # caches and lazy imports warm, as a long-lived process would have them
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="run folder with checkpoint/ and "
                        "tokens/ (`make demo` writes runs/demo)")
    parser.add_argument("--out", default="runs/cli-latency")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-bytecode", action="store_true", help="keep PYTHONDONTWRITEBYTECODE "
                        "from the environment (every import compiles its source again)")
    args = parser.parse_args()
    run, out = Path(args.run).resolve(), Path(args.out).resolve()
    if not (run / "tokens").is_dir() or not (run / "checkpoint").is_dir():
        raise SystemExit(f"{run} has no tokens/ and checkpoint/; run `make demo` first")
    out.mkdir(parents=True, exist_ok=True)
    script = str(Path(sys.executable).with_name("tokenize-dataset"))
    # No Prefect server (nor a profile naming one); and Python's default of caching compiled
    # modules, which some machines (this one) switch off with PYTHONDONTWRITEBYTECODE.
    dropped = ("PREFECT_API_URL",) + (() if args.no_bytecode else ("PYTHONDONTWRITEBYTECODE",))
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PREFECT_HOME"] = tempfile.mkdtemp(prefix="vqtok-latency-")
    commands = {
        "stats": [script, "stats", "--tokens", str(run / "tokens"), "--out", str(out / "stats")],
        "info": [script, "info", str(run / "tokens")],
        "decode": [script, "decode", "--tokens", str(run / "tokens"), "--checkpoint",
                   str(run / "checkpoint"), "--out", str(out / "decode"), "--device", "cpu"],
    }
    rows = []
    for name, command in commands.items():
        wall(command, env)  # warm-up, not counted: the page cache, compiled modules
        times = [wall(command, env) for _ in range(args.repeats)]
        rows.append({"command": name, "wall_seconds": [round(t, 3) for t in times],
                     "median_seconds": round(statistics.median(times), 3),
                     "bare_work_seconds": round(bare(name, run, out), 3)})
    print(f"{'command':<10}{'median wall s':>15}{'bare work s':>13}{'start-up s':>12}")
    for row in rows:
        print(f"{row['command']:<10}{row['median_seconds']:>15.2f}"
              f"{row['bare_work_seconds']:>13.2f}"
              f"{row['median_seconds'] - row['bare_work_seconds']:>12.2f}")
    result = {"run": str(run), "repeats": args.repeats, "target_seconds": TARGET_S,
              "bytecode_cached": "PYTHONDONTWRITEBYTECODE" not in env,
              "rows": rows, "met": all(r["median_seconds"] <= TARGET_S for r in rows)}
    (out / "cli_latency.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

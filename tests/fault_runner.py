"""Run the real ``tokenize-dataset`` CLI in child processes that tests can kill -9.

Starting Python and importing torch, Prefect and pyarrow takes 5-15 s on a small machine, and a
fault test needs many runs. So one helper process (``python -m tests.fault_runner``) imports
everything once and then forks a child per run: each child is a separate process running
``flows.cli.main(argv)`` exactly as ``python -m flows.cli`` would, and dies for real when sent
SIGKILL. Only the helper signals and reaps its children (a pid is never reused before the
helper reaps it), commanded by JSON lines on its stdin:

    {"run": [argv...], "stdout": path, "stderr": path, "env": {...}}  -> {"pid": N}
    {"signal": 9}                                        -> {"sent": true|false}
    {"poll": true}                                       -> {"returncode": int|null}
    {"wait": true}                                       -> {"returncode": int}
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _child(argv: list[str], stdout: str, stderr: str, env: dict[str, str]) -> None:
    """In the forked child: point fds 0-2 at files, set ``env``, run the CLI, exit with its
    code."""
    os.environ.update(env)
    # Ctrl-C as in a terminal, whatever this test run inherited: a background job of a
    # non-interactive shell (`nohup make test &`) starts with SIGINT ignored, and Python then
    # never raises KeyboardInterrupt, so the Ctrl-C case would wait out its timeout.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    code = 0
    try:
        from vqtok.flows.cli import main

        main(argv, prog_name="tokenize-dataset")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report like Python would, then exit non-zero
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    """The helper's loop; heavy modules are imported before the first fork, never after."""
    import vqtok.flows.cli  # noqa: F401
    import vqtok.flows.encode_flow  # noqa: F401
    import vqtok.flows.pipeline  # noqa: F401
    import vqtok.flows.train_flow  # noqa: F401

    reply = sys.stdout
    child: int | None = None
    reaped: int | None = None
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "run" in request:
            child, reaped = os.fork(), None
            if child == 0:
                _child(request["run"], request["stdout"], request["stderr"],
                       request.get("env", {}))
            answer: dict[str, Any] = {"pid": child}
        elif "signal" in request:
            alive = child is not None and reaped is None
            if alive:
                os.kill(child, int(request["signal"]))  # a zombie at worst: pid not reused
            answer = {"sent": alive}
        elif "poll" in request or "wait" in request:
            if child is not None and reaped is None:
                pid, status = os.waitpid(child, 0 if "wait" in request else os.WNOHANG)
                if pid:
                    reaped = os.waitstatus_to_exitcode(status)
            answer = {"returncode": reaped}
        else:
            answer = {"error": f"unknown request {request}"}
        print(json.dumps(answer), file=reply, flush=True)


class FaultRunner:
    """The test side: start the helper once, then run/signal/poll/wait CLI children."""

    def __init__(self, env: dict[str, str], timeout: float = 300.0) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fault_runner"], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        self._ready = False

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        if not self._ready:
            assert json.loads(self.proc.stdout.readline()) == {"ready": True}
            self._ready = True
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("fault runner helper died")
        return json.loads(line)

    def start(self, argv: list[str], logs: Path, env: dict[str, str] | None = None) -> int:
        return self._ask({"run": argv, "stdout": str(logs.with_suffix(".out")),
                          "stderr": str(logs.with_suffix(".err")), "env": env or {}})["pid"]

    def signal(self, signum: int) -> bool:
        return self._ask({"signal": signum})["sent"]

    def poll(self) -> int | None:
        return self._ask({"poll": True})["returncode"]

    def wait(self, timeout: float | None = None) -> int:
        """The child's exit code (-N: killed by signal N); kills it if it overstays."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                self.signal(signal.SIGKILL)
                self._ask({"wait": True})
                raise TimeoutError(f"CLI child still running after {timeout or self.timeout} s")
            time.sleep(0.05)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve()

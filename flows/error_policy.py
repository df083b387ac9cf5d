"""How a CLI command ends: the one home of the error policy.

- Every known failure is one ``error:`` line on stderr and an exit code: 2 for input the user
  must change (config, options), 1 for failures (data, checkpoint, storage, disk), 130 for
  Ctrl-C. Unknown exceptions keep their traceback (they are bugs); ``--debug`` shows
  tracebacks for all.
- While Prefect runs a command, its console shows progress lines only: no ERROR record, no
  traceback, nothing that restates or follows our error line. Everything (Prefect's lines,
  our error and its traceback) goes to ``OUT/logs/COMMAND-YYYYmmdd-HHMMSS-PID.log``, made on
  the first line logged, so a run refused before Prefect starts leaves no file; the Prefect
  API keeps flow and task run logs too. ``--verbose`` shows Prefect's whole console output.
- Retries of transient I/O errors are the flows' business (``flows.retry``).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

USAGE_EXIT = 2
FAILURE_EXIT = 1
INTERRUPTED_EXIT = 130  # the shell's code for "stopped by Ctrl-C"
LOG_FOLDER = "logs"  # under the command's --out

# A temporary Prefect server on a busy 2-core machine can take longer than Prefect's default
# 20 s to start; and nothing here should phone home.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _known_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(usage errors -> exit 2, failures -> exit 1); none of these modules imports torch."""
    from vqtok.flows.errors import PipelineError
    from vqtok.storage.errors import TokenStoreError
    from vqtok.tokenizer.errors import CheckpointError, ConfigError, DataError, TrainingError

    failures = (DataError, CheckpointError, TrainingError, TokenStoreError, PipelineError, OSError)
    return (ConfigError,), failures


# Console lines of Prefect's that only restate a failure the CLI reports itself in its one
# `error:` line, or that follow it (the server stopping, events still being flushed).
_RESTATING = ("Finished in state Failed", "Finished in state Crashed",
              "Stopping temporary server", "Still processing items")


class _OneLineRecords(logging.Filter):
    """Keeps Prefect's console to progress lines: no tracebacks, no ERROR records, nothing
    that restates the error the CLI prints once itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.name.startswith("prefect"):
            return False
        message = record.getMessage() if record.args else str(record.msg)
        if any(marker in message for marker in _RESTATING):
            return False
        record.exc_info, record.exc_text = None, None
        if isinstance(record.msg, str) and "Traceback (most recent call last)" in record.msg:
            record.msg = record.msg.split("\n", 1)[0]
        return True


class _FullLog(logging.FileHandler):
    """Every log line of the run, the filtered ones included; the file and its folder are
    made on the first line, so a command that logs nothing leaves nothing behind."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, delay=True, encoding="utf-8")
        self.setFormatter(logging.Formatter(
            "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))

    def _open(self):  # noqa: ANN202 - logging's own signature
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def _route_prefect_console(verbose: bool, log_file: Path | None) -> _FullLog | None:
    """Filter Prefect's console handlers (unless ``verbose``) and add the full log file."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect attaches its console handler lazily; make it exist now
    if not verbose:
        for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
            for handler in logging.getLogger(name).handlers:
                handler.addFilter(_OneLineRecords())
    if log_file is None:
        return None
    full = _FullLog(log_file)
    logging.getLogger().addHandler(full)  # Prefect's loggers propagate to the root
    return full


def log_file_for(command: str, out: str | None) -> Path | None:
    """Where a command's full log goes: ``OUT/logs/COMMAND-TIMESTAMP-PID.log`` (None: no
    --out)."""
    if not out:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(out) / LOG_FOLDER / f"{command}-{stamp}-{os.getpid()}.log"  # runs share seconds


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """One line on stderr and a non-zero exit instead of a traceback (unless --debug)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from vqtok.flows.recording import uses_prefect

        context = click.get_current_context()
        root = context.find_root().params
        debug, verbose = root.get("debug", False), root.get("verbose", False)
        usage, failures = _known_errors()
        full_log = None
        name = " ".join(context.command_path.split()[1:]) or "run"
        if uses_prefect(context.info_name or ""):
            full_log = _route_prefect_console(debug or verbose,
                                              log_file_for(name.replace(" ", "-"),
                                                           kwargs.get("out")))
        try:
            return command(*args, **kwargs)
        except BaseException as exc:
            interrupted = _caused_by_interrupt(exc)
            if debug or not (interrupted or isinstance(exc, (*usage, *failures))):
                raise
            if interrupted:
                _end(full_log, "interrupted", exc)
                click.echo("error: interrupted; re-run the same command to continue (finished "
                           "shards and checkpoints are kept)", err=True)
                sys.exit(INTERRUPTED_EXIT)
            message = describe(exc)
            _end(full_log, message, exc)
            click.echo(f"error: {message}", err=True)
            sys.exit(USAGE_EXIT if isinstance(exc, usage) else FAILURE_EXIT)
        finally:
            if full_log is not None:
                logging.getLogger().removeHandler(full_log)
                full_log.close()

    return wrapper


def describe(exc: BaseException) -> str:
    """The error line's text: the first line of the message (OS errors worded with their
    path and what to do)."""
    if isinstance(exc, OSError):
        from vqtok.flows.errors import describe_os_error

        return describe_os_error(exc)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _end(full_log: _FullLog | None, message: str, exc: BaseException) -> None:
    """The error line and its traceback, in the full log of a run that logged anything."""
    if full_log is not None and full_log.stream is not None:
        full_log.emit(logging.LogRecord("vqtok.cli", logging.ERROR, __file__, 0,
                                        f"error: {message}", None,
                                        (type(exc), exc, exc.__traceback__)))


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, also when Prefect's engine hides it: a KeyboardInterrupt that lands while a task
    run is being created makes Prefect raise ``ValueError('Task run is not set')`` from it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class OneLineErrors(click.Group):
    """Click's own usage errors (bad option, missing path) as one ``error:`` line too."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            hint = " (see --help)" if isinstance(exc, click.UsageError) else ""
            click.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(INTERRUPTED_EXIT)
        finally:
            if not args or args[0] is None:  # the process's own command line: it ends now
                _skip_collecting_at_exit()
        sys.exit(code if isinstance(code, int) else 0)


def _skip_collecting_at_exit() -> None:
    """The process is about to end: the garbage collector's passes over everything it built
    would only delay that (0.4 s of a one-shot command once torch is loaded). Objects are
    still finalized and files closed as usual; callers in a long-lived process (tests, a
    notebook) pass their arguments and never get here."""
    import gc

    gc.freeze()

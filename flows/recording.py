"""Which commands Prefect records, and where: the one home of that rule.

- ``train``, ``encode``, ``run``, ``serve`` and ``prior train|sample`` always run as Prefect
  flows: with ``PREFECT_API_URL`` set (in the environment or the active Prefect profile) they
  are recorded on that server, otherwise on a temporary server that lives as long as the
  command (Prefect's default).
- ``stats``, ``decode`` and ``info`` are one-shot reads: recorded as flows only when a Prefect
  API is configured. Without one they run as plain function calls, with the same results and
  files, and never start (or even import) Prefect, so they answer in about a second instead
  of waiting for a temporary server to start and stop.
"""

from __future__ import annotations

import os
from pathlib import Path

import tomllib

ONE_SHOT_COMMANDS = frozenset({"stats", "decode", "info"})


def _active_profile_api_url() -> str | None:
    """PREFECT_API_URL of the active profile in PREFECT_HOME/profiles.toml, read without
    importing Prefect (which costs about a second)."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None
    name = os.environ.get("PREFECT_PROFILE") or profiles.get("active")
    profile = profiles.get("profiles", {}).get(name or "", {})
    url = profile.get("PREFECT_API_URL") if isinstance(profile, dict) else None
    return str(url) if url else None


def api_configured() -> bool:
    """Whether a Prefect server is configured (the environment wins over the profile)."""
    if "PREFECT_API_URL" in os.environ:
        return bool(os.environ["PREFECT_API_URL"].strip())
    return _active_profile_api_url() is not None


def uses_prefect(command: str) -> bool:
    """Whether running ``command`` goes through Prefect (and so records a flow run)."""
    return command not in ONE_SHOT_COMMANDS or api_configured()

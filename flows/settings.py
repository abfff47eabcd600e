"""Where Prefect keeps its state for forge, as environment variables set before Prefect loads.

Prefect reads its settings when it is imported, so the commands (`forge server`, `forge serve`,
`forge run`) call `prefect_environment` first and import the flows after. Nothing here imports
Prefect.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200
DEFAULT_HOME = Path("runs") / "prefect"


def api_url(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/api"


def prefect_environment(home: Path, api: str | None = None) -> dict[str, str]:
    """The variables forge sets: PREFECT_HOME in the work folder, no telemetry, the API to use.

    `api` None leaves PREFECT_API_URL as the caller's environment has it (unset: Prefect runs
    an embedded, temporary server whose database is `home`/prefect.db, the same file that
    `forge server` serves, so embedded runs show up in the UI later).
    """
    env = {
        "PREFECT_HOME": str(Path(home).resolve()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # its telemetry locked SQLite here
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        # the stages' own log lines ("3 of 24 units already committed...") in the run logs
        "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline,model",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # outside a run: terminal only
    }
    if api:
        env["PREFECT_API_URL"] = api
    return env


def apply_environment(env: dict[str, str]) -> None:
    """Set `env` in this process; refuses once Prefect is loaded, when it would be ignored."""
    import sys

    if "prefect" in sys.modules:
        raise RuntimeError("Prefect was imported before its settings were applied (a bug)")
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)


def server_is_up(api: str, timeout_s: float = 1.0) -> bool:
    """True when a Prefect API answers its health check at `api`."""
    try:
        with urllib.request.urlopen(f"{api.rstrip('/')}/health", timeout=timeout_s) as reply:
            return reply.status == 200
    except OSError:
        return False

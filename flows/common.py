"""What every forge flow shares: one config from a form or a file, stable artifact keys, and the
test-only failure switch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from configs.run import data_config, load_run_config
from pipeline.config import ConfigError, ForgeConfig
from pipeline.download import with_source_presets

FAIL_ONCE_MARKER = "FORGE_FAIL_ONCE_MARKER"
_armed = False


def resolve_config(config: ForgeConfig | None, config_file: str | None) -> ForgeConfig:
    """The data stages' config, from the form (`config`) or a YAML run config file (which may
    hold training sections too), with the work folder made absolute.

    Relative paths in either are relative to the folder the flow runs in (where `forge serve`
    or `forge run` was started).
    """
    if (config is None) == (config_file is None):
        raise ConfigError("give the flow either `config` (the form) or `config_file` (a YAML "
                          "run config path), not both and not neither")
    cfg = data_config(config if config is not None else load_run_config(config_file))
    cfg, preset_lines = with_source_presets(cfg)  # the same filter rules as `forge prepare`
    for line in preset_lines:
        logging.getLogger("forge").info(line)
    return cfg.model_copy(update={"workdir": str(Path(cfg.workdir).resolve())})


def artifact_prefix(workdir: str | Path) -> str:
    """A key prefix stable per work folder (its name plus a hash of its path): the Artifacts
    page then shows the history of one dataset under one key per table."""
    path = Path(workdir).resolve()
    name = re.sub(r"[^a-z0-9]+", "-", path.name.lower()).strip("-")[:40] or "work"
    return f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def start_flow_process() -> None:
    """What every flow does first: library log lines at INFO (Prefect sends the `pipeline` and
    `model` loggers to the run's logs, see flows/settings.py, but its root level is WARNING),
    and the test-only failure switch."""
    for name in ("pipeline", "model"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    arm_test_failure_once()


def arm_test_failure_once() -> None:
    """Let the crash injection FORGE_FAIL_AFTER fire in the first flow run only.

    For tests of a UI Retry: `forge serve` runs with FORGE_FAIL_AFTER=<stage>:<N> and
    FORGE_FAIL_ONCE_MARKER=<path>. The first flow run creates the marker and keeps the
    injection (pipeline.contract raises after N committed units); every later run, the retry
    included, finds the marker and drops FORGE_FAIL_AFTER from its own environment. Without
    the marker variable this does nothing. (A served flow run is a process of its own.)
    """
    global _armed
    marker = os.environ.get(FAIL_ONCE_MARKER)
    if _armed or not marker or "FORGE_FAIL_AFTER" not in os.environ:
        return
    _armed = True  # decided once per process: a subflow must not disarm its parent's run
    try:
        with open(marker, "x"):
            pass
    except FileExistsError:
        os.environ.pop("FORGE_FAIL_AFTER")

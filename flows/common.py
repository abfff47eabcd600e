"""What every forge flow shares: one config from a form or a file, stable artifact keys, and the
library's log level."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from configs.run import data_config, load_run_config
from pipeline.config import ConfigError, ForgeConfig
from pipeline.download import with_source_presets


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
    `model` loggers to the run's logs, see flows/settings.py, but its root level is WARNING)."""
    for name in ("pipeline", "model"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)

"""Which function runs each data stage, and which stages `prepare` runs: one registry for the
command line and the flows. Stage modules are imported only when used (fast start-up)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from pipeline.config import ForgeConfig
from pipeline.documents import enabled_stages

STAGE_FUNCTIONS = {
    "download": "pipeline.download:run_download",
    "extract": "pipeline.extract:run_extract",
    "filter": "pipeline.quality:run_filter",
    "dedupe": "pipeline.dedupe:run_dedupe",
    "decontaminate": "pipeline.decontaminate:run_decontaminate",
    "tokenize": "pipeline.tokenize:run_tokenize",
}


def stage_function(name: str) -> Callable[..., dict]:
    module, function = STAGE_FUNCTIONS[name].split(":")
    return getattr(importlib.import_module(module), function)


def prepare_stages(cfg: ForgeConfig) -> list[str]:
    """download, the enabled document stages, tokenize: the order `forge prepare` runs."""
    return ["download", *enabled_stages(cfg), "tokenize"]

"""The data stages, in pipeline order: the one list the command line, the flows, `forge stats`
and the document helpers read.

Each stage names its functions as "module:function" and they are imported when used: the
command starts fast, and the stage modules (which ask this registry for their input) are
never imported by it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ForgeConfig
from pipeline.contract import StageError
from pipeline.files import MANIFEST, WorkFolder, read_json


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: str  # "module:function": (config, progress=, overwrite=) -> the stage's manifest
    fingerprint: str  # "module:function": (config) -> the config hash the stage runs under
    description: str  # one line: the command's help and the flow's description
    optional: bool = False  # runs only when `data.<name>.enabled` is true
    check: str | None = None  # "module:function": (config) -> None, raises on bad input


STAGES = (
    StageSpec("download", "pipeline.download:run_download",
              "pipeline.download:download_fingerprint",
              "Fetch or copy every source into <workdir>/download."),
    StageSpec("extract", "pipeline.extract:run_extract", "pipeline.extract:extract_fingerprint",
              "Downloaded files to documents: HTML and WARC to text, book boilerplate cut."),
    StageSpec("filter", "pipeline.filter:run_filter", "pipeline.filter:filter_fingerprint",
              "Quality rules (Gopher, C4, FineWeb), language identification, PII masking.",
              optional=True, check="pipeline.filter:check_filter"),
    StageSpec("dedupe", "pipeline.dedupe:run_dedupe", "pipeline.dedupe:dedupe_fingerprint",
              "Exact and MinHash near-duplicate removal across all sources.", optional=True),
    StageSpec("decontaminate", "pipeline.decontaminate:run_decontaminate",
              "pipeline.decontaminate:decontaminate_fingerprint",
              "Drop documents that share long n-grams with the evaluation sets.", optional=True),
    StageSpec("tokenize", "pipeline.tokenize:run_tokenize",
              "pipeline.tokenize:tokenize_fingerprint",
              "Documents to GPT-2 token shards (a zarr group), with shard statistics.",
              check="pipeline.tokenize:check_tokenize"),
)
STAGE_NAMES = tuple(spec.name for spec in STAGES)
SPECS = {spec.name: spec for spec in STAGES}


def _resolve(reference: str) -> Callable:
    module, function = reference.split(":")
    return getattr(importlib.import_module(module), function)


def stage_function(name: str) -> Callable[..., dict]:
    """The function that runs stage `name`: (config, progress=None, overwrite=False) -> manifest."""
    return _resolve(SPECS[name].run)


def stage_fingerprint(cfg: ForgeConfig, name: str) -> str:
    """The config hash stage `name` would run under now; StageError while its input is missing."""
    return _resolve(SPECS[name].fingerprint)(cfg)


def check_stages(cfg: ForgeConfig, names: list[str] | tuple[str, ...]) -> None:
    """Before any stage runs: each stage's check of the inputs the config names (model
    files, source names), so that a bad one fails at once, not after the stages before it."""
    for name in names:
        if SPECS[name].check:
            _resolve(SPECS[name].check)(cfg)


def is_enabled(cfg: ForgeConfig, name: str) -> bool:
    return not SPECS[name].optional or getattr(cfg.data, name).enabled


def prepare_stages(cfg: ForgeConfig) -> list[str]:
    """The stages `forge prepare` runs, in order: every one the config enables."""
    return [name for name in STAGE_NAMES if is_enabled(cfg, name)]


def input_stage(cfg: ForgeConfig, name: str) -> Path:
    """The folder of the finished, enabled stage that feeds `name`."""
    before = [s for s in STAGE_NAMES[: STAGE_NAMES.index(name)] if is_enabled(cfg, s)]
    if not before:
        raise StageError(f"{name} has no stage before it")
    work = WorkFolder(cfg.workdir)
    if not work.manifest(before[-1]).exists():
        raise StageError(f"{name} needs the {before[-1]} stage's output "
                         f"({work.stage(before[-1])} has no manifest); run "
                         f"`forge {before[-1]}` first, or `forge prepare`")
    return work.stage(before[-1])


def input_manifest(cfg: ForgeConfig, name: str) -> tuple[Path, dict]:
    """The folder and manifest of the finished stage that feeds `name`."""
    folder = input_stage(cfg, name)
    return folder, read_json(folder / MANIFEST)

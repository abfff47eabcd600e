"""The data stages as Prefect flows: one flow per stage and `prepare-data` for all of them.

Each stage runs as one task that calls the stage's library function and returns a summary of
its manifest (counts and fingerprints, never data). The task's result is cached under a key
made of the work folder, the stage's config section and the fingerprint of the stage's input
(the upstream manifest on disk), and persisted in `<workdir>/.prefect-cache`. So a re-run with
the same config, or a UI Retry of a failed run, finds the finished stages cached and skips
them; the stage that failed resumes through the stage contract (committed units are kept).
A cached result is used only while the stage's manifest on disk is still the one it
describes; otherwise the stage runs again (and decides, as on the command line, whether
there is anything to do).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext

from flows.artifacts import progress_artifact, publish_dataset, publish_stage_table
from flows.common import resolve_config, start_flow_process
from pipeline.config import ForgeConfig
from pipeline.documents import input_stage
from pipeline.stage import StageError
from pipeline.stages import prepare_stages, stage_function

CACHE_FOLDER = ".prefect-cache"


def summarize(manifest: dict) -> dict:
    """The manifest without its long lists (files, parts, drop examples): what Prefect keeps."""
    return {k: v for k, v in manifest.items() if not isinstance(v, list) and k != "drop_examples"}


# ---------------------------------------------------------------- the cache key


def upstream_fingerprint(cfg: ForgeConfig, name: str) -> str | None:
    """The output fingerprint of the finished stage that feeds `name` ("" for download)."""
    if name == "download":
        return ""
    try:
        folder = Path(cfg.workdir) / "download" if name == "extract" else input_stage(cfg, name)
        return json.loads((folder / "manifest.json").read_text())["output_fingerprint"]
    except (StageError, OSError, KeyError, ValueError):
        return None  # not finished: nothing to key on, the stage itself says what is missing


def stage_inputs(cfg: ForgeConfig, name: str) -> Any:
    """The part of the config that decides the stage's output (as JSON-ready data)."""
    data = cfg.data
    if name == "download":
        return {"download": data.download.model_dump(mode="json"),
                "sources": [s.model_dump(mode="json") for s in data.sources]}
    section = getattr(data, name, None)
    if section is None:  # a stage whose config section this version does not know
        return data.model_dump(mode="json")
    inputs = section.model_dump(mode="json")
    if name == "decontaminate":  # the evaluation files are inputs too: their size and mtime
        inputs["eval_files"] = [_stamp(s.path) for s in data.decontaminate.eval_sets]
    return inputs


def _stamp(path: str) -> list:
    try:
        stat = os.stat(path)
        return [path, stat.st_size, stat.st_mtime_ns]
    except OSError:
        return [path, None, None]


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """work folder + stage + its config section + its input's fingerprint; None: no caching."""
    name, cfg = parameters["name"], parameters["config"]
    upstream = upstream_fingerprint(cfg, name)
    if upstream is None:
        return None
    payload = json.dumps([str(Path(cfg.workdir).resolve()), name, stage_inputs(cfg, name),
                          upstream], sort_keys=True)
    return f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:40]}"


# ---------------------------------------------------------------- the stage task


@task(name="stage", task_run_name="{name}", persist_result=True, result_serializer="json",
      cache_policy=CacheKeyFnPolicy(cache_key_fn=stage_cache_key))
def run_stage(name: str, config: ForgeConfig, overwrite: bool = False) -> dict:
    """Run one data stage (resuming its committed units); return its manifest's summary."""
    with progress_artifact(name) as progress:
        manifest = stage_function(name)(config, progress=progress, overwrite=overwrite)
    return summarize(manifest)


def matches_disk(cfg: ForgeConfig, name: str, summary: dict) -> bool:
    """True while `<workdir>/<name>/manifest.json` is the manifest `summary` was made from."""
    try:
        manifest = json.loads((Path(cfg.workdir) / name / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return all(manifest.get(k) == summary.get(k) for k in ("config_hash", "output_fingerprint"))


def stage(name: str, cfg: ForgeConfig, overwrite: bool = False) -> dict:
    """Run a stage task (or take its cached result), then publish its artifacts."""
    runner = run_stage.with_options(result_storage=Path(cfg.workdir) / CACHE_FOLDER,
                                    refresh_cache=overwrite)
    state = runner(name, cfg, overwrite, return_state=True)
    summary = state.result()
    cached = state.name == "Cached"
    if cached and not matches_disk(cfg, name, summary):
        get_run_logger().warning("the cached %s result no longer matches %s; running the stage "
                                 "again", name, Path(cfg.workdir) / name)
        summary = runner.with_options(refresh_cache=True)(name, cfg, overwrite)
        cached = False
    publish_stage_table(name, summary, cfg.workdir, cached)
    if name == "tokenize":
        publish_dataset(cfg.workdir)
    return summary


# ---------------------------------------------------------------- flows

# Every flow takes the same parameters; their descriptions (the Args sections) show in the UI.


def _one_stage(name: str, config: ForgeConfig | None, config_file: str | None,
               overwrite: bool) -> dict:
    start_flow_process()
    return stage(name, resolve_config(config, config_file), overwrite)


@flow(name="download")
def download_flow(config: ForgeConfig | None = None, config_file: str | None = None,
                  overwrite: bool = False) -> dict:
    """Fetch or copy every source into <workdir>/download.

    Args:
        config: The run config, as a form; leave it empty to use `config_file`.
        config_file: A YAML run config path (relative to where the flow runs), instead of
            `config`.
        overwrite: Replace this stage's output made with another config.
    """
    return _one_stage("download", config, config_file, overwrite)


@flow(name="extract")
def extract_flow(config: ForgeConfig | None = None, config_file: str | None = None,
                 overwrite: bool = False) -> dict:
    """Downloaded files to documents: HTML and WARC to text, book boilerplate cut.

    Args:
        config: The run config, as a form; leave it empty to use `config_file`.
        config_file: A YAML run config path (relative to where the flow runs), instead of
            `config`.
        overwrite: Replace this stage's output made with another config.
    """
    return _one_stage("extract", config, config_file, overwrite)


@flow(name="filter")
def filter_flow(config: ForgeConfig | None = None, config_file: str | None = None,
                overwrite: bool = False) -> dict:
    """Quality rules (Gopher, C4, FineWeb), language identification, PII masking.

    Args:
        config: The run config, as a form; leave it empty to use `config_file`.
        config_file: A YAML run config path (relative to where the flow runs), instead of
            `config`.
        overwrite: Replace this stage's output made with another config.
    """
    return _one_stage("filter", config, config_file, overwrite)


@flow(name="dedupe")
def dedupe_flow(config: ForgeConfig | None = None, config_file: str | None = None,
                overwrite: bool = False) -> dict:
    """Exact and MinHash near-duplicate removal across all sources.

    Args:
        config: The run config, as a form; leave it empty to use `config_file`.
        config_file: A YAML run config path (relative to where the flow runs), instead of
            `config`.
        overwrite: Replace this stage's output made with another config.
    """
    return _one_stage("dedupe", config, config_file, overwrite)


@flow(name="decontaminate")
def decontaminate_flow(config: ForgeConfig | None = None, config_file: str | None = None,
                       overwrite: bool = False) -> dict:
    """Drop documents that share long n-grams with the evaluation sets.

    Args:
        config: The run config, as a form; leave it empty to use `config_file`.
        config_file: A YAML run config path (relative to where the flow runs), instead of
            `config`.
        overwrite: Replace this stage's output made with another config.
    """
    return _one_stage("decontaminate", config, config_file, overwrite)


@flow(name="tokenize")
def tokenize_flow(config: ForgeConfig | None = None, config_file: str | None = None,
                  overwrite: bool = False) -> dict:
    """Documents to GPT-2 token shards (a zarr group), with shard statistics.

    Args:
        config: The run config, as a form; leave it empty to use `config_file`.
        config_file: A YAML run config path (relative to where the flow runs), instead of
            `config`.
        overwrite: Replace this stage's output made with another config.
    """
    return _one_stage("tokenize", config, config_file, overwrite)


@flow(name="prepare-data")
def prepare_data(config: ForgeConfig | None = None, config_file: str | None = None,
                 overwrite: bool = False) -> dict[str, dict]:
    """Every enabled data stage in order, as `forge prepare`: sources to token shards.

    Finished stages are skipped (cached), an interrupted one resumes.

    Args:
        config: The run config, as a form; leave it empty to use `config_file`.
        config_file: A YAML run config path (relative to where the flow runs), instead of
            `config`.
        overwrite: Replace stage output made with another config.
    """
    start_flow_process()
    cfg = resolve_config(config, config_file)
    return {name: stage(name, cfg, overwrite) for name in prepare_stages(cfg)}


DATA_FLOWS = (download_flow, extract_flow, filter_flow, dedupe_flow, decontaminate_flow,
              tokenize_flow, prepare_data)

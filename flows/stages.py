"""The data stages as Prefect flows: one flow per stage of the registry, and `prepare-data`.

Each stage runs as one task that calls the stage's library function and returns a summary of
its manifest (counts and fingerprints, never data). The task's result is cached under a key
made of the work folder and the stage's own fingerprint function (pipeline/registry.py): the
config hash the stage itself runs under, so the cache and `forge` always agree. Results are
persisted in the work folder, so a re-run with the same config, or a UI Retry of a failed run,
finds the finished stages cached and skips them; the stage that failed resumes through the
stage contract (committed units are kept). A cached result is used only while the stage's
manifest on disk is still the one it describes; otherwise the stage runs again (and decides,
as on the command line, whether there is anything to do).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import Flow, flow, get_run_logger, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext

from flows.artifacts import (
    progress_artifact,
    publish_dataset,
    publish_stage_table,
    summary_line,
)
from flows.common import resolve_config, start_flow_process
from pipeline.config import ForgeConfig
from pipeline.contract import StageError
from pipeline.files import WorkFolder, read_json
from pipeline.registry import STAGES, StageSpec, prepare_stages, stage_fingerprint, stage_function


def summarize(manifest: dict) -> dict:
    """The manifest without its long lists (files, parts, drop examples): what Prefect keeps."""
    return {k: v for k, v in manifest.items() if not isinstance(v, list) and k != "drop_examples"}


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """work folder + stage + the stage's fingerprint; None (no caching) while its input is
    missing: the stage itself then says what to run first."""
    name, cfg = parameters["name"], parameters["config"]
    try:
        fingerprint = stage_fingerprint(cfg, name)
    except StageError:
        return None
    payload = json.dumps([str(Path(cfg.workdir).resolve()), name, fingerprint])
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
        manifest = read_json(WorkFolder(cfg.workdir).manifest(name))
    except (OSError, ValueError):
        return False
    return all(manifest.get(k) == summary.get(k) for k in ("config_hash", "output_fingerprint"))


def stage(name: str, cfg: ForgeConfig, overwrite: bool = False) -> dict:
    """Run a stage task (or take its cached result), then publish its artifacts."""
    log = get_run_logger()
    log.info("%s: starting in %s", name, WorkFolder(cfg.workdir).stage(name))
    runner = run_stage.with_options(result_storage=WorkFolder(cfg.workdir).prefect_cache,
                                    refresh_cache=overwrite)
    state = runner(name, cfg, overwrite, return_state=True)
    summary = state.result()
    cached = state.name == "Cached"
    if cached and not matches_disk(cfg, name, summary):
        log.warning("the cached %s result no longer matches %s; running the stage "
                                 "again", name, WorkFolder(cfg.workdir).stage(name))
        summary = runner.with_options(refresh_cache=True)(name, cfg, overwrite)
        cached = False
    log.info(summary_line(name, summary, cfg.workdir, cached))
    publish_stage_table(name, summary, cfg.workdir, cached)
    if name == "tokenize":
        publish_dataset(cfg.workdir)
    return summary


# ---------------------------------------------------------------- flows

# Every flow takes the same parameters; their descriptions (the Args section) show in the UI.
FLOW_ARGS = """

    Args:
        config: The run config, as a form; leave it empty to use `config_file`.
        config_file: A YAML run config path (relative to where the flow runs), instead of
            `config`.
        overwrite: Replace this stage's output made with another config.
"""


def stage_flow(spec: StageSpec) -> Flow:
    """The flow that runs one stage, named and described as the registry says."""

    def run_one_stage(config: ForgeConfig | None = None, config_file: str | None = None,
                      overwrite: bool = False) -> dict:
        start_flow_process()
        return stage(spec.name, resolve_config(config, config_file), overwrite)

    # Prefect's runner loads a served flow by its module attribute: `<stage>_flow` below.
    run_one_stage.__name__ = run_one_stage.__qualname__ = f"{spec.name}_flow"
    run_one_stage.__doc__ = spec.description + FLOW_ARGS
    return flow(name=spec.name)(run_one_stage)


STAGE_FLOWS = {spec.name: stage_flow(spec) for spec in STAGES}
globals().update({f"{name}_flow": made for name, made in STAGE_FLOWS.items()})


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


DATA_FLOWS = (*STAGE_FLOWS.values(), prepare_data)

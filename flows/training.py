"""Pretraining as a flow, and `build-assistant`: the data stages, then pretraining, end to end.

The trainer runs as a child process (`forge pretrain`, under torchrun with the `launch`
parameter's processes per node): CUDA, DDP and their crashes stay out of the flow process, and
its output is streamed into the run's logs (flows/launcher.py). The trainer's own resume makes
a rerun continue from the newest checkpoint; a finished pretraining is cached like a data stage
(key: work folder, pretrain config, processes, dataset fingerprint).

Cancelling a run from the UI makes its runner SIGTERM the flow process, which Prefect raises as
TerminationSignal: the trainer is stopped at a checkpoint, its task ends Cancelled (not
Crashed), the report shows what was trained, then the signal goes on so the run ends Cancelled.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.exceptions import TerminationSignal
from prefect.states import Cancelled, State
from prefect.transactions import get_transaction
from pydantic import BaseModel, ConfigDict, Field

from configs.run import RunConfig, data_config, load_run_config
from flows.artifacts import (
    TrainingProgress,
    publish_finetune_report,
    publish_training_report,
    stopped_training_summary,
)
from flows.common import start_flow_process
from flows.launcher import run_command
from flows.stages import matches_disk, prepare_data, summarize
from pipeline.config import ConfigError
from pipeline.files import FINETUNE, PRETRAIN, WorkFolder, read_json


class LaunchConfig(BaseModel):
    """How the trainer process is started: a flow parameter, not part of the run config (the
    result does not depend on it)."""

    model_config = ConfigDict(extra="forbid")

    nproc_per_node: int = Field(
        default=1, ge=1, description="Training processes on this node (one per GPU); above 1 "
        "the trainer runs under torchrun (DDP).")
    torchrun_args: list[str] = Field(
        default_factory=list, description="torchrun's rendezvous arguments, e.g. --nnodes 2 "
        "--rdzv-backend c10d --rdzv-endpoint HOST:PORT for several nodes (default: "
        "--standalone).")
    stop_grace_s: float = Field(
        default=25.0, gt=0, description="Seconds the trainer gets to exit after SIGTERM "
        "(cancellation) before SIGKILL; under the Prefect runner's own 30 s.")


def resolve_run_config(config: RunConfig | None, config_file: str | None) -> RunConfig:
    """The whole run config, from the form or a YAML file, with the work folder absolute."""
    if (config is None) == (config_file is None):
        raise ConfigError("give the flow either `config` (the form) or `config_file` (a YAML "
                          "run config path), not both and not neither")
    cfg = config if config is not None else load_run_config(config_file)
    return cfg.model_copy(update={"workdir": str(Path(cfg.workdir).resolve())})


def run_trainer(command: list[str], stop_grace_s: float = 25.0,
                on_line: Callable[[str], None] | None = None) -> State | None:
    """Run the trainer to its end (None), or, when the flow is cancelled, stop it at a
    checkpoint and return the task's Cancelled state."""
    try:
        run_command(command, get_run_logger(), stop_grace_s=stop_grace_s, on_line=on_line)
    except TerminationSignal:
        if (transaction := get_transaction()) is not None:
            transaction.write_on_commit = False  # an unfinished run is no result to cache
        return Cancelled(message="cancelled: the trainer stopped at a checkpoint; a rerun "
                         "continues from it")
    return None


def end_cancelled(workdir: str, stage: str) -> None:
    """After a cancelled trainer task: report what it trained, then end the flow as asked."""
    publish = publish_training_report if stage == PRETRAIN else publish_finetune_report
    publish(workdir, stopped_training_summary(workdir, stage))
    raise TerminationSignal(signal.SIGTERM)


# ---------------------------------------------------------------- pretraining


def trainer_command(launch: LaunchConfig, config_file: Path, workdir: Path) -> list[str]:
    args = ["-m", "cli.main", "pretrain", "--config", str(config_file), "--workdir", str(workdir)]
    if launch.nproc_per_node == 1 and not launch.torchrun_args:
        return [sys.executable, *args]
    rendezvous = launch.torchrun_args or ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous,
            "--nproc-per-node", str(launch.nproc_per_node), *args]


def dataset_fingerprint(cfg: RunConfig) -> str | None:
    """The fingerprint of the dataset the trainer reads (from its zarr attributes)."""
    path = cfg.pretrain.dataset_path(Path(cfg.workdir)) / "zarr.json"
    try:
        return json.loads(path.read_text())["attributes"]["fingerprint"]
    except (OSError, KeyError, ValueError):
        return None


def pretrain_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    cfg: RunConfig = parameters["config"]
    fingerprint = dataset_fingerprint(cfg)
    if fingerprint is None:
        return None
    payload = json.dumps([cfg.workdir, cfg.pretrain.model_dump(mode="json"),
                          parameters["launch"].nproc_per_node, fingerprint], sort_keys=True)
    return f"pretrain-{hashlib.sha256(payload.encode()).hexdigest()[:40]}"


@task(name="pretrain", task_run_name="pretrain", persist_result=True, result_serializer="json",
      cache_policy=CacheKeyFnPolicy(cache_key_fn=pretrain_cache_key))
def run_pretrain_process(config: RunConfig, launch: LaunchConfig) -> dict | State:
    """Run the trainer to the end (resuming from its newest checkpoint); return its summary
    (a Cancelled state when the flow was cancelled)."""
    workdir = Path(config.workdir)
    run_config = workdir / "pretrain-config.yaml"  # the config as run, for the trainer to read
    run_config.parent.mkdir(parents=True, exist_ok=True)
    run_config.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    work = WorkFolder(workdir)
    progress = TrainingProgress(work.training_log(PRETRAIN), config.pretrain.max_steps)
    cancelled = run_trainer(trainer_command(launch, run_config, workdir), launch.stop_grace_s,
                            progress.on_line)
    if cancelled is not None:
        return cancelled
    progress.finish()
    return summarize(read_json(work.manifest(PRETRAIN)))


def pretrain(cfg: RunConfig, launch: LaunchConfig) -> dict:
    """The pretraining task (or its cached result), then the report artifact."""
    runner = run_pretrain_process.with_options(result_storage=WorkFolder(cfg.workdir).prefect_cache)
    state = runner(cfg, launch, return_state=True)
    if state.is_cancelled():
        end_cancelled(cfg.workdir, PRETRAIN)
    summary = state.result()
    if state.name == "Cached" and not matches_disk(cfg, PRETRAIN, summary):
        summary = runner.with_options(refresh_cache=True)(cfg, launch)
    publish_training_report(cfg.workdir, summary)
    return summary


@flow(name="pretrain")
def pretrain_flow(config: RunConfig | None = None, config_file: str | None = None,
                  launch: LaunchConfig | None = None) -> dict:
    """Pretrain a GPT-2 on the work folder's token dataset, in a child process.

    Resumes from the newest checkpoint; a cancelled run keeps its last checkpoint.

    Args:
        config: The run config, as a form; leave it empty to use `config_file`.
        config_file: A YAML run config path (relative to where the flow runs), instead of
            `config`.
        launch: How the trainer starts (processes per node); default: one process.
    """
    start_flow_process()
    return pretrain(resolve_run_config(config, config_file), launch or LaunchConfig())


@task(name="finetune", task_run_name="finetune")
def run_finetune_process(config: RunConfig) -> dict | State:
    """Fine-tune in a child process, resuming from its newest checkpoint (a finished run
    only re-reports); return its summary (a Cancelled state when the flow was cancelled)."""
    workdir = Path(config.workdir)
    run_config = workdir / "finetune-config.yaml"  # the config as run, for the trainer to read
    run_config.parent.mkdir(parents=True, exist_ok=True)
    run_config.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    cancelled = run_trainer([sys.executable, "-m", "cli.main", "finetune", "--config",
                             str(run_config), "--workdir", str(workdir)])
    if cancelled is not None:
        return cancelled
    return summarize(read_json(WorkFolder(workdir).manifest(FINETUNE)))


@flow(name="finetune")
def finetune_flow(config: RunConfig | None = None, config_file: str | None = None) -> dict:
    """Instruction-fine-tune the work folder's pretrained model (or `finetune.base`).

    Args:
        config: The run config, as a form; leave it empty to use `config_file`.
        config_file: A YAML run config path (relative to where the flow runs), instead of
            `config`.
    """
    start_flow_process()
    cfg = resolve_run_config(config, config_file)
    state = run_finetune_process(cfg, return_state=True)
    if state.is_cancelled():
        end_cancelled(cfg.workdir, FINETUNE)
    summary = state.result()
    publish_finetune_report(cfg.workdir, summary)
    return summary


@flow(name="build-assistant")
def build_assistant(config: RunConfig | None = None, config_file: str | None = None,
                    launch: LaunchConfig | None = None, overwrite: bool = False) -> dict:
    """End to end: every data stage, then pretraining, then instruction fine-tuning.

    Finished steps are skipped (cached), an interrupted one resumes.

    Args:
        config: The run config, as a form; leave it empty to use `config_file`.
        config_file: A YAML run config path (relative to where the flow runs), instead of
            `config`.
        launch: How the trainer starts (processes per node); default: one process.
        overwrite: Replace stage output made with another config.
    """
    start_flow_process()
    cfg = resolve_run_config(config, config_file)
    data = prepare_data(config=data_config(cfg), overwrite=overwrite)
    pretrained = pretrain_flow(config=cfg, launch=launch)
    return {"data": data, "pretrain": pretrained, "finetune": finetune_flow(config=cfg)}


TRAINING_FLOWS = (pretrain_flow, finetune_flow, build_assistant)

"""`forge serve`: one deployment per flow, served by this process, so the UI can run each.

A served deployment runs its flow runs in child processes of this one (Prefect's runner), with
this process's working folder and environment.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.flows import Flow

from configs.run import data_config, load_run_config
from flows.stages import DATA_FLOWS
from flows.training import TRAINING_FLOWS


def all_flows() -> tuple[Flow, ...]:
    return (*DATA_FLOWS, *TRAINING_FLOWS)


def default_parameters(flow: Flow, config_file: str | None) -> dict:
    """With a config file, the form of every deployment starts filled with its values."""
    if config_file is None:
        return {}
    cfg = load_run_config(config_file)
    cfg = cfg.model_copy(update={"workdir": str(Path(cfg.workdir).resolve())})
    full = flow in TRAINING_FLOWS
    return {"config": (cfg if full else data_config(cfg)).model_dump(mode="json")}


def serve_all(name: str = "forge", config_file: str | None = None, limit: int | None = 1,
              poll_s: int | None = None) -> None:
    """Register a deployment `<flow>/<name>` for every flow and run what is triggered.

    `limit` caps the flow runs running at once (the data stages use every core already).
    """
    deployments = [
        flow.to_deployment(name=name, parameters=default_parameters(flow, config_file),
                           tags=["forge"], description=flow.description)
        for flow in all_flows()
    ]
    kwargs = {"query_seconds": poll_s} if poll_s else {}
    serve(*deployments, limit=limit, **kwargs)

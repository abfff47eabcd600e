"""`forge server`, `forge serve` and `forge run`: the Prefect side of the command line.

- `forge server` starts the Prefect server (API and UI) on 127.0.0.1:4200, its SQLite database
  in runs/prefect (PREFECT_HOME), telemetry off. For a team, point it at Postgres with
  `--database-url postgresql+asyncpg://USER:PASSWORD@HOST:5432/prefect` (or the variable
  PREFECT_SERVER_DATABASE_CONNECTION_URL), bind it with `--host` where others reach it, and
  give everyone's `forge serve` / `forge run` PREFECT_API_URL=http://HOST:PORT/api.
- `forge serve` registers one deployment per flow (download, extract, filter, dedupe,
  decontaminate, tokenize, prepare-data, pretrain, build-assistant) and runs whatever the UI
  triggers; `--config` fills the forms with that config's values.
- `forge run` runs the build-assistant flow here: on the server if one answers (PREFECT_API_URL,
  else --host/--port), else on an embedded one whose history lands in the same database.

Prefect reads its settings at import time: every handler sets the environment first.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from flows.settings import (
    DEFAULT_HOME,
    DEFAULT_HOST,
    DEFAULT_PORT,
    api_url,
    apply_environment,
    prefect_environment,
    server_is_up,
)


def add_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register `server`, `serve` and `run` on the `forge` parser."""
    where = argparse.ArgumentParser(add_help=False, parents=[common])
    where.add_argument("--host", default=DEFAULT_HOST,
                       help=f"server address (default {DEFAULT_HOST}: this machine only)")
    where.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"server port (default {DEFAULT_PORT})")
    where.add_argument("--home", type=Path, default=DEFAULT_HOME,
                       help=f"PREFECT_HOME: Prefect's database and files (default {DEFAULT_HOME})")

    sub = commands.add_parser("server", parents=[where],
                              help="start the Prefect server: API and UI, SQLite in --home")
    sub.add_argument("--database-url",
                     help="a Postgres database for teams, e.g. "
                     "postgresql+asyncpg://USER:PASSWORD@HOST:5432/prefect (default: SQLite)")
    sub.set_defaults(handler=start_server)

    sub = commands.add_parser("serve", parents=[where],
                              help="serve a deployment of every flow, to run them from the UI")
    sub.add_argument("--config", help="YAML run config whose values fill the forms")
    sub.add_argument("--name", default="forge", help="deployment name (default: forge)")
    sub.add_argument("--limit", type=int, default=1,
                     help="flow runs at once (default 1: a data stage uses every core)")
    sub.set_defaults(handler=serve_flows)

    sub = commands.add_parser("run", parents=[where],
                              help="build the assistant end to end (the build-assistant flow)")
    sub.add_argument("--config", required=True, help="YAML run config")
    sub.add_argument("--workdir", help="output folder (replaces the config's workdir)")
    sub.add_argument("--nproc-per-node", type=int, default=1,
                     help="training processes (one per GPU); above 1 under torchrun")
    sub.add_argument("--overwrite", action="store_true",
                     help="discard stage output made with another config")
    sub.set_defaults(handler=run_build)


def server_environment(args: argparse.Namespace) -> dict[str, str]:
    """The server's environment: its address from the flags, and the API URL its UI calls.

    Prefect's UI asks /ui-settings where the API is; unset, that is PREFECT_API_URL or
    127.0.0.1:4200 whatever --host and --port say. Bound to every address (0.0.0.0, ::), the
    UI calls its own origin (`/api`): the address each browser used is the right one.
    """
    env = {**os.environ, **prefect_environment(args.home),
           "PREFECT_SERVER_API_HOST": args.host, "PREFECT_SERVER_API_PORT": str(args.port)}
    if args.database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = args.database_url
    if "PREFECT_UI_API_URL" not in os.environ:  # a reverse proxy's URL is the user's to set
        wildcard = args.host in ("0.0.0.0", "::", "")
        env["PREFECT_UI_API_URL"] = "/api" if wildcard else api_url(args.host, args.port)
    return env


def start_server(args: argparse.Namespace) -> int:
    env = server_environment(args)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    where = "Postgres" if args.database_url else f"{env['PREFECT_HOME']}/prefect.db"
    print(f"forge: Prefect UI at http://{args.host}:{args.port}, database {where}; "
          f"stop with Ctrl-C", flush=True)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", args.host,
               "--port", str(args.port)]
    os.execve(sys.executable, command, env)  # the server replaces this process: signals reach it


def _connect(args: argparse.Namespace, required: bool) -> str | None:
    """Set Prefect's environment; return the API in use (None: an embedded server)."""
    explicit = os.environ.get("PREFECT_API_URL")
    api = explicit or api_url(args.host, args.port)
    if not server_is_up(api):
        if required or explicit:
            raise RuntimeError(f"no Prefect server answers at {api}; start one with "
                               "`forge server`" + (", or unset PREFECT_API_URL" if explicit
                                                   else " (or set PREFECT_API_URL)"))
        api = None
    env = prefect_environment(args.home, api)
    env["PREFECT_LOGGING_LEVEL"] = "WARNING" if args.quiet else "DEBUG" if args.debug else "INFO"
    if api is None:  # the embedded server starts slowly on a busy machine
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    apply_environment(env)
    root = logging.getLogger()
    for handler in list(root.handlers):  # Prefect's console format names the run and the task
        root.removeHandler(handler)
    return api


def serve_flows(args: argparse.Namespace) -> int:
    api = _connect(args, required=True)
    if args.config:
        from configs.run import load_run_config

        load_run_config(args.config)  # a bad config fails here, not in the UI
    from flows.deployments import serve_all

    print(f"forge: serving every flow as <flow>/{args.name} on {api}", flush=True)
    serve_all(args.name, args.config, limit=args.limit)
    return 0


def run_build(args: argparse.Namespace) -> int:
    api = _connect(args, required=False)
    from configs.run import load_run_config
    from flows.training import LaunchConfig, build_assistant

    cfg = load_run_config(args.config, {"workdir": args.workdir} if args.workdir else None)
    if not args.quiet:
        print(f"forge: build-assistant on {api or 'an embedded Prefect server'}", flush=True)
    result = build_assistant(config=cfg, launch=LaunchConfig(nproc_per_node=args.nproc_per_node),
                             overwrite=args.overwrite)
    if not args.quiet:
        pretrain, finetune = result["pretrain"], result["finetune"]
        print(f"forge: done; dataset {result['data']['tokenize']['output_fingerprint'][:16]}, "
              f"pretraining val loss {pretrain.get('val_loss')}, fine-tuned checkpoint "
              f"{finetune.get('checkpoint')}")
        _print_one_answer(Path(cfg.workdir))
    return 0


def _print_one_answer(workdir: Path) -> None:
    """One held-out instruction and the assistant's answer: what the build produced."""
    import json

    from pipeline.files import WorkFolder

    path = WorkFolder(workdir).test_responses
    if path.exists() and (rows := json.loads(path.read_text())["responses"]):
        row = rows[0]
        print(f"\nInstruction: {row['instruction']} {row.get('input', '')}".rstrip())
        print(f"Assistant:   {row['model_response']}")
        print(f"\nEverything is in {workdir}: stage manifests, tokenize/dataset.zarr, "
              f"pretrain/ and finetune/ (checkpoints, log.jsonl, loss.png). Chat with it in "
              f"the terminal: `.venv/bin/forge chat {workdir}`; in the browser: "
              f"`.venv/bin/forge serve-chat {workdir}`, then open http://127.0.0.1:8000/")


"""The `forge` command: one entry point whose commands call the same functions as the flows.

Heavy libraries are imported inside the commands so that `forge --help` and a rerun of a
finished stage start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from cli.common import load_run_config
from pipeline.files import WorkFolder
from pipeline.registry import STAGE_NAMES, STAGES

log = logging.getLogger("forge")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one clear sentence unless --debug
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forge", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or summaries")
    common.add_argument("--debug", action="store_true", help="tracebacks and debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stage_opts = argparse.ArgumentParser(add_help=False, parents=[common])
    stage_opts.add_argument("--config", required=True, help="YAML run config")
    stage_opts.add_argument("--workdir", help="output folder (replaces the config's workdir)")
    stage_opts.add_argument("--source", action="append", metavar="[NAME=]PATH_OR_URL_OR_GLOB",
                            help="replaces the config's sources; repeatable; NAME picks the "
                            "filter rules (filter.per_source.NAME)")
    stage_opts.add_argument("--workers", type=at_least_one, help="worker processes")
    stage_opts.add_argument("--overwrite", action="store_true",
                            help="discard this stage's output made with another config")
    for spec in STAGES:
        sub = commands.add_parser(spec.name, parents=[stage_opts], help=spec.description)
        sub.set_defaults(handler=run_stages, stages=(spec.name,))
    sub = commands.add_parser("prepare", parents=[stage_opts],
                              help="every enabled data stage, in order")
    sub.set_defaults(handler=run_stages, stages=None)

    sub = commands.add_parser("stats", parents=[common], help="statistics of a token dataset")
    sub.add_argument("path", help="a dataset.zarr or a work folder")
    sub.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub.add_argument("--plot", help="PNG histogram of document lengths (default: beside it)")
    sub.set_defaults(handler=show_stats)

    sub = commands.add_parser("verify", parents=[common], help="recompute every checksum")
    sub.add_argument("path", help="a dataset.zarr or a work folder")
    sub.set_defaults(handler=verify_dataset)

    from cli import training  # pretrain, eval, generate

    training.register(commands, common)

    from cli.orchestration import add_commands  # server, serve, run (Prefect)

    add_commands(commands, common)

    from cli import assistant  # finetune, chat, import-gpt2, export

    assistant.register(commands, common)
    return parser


def at_least_one(text: str) -> int:
    """An argparse type: a count of processes (0 would silently fall back to the config)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ---------------------------------------------------------------- data stages


def run_stages(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError
    from pipeline.download import with_source_presets
    from pipeline.registry import prepare_stages, stage_function

    cfg, preset_lines = with_source_presets(load_run_config(args))
    stages = args.stages or prepare_stages(cfg)
    for name in set(stages) - set(prepare_stages(cfg)):
        raise ConfigError(f"the {name} stage is disabled by the config; set "
                          f"data.{name}.enabled: true to run it")
    if "filter" in stages and not args.quiet:
        print("\n".join(preset_lines))
    for name in stages:
        started = time.perf_counter()
        with progress_bar(name, quiet=args.quiet) as progress:
            manifest = stage_function(name)(cfg, progress=progress, overwrite=args.overwrite)
        if not args.quiet:
            print_summary(name, manifest, Path(cfg.workdir), time.perf_counter() - started)
    return 0


@contextmanager
def progress_bar(label: str, quiet: bool):
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[bold]{task.description}", BarColumn(), MofNCompleteColumn(), "units",
                  TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def print_summary(name: str, manifest: dict, workdir: Path, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    unit = manifest.get("count_unit", "docs")
    table = Table(title=f"{name}: {manifest['units']} units, {seconds:.1f}s "
                  f"(work {manifest['unit_seconds']:.1f}s)", title_justify="left")
    table.add_column(f"{unit} in", justify="right")
    table.add_column(f"{unit} out", justify="right")
    table.add_column("dropped (by reason)")
    table.add_column("MB in", justify="right")
    table.add_column("MB out", justify="right")
    dropped = ", ".join(f"{k}: {v}" for k, v in manifest["dropped"].items()) or "none"
    if manifest.get("repaired"):
        dropped += "; repaired " + ", ".join(f"{k}: {v}" for k, v in manifest["repaired"].items())
    table.add_row(str(manifest["docs_in"]), str(manifest["docs_out"]), dropped,
                  f"{manifest['bytes_in'] / 1e6:.1f}", f"{manifest['bytes_out'] / 1e6:.1f}")
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print(f"output: {WorkFolder(workdir).stage(name)}")


# ---------------------------------------------------------------- inspection


def dataset_path(path: str) -> Path:
    """Accept the dataset itself or a work folder that holds one."""
    nested = WorkFolder(path).dataset
    return nested if nested.exists() else Path(path)


def show_stats(args: argparse.Namespace) -> int:
    from pipeline.stats import (
        dataset_stats,
        partial_stats,
        plot_doc_lengths,
        render_partial_stats,
        render_stats,
    )

    path = dataset_path(args.path)
    work = WorkFolder(args.path)
    unfinished = any(work.stage(name).is_dir() for name in STAGE_NAMES)
    if unfinished and not (path / "zarr.json").exists():  # a run that failed or is under way
        stats = partial_stats(work.root)
        if args.json:
            print(json.dumps(stats, indent=1))
        else:
            render_partial_stats(stats)
        return 0
    stats = dataset_stats(path)
    plot = Path(args.plot) if args.plot else path.parent / "doc_lengths.png"
    plot_doc_lengths(path, plot)
    stats["plot"] = str(plot)
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        render_stats(stats)
    return 0


def verify_dataset(args: argparse.Namespace) -> int:
    from pipeline.shards import verify

    path = dataset_path(args.path)
    problems = verify(path)
    for problem in problems:
        print(f"FAILED {problem}", file=sys.stderr)
    if problems:
        return 1
    if not args.quiet:
        print(f"OK: every shard checksum and the fingerprint of {path} match")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What several `forge` commands share: the run config with the command line's overrides."""

from __future__ import annotations

import argparse


def load_run_config(args: argparse.Namespace):
    """The whole run's config (data and training sections) with the command-line overrides."""
    from configs.run import load_run_config as load

    overrides: dict = {}
    if getattr(args, "workdir", None):
        overrides["workdir"] = args.workdir
    if getattr(args, "workers", None):
        overrides["workers"] = args.workers
    if getattr(args, "source", None):
        overrides["data.sources"] = [{"uri": s} for s in args.source]
    return load(args.config, overrides)

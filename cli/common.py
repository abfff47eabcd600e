"""What several `forge` commands share: the run config with the command line's overrides."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

SOURCE_NAME = re.compile(r"([A-Za-z0-9_-]+)=(.+)")


def parse_source(text: str) -> dict:
    """`NAME=PATH_OR_URL` names a source (NAME: letters, digits, `-`, `_`); anything else,
    or an existing file whose name holds `=`, is a plain URI, so URLs with `=` keep working."""
    named = SOURCE_NAME.fullmatch(text)
    if named and not Path(text).exists():
        return {"name": named[1], "uri": named[2]}
    return {"uri": text}


def load_run_config(args: argparse.Namespace):
    """The whole run's config (data and training sections) with the command-line overrides."""
    from configs.run import load_run_config as load

    overrides: dict = {}
    if getattr(args, "workdir", None):
        overrides["workdir"] = args.workdir
    if getattr(args, "workers", None):
        overrides["workers"] = args.workers
    if getattr(args, "source", None):
        overrides["data.sources"] = [parse_source(s) for s in args.source]
    return load(args.config, overrides)

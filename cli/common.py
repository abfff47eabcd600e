"""What several `forge` commands share: the run config with the command line's overrides, and
the options of the commands that load a model."""

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


def add_model_options(sub: argparse.ArgumentParser) -> None:
    """--device and --vocab-dir, for every command that loads a trained model."""
    sub.add_argument("--device", type=device_name, choices=("auto", "cpu", "cuda"),
                     default="auto", help="auto: a CUDA GPU if there is one, else the CPU")
    sub.add_argument("--vocab-dir",
                     help="GPT-2 vocabulary folder (default: $FORGE_VOCAB_DIR or the run's own)")


def device_name(name: str) -> str:
    """"auto" made concrete: "cuda" where a GPU is visible, else "cpu"."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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

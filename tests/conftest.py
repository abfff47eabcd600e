"""Shared fixtures: the real data in ../shared/data and a prepared demo-like work folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
VOCAB = DATA / "gpt2-bpe"


def pytest_configure(config: pytest.Config) -> None:
    if not DATA.is_dir():
        raise pytest.UsageError(f"the shared data folder {DATA} is missing; set FORGE_SHARED_DATA")


def forge(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real `forge` command in a subprocess, as a user would."""
    result = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO,
                            capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"forge {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def write_config(path: Path, workdir: Path, sources: list[dict], workers: int = 2,
                 **tokenize) -> Path:
    import yaml

    config = {
        "workdir": str(workdir),
        "workers": workers,
        "data": {
            "sources": sources,
            "tokenize": {"vocab_dir": str(VOCAB), "shard_tokens": 200_000, "val_fraction": 0.1,
                         **tokenize},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path

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


SMALL_BOOKS = ["pg11", "pg1952", "pg1041", "pg11231", "pg10007", "pg1513", "pg43", "pg2542"]


def small_corpus() -> list[dict]:
    """A few of every kind of real input: books, HTML, WARC, JSONL, a zip of speeches."""
    return [
        *({"name": "books", "uri": str(DATA / "books" / f"{b}.txt.gz")} for b in SMALL_BOOKS),
        {"name": "books", "uri": str(DATA / "books" / "the-verdict.txt")},
        {"name": "speeches", "uri": str(DATA / "books" / "nltk_inaugural.zip")},
        {"name": "gutenberg-html", "uri": str(DATA / "html" / "pg11-h.htm.gz")},
        {"name": "warc", "uri": str(DATA / "warc" / "*.warc*")},
        {"name": "webdocs", "uri": str(DATA / "webdocs" / "*.gz")},
    ]


def small_config(path: Path, workdir: Path, workers: int = 2) -> Path:
    import yaml

    config_path = write_config(path, workdir, small_corpus(), workers=workers)
    config = yaml.safe_load(config_path.read_text())
    config["data"]["extract"] = {"archive_members_per_unit": 16}
    config_path.write_text(yaml.safe_dump(config))
    return config_path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small corpus prepared once by the real command; tests must not modify it."""
    root = tmp_path_factory.mktemp("prepared")
    config = small_config(root / "config.yaml", root / "work")
    forge("prepare", "--config", str(config), "--quiet")
    return root / "work"


def dead_writer_temp(final: Path) -> Path:
    """The temporary file of a write killed before its rename: made by a process that is
    gone (SIGKILLed) by the time this returns."""
    code = ("import os, signal, sys; from pathlib import Path; "
            "from pipeline.files import temp_path_for; "
            "tmp = temp_path_for(Path(sys.argv[1])); tmp.write_bytes(b'partial'); "
            "print(tmp, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    result = subprocess.run([sys.executable, "-c", code, str(final)], cwd=REPO,
                            capture_output=True, text=True)
    tmp = Path(result.stdout.strip())
    assert result.returncode == -9 and tmp.is_file(), result.stderr
    return tmp

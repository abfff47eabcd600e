"""Crash and resume: SIGKILL a real `forge prepare` at several points of every stage, rerun,
and get the uninterrupted run's fingerprint while redoing only the missing work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, forge, small_config

from pipeline.shards import TokenDataset

pytestmark = pytest.mark.slow

# (stage folder holding the unit records, records to wait for before the kill)
KILL_POINTS = [
    ("download", 1),
    ("download", 8),
    ("extract", 1),
    ("extract", 12),
    ("filter", 4),
    ("dedupe/signatures", 2),
    ("tokenize", 3),
    ("tokenize/shards", 1),
]


def kill_when(args: list[str], records: Path, count: int) -> None:
    """Start forge, SIGKILL it once `count` unit records exist under `records`."""
    env = {**os.environ, "FORGE_TEST_UNIT_DELAY": "0.15"}  # widen the window inside a unit
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if len(list((records / "units").glob("*.json"))) >= count:
            proc.send_signal(signal.SIGKILL)
            break
        if proc.poll() is not None:
            raise AssertionError(f"forge ended before the kill point: {proc.stderr.read()}")
        time.sleep(0.003)
    assert proc.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.parametrize("stage, count", KILL_POINTS)
def test_sigkill_then_rerun_gives_the_uninterrupted_fingerprint(
        prepared: Path, tmp_path: Path, stage: str, count: int) -> None:
    work = tmp_path / "work"
    config = str(small_config(tmp_path / "c.yaml", work))
    kill_when(["prepare", "--config", config, "--quiet"], work / stage, count)

    committed = {p: p.stat().st_mtime_ns for p in (work / stage / "units").glob("*.json")}
    assert committed, "the kill came before any unit was committed"
    assert not (work / "tokenize" / "manifest.json").exists()

    forge("prepare", "--config", config, "--quiet")
    for path, mtime in committed.items():  # finished units were skipped, not redone
        assert path.stat().st_mtime_ns == mtime, f"{path.name} was redone"
    fingerprint = TokenDataset(work / "tokenize" / "dataset.zarr").attrs["fingerprint"]
    expected = TokenDataset(prepared / "tokenize" / "dataset.zarr").attrs["fingerprint"]
    assert fingerprint == expected
    for name in ("download", "extract", "tokenize"):
        ours = json.loads((work / name / "manifest.json").read_text())
        theirs = json.loads((prepared / name / "manifest.json").read_text())
        assert ours["output_fingerprint"] == theirs["output_fingerprint"]
        assert (ours["docs_in"], ours["docs_out"], ours["dropped"]) == \
            (theirs["docs_in"], theirs["docs_out"], theirs["dropped"])
    assert forge("verify", str(work)).returncode == 0

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

from pipeline.contract import StageError, run_stage
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


def _descendants(root: int) -> set[int]:
    """Live processes under `root` (from /proc): the command's workers and resource tracker."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigkill_of_the_command_alone_leaves_no_worker_behind(prepared: Path,
                                                              tmp_path: Path) -> None:
    """Only the command's own process is killed (not its group): its pool workers and the
    resource tracker must end with it, and the rerun gives the uninterrupted fingerprint."""
    work = tmp_path / "work"
    config = str(small_config(tmp_path / "c.yaml", work))
    env = {**os.environ, "FORGE_TEST_UNIT_DELAY": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "prepare", "--config", config,
                             "--quiet"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((work / "extract" / "units").glob("*.json")):
        assert proc.poll() is None, f"forge ended before the kill point: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    workers = _descendants(proc.pid)
    assert len(workers) >= 2, "the kill came when no worker was running"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    strays = [pid for pid in workers if _alive(pid)]
    for pid in strays:  # never leave them behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not strays, "processes of the killed run live on"

    forge("prepare", "--config", config, "--quiet")
    fingerprint = TokenDataset(work / "tokenize" / "dataset.zarr").attrs["fingerprint"]
    assert fingerprint == TokenDataset(prepared / "tokenize" / "dataset.zarr").attrs["fingerprint"]


def test_a_stage_locked_by_a_live_run_refuses_a_second_one_until_the_holder_dies(
        tmp_path: Path) -> None:
    folder = tmp_path / "work" / "extract"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from pipeline.contract import stage_lock\n"
         f"with stage_lock('extract', Path({str(folder)!r})):\n"
         "    print('locked', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StageError, match="being written by another forge process"):
            run_stage("extract", folder, "h", False, lambda stage: {"ran": True})
    finally:
        holder.kill()
        holder.wait()
    assert run_stage("extract", folder, "h", False, lambda stage: {"ran": True}) == {"ran": True}

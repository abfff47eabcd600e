"""The stage contract: units of work committed atomically, skipped on restart, and a manifest.

A stage lists its units, runs the ones without a committed record (in worker processes),
and writes `manifest.json` when all are done. A unit function writes its own outputs
atomically and returns a `UnitResult`; the record that marks the unit done is written
here, after the outputs, so a unit is either complete and recorded or absent.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging.handlers import QueueHandler
from multiprocessing import get_context
from multiprocessing.queues import Queue
from pathlib import Path
from queue import Empty
from typing import TYPE_CHECKING, Any

from pipeline.files import MANIFEST, atomic_write_json, read_json, remove_stale_temps
from pipeline.units import ProgressFn, Unit, UnitFn, UnitResult, run_and_record

if TYPE_CHECKING:
    from pipeline.config import ExecutorConfig

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_HELD: set[Path] = set()  # the stage locks this process holds


class StageError(RuntimeError):
    """A stage could not finish; the message says why and what to do."""


@dataclass
class Stage:
    """One stage's folder: `units/<id>.json` records, `stage.json`, `manifest.json`."""

    name: str
    folder: Path
    config_hash: str
    started: float = field(default_factory=time.perf_counter)  # for the manifest's wall time

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def record_path(self, unit_id: str) -> Path:
        return self.folder / "units" / f"{unit_id}.json"

    def finished_manifest(self) -> dict | None:
        """The manifest of a finished run with the same config and inputs, else None."""
        if not self.manifest_path.exists():
            return None
        manifest = read_json(self.manifest_path)
        return manifest if manifest.get("config_hash") == self.config_hash else None

    def claim(self, overwrite: bool = False) -> None:
        """Bind the folder to this config; refuse to mix outputs of two configs."""
        state = self.folder / "stage.json"
        if state.exists() and not overwrite:
            previous = read_json(state).get("config_hash")
            if previous != self.config_hash:
                raise StageError(
                    f"{self.folder} holds {self.name} output made with another config or input "
                    f"(hash {previous}, now {self.config_hash}); rerun with --overwrite to "
                    "replace it, or choose another --workdir"
                )
            return
        if overwrite and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(state, {"stage": self.name, "config_hash": self.config_hash})

    def run_units(
        self,
        units: list[Unit],
        fn: UnitFn,
        workers: int,
        progress: ProgressFn | None = None,
        executor: ExecutorConfig | None = None,
    ) -> dict[str, dict]:
        """Run every unit without a record; return all records by unit id, in unit order.

        Locally the units run in `workers` processes; with a Ray or Slurm `executor` they run
        as datatrove tasks on the cluster. Either way each unit commits its own record.
        """
        ids = [u.id for u in units]
        if len(set(ids)) != len(ids):
            raise StageError(f"{self.name}: duplicate unit ids (a bug): {sorted(ids)[:5]}")
        (self.folder / "units").mkdir(parents=True, exist_ok=True)
        pending = [u for u in units if not self.record_path(u.id).exists()]
        done = len(units) - len(pending)
        if done:
            log.info("%s: %d of %d units already committed, skipping them", self.name, done,
                     len(units))
        if progress:
            progress(done, len(units))
        failures: list[str] = []
        jobs = [(u, str(self.record_path(u.id))) for u in pending]
        if executor is None or executor.kind == "local" or not jobs:
            finished = _execute_locally(fn, jobs, workers, failures)
        else:
            from pipeline.executors import execute_distributed

            finished = execute_distributed(self.name, self.folder, fn, jobs, executor, failures)
        for _ in _fail_for_debugging(self.name, finished, done):
            done += 1
            if progress:
                progress(done, len(units))
        if failures:
            raise StageError(
                f"{self.name}: {len(failures)} unit(s) failed ({'; '.join(failures[:3])}); "
                "the others are committed, rerun the same command to retry the failed ones"
            )
        return {u.id: read_json(self.record_path(u.id)) for u in units}

    def write_manifest(self, records: dict[str, dict], **extra: Any) -> dict:
        total = UnitResult()
        for record in records.values():
            total.docs_in += record["docs_in"]
            total.docs_out += record["docs_out"]
            total.dropped.update(record["dropped"])
            total.repaired.update(record["repaired"])
            total.bytes_in += record["bytes_in"]
            total.bytes_out += record["bytes_out"]
        manifest = {
            "stage": self.name,
            "config_hash": self.config_hash,
            "units": len(records),
            "unit_seconds": round(sum(r.get("seconds", 0.0) for r in records.values()), 3),
            **{k: v for k, v in total.to_json().items() if k != "outputs"},
            "wall_seconds": round(time.perf_counter() - self.started, 3),
            **extra,
        }
        atomic_write_json(self.manifest_path, manifest)
        return manifest


def run_stage(name: str, folder: Path, config_hash: str, overwrite: bool,
              work: Callable[[Stage], dict]) -> dict:
    """What every stage does first, then its `work`: a finished run with the same config hash
    returns its manifest; otherwise the folder is claimed for this config and `work(stage)`
    runs the units and writes the manifest (resuming committed units). The stage's lock is
    held throughout, so a rerun never writes beside a live run of the same stage."""
    stage = Stage(name, folder, config_hash)
    with stage_lock(name, folder):
        if manifest := stage.finished_manifest():
            return manifest
        stage.claim(overwrite)
        if removed := remove_stale_temps(stage.folder):
            log.info("%s: removed %d temporary files of dead writers", name, removed)
        return work(stage)


@contextmanager
def stage_lock(name: str, folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` for this process (re-entrant). It is a `flock`, which the
    kernel drops when its holder dies (SIGKILL included): a killed run never blocks its rerun."""
    path = folder.with_name(f".{folder.name}.lock").resolve()
    if path in _HELD:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:  # never written: a finished rerun changes no file
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(f"the {name} stage in {folder} is being written by another forge "
                             f"process (it holds {path}); wait for it to end or stop it, then "
                             "rerun") from None
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)
            fcntl.flock(lock, fcntl.LOCK_UN)


def _die_with_parent(parent: int) -> None:
    """End this pool worker when the forge process that started it dies
    (even by SIGKILL), so no orphan keeps committing units beside the user's rerun."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:  # no parent-death signal: watch the parent instead
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _execute_locally(fn: UnitFn, jobs: list[tuple[Unit, str]], workers: int,
                     failures: list[str]) -> Iterable[dict]:
    """Yield each unit's record as it is committed; a failing unit is reported, not fatal."""
    if workers <= 1 or len(jobs) <= 1:
        for unit, record in jobs:
            try:
                yield run_and_record(fn, unit, record)
            except Exception as e:  # noqa: BLE001 - reported and retried on rerun
                _report_failure(unit, e, failures)
        return
    # spawn, not fork: the parent may hold threads (progress bar, Prefect) that fork would copy
    context = get_context("spawn")
    logs = context.Queue()  # the workers' log records, handled here, in the caller's thread
    level = logging.getLogger("pipeline").getEffectiveLevel()
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                             initargs=(os.getpid(), logs, level)) as pool:
        queue = iter(jobs)
        running = {}
        for unit, record in queue:
            running[pool.submit(run_and_record, fn, unit, record)] = unit
            if len(running) >= workers * 2:
                break
        while running:
            finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            _relay_logs(logs)
            for future in finished:
                unit = running.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    raise StageError("a worker process died (out of memory?); rerun the same "
                                     "command to resume") from None
                except Exception as e:  # noqa: BLE001 - reported and retried on rerun
                    _report_failure(unit, e, failures)
                nxt = next(queue, None)
                if nxt is not None:
                    running[pool.submit(run_and_record, fn, *nxt)] = nxt[0]
    _relay_logs(logs)  # what the workers logged before they ended


def _init_worker(parent: int, logs: Queue, level: int) -> None:
    """Pool worker initializer: die with the parent, and send log records to it."""
    _die_with_parent(parent)
    root = logging.getLogger()
    root.handlers[:] = [QueueHandler(logs)]
    root.setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(level)


def _relay_logs(logs: Queue) -> None:
    """Handle the workers' records as this process's own: on the terminal, and in the Prefect
    run's logs (its handler needs the run's context, which only the caller's thread has)."""
    while True:
        try:
            record = logs.get_nowait()
        except Empty:
            return
        logging.getLogger(record.name).handle(record)


def _report_failure(unit: Unit, error: Exception, failures: list[str]) -> None:
    """The stage's error names the failed units; their tracebacks are for `--debug`."""
    log.debug("%s failed: %s", unit.id, error, exc_info=error)
    failures.append(f"{unit.id}: {type(error).__name__}: {error}")


def _fail_for_debugging(stage: str, committed: Iterable[dict], done: int) -> Iterable[dict]:
    """The debug setting FORGE_FAIL_AFTER=<stage>:<N>[:<marker file>] makes <stage> fail as a
    crash would once N of its units are committed; with a marker file, only the run that
    creates the file fails (a retry then resumes). The crash and resume tests use it."""
    spec = os.environ.get("FORGE_FAIL_AFTER", "").split(":", 2)
    if spec[0] != stage:
        return committed
    return _fail_after(stage, committed, done, int(spec[1]), spec[2] if len(spec) > 2 else None)


def _fail_after(stage: str, committed: Iterable[dict], done: int, limit: int,
                marker: str | None) -> Iterable[dict]:
    for record in committed:
        yield record
        done += 1
        if done >= limit and _first_to_fail(marker):
            raise StageError(f"{stage}: injected failure after {done} units (FORGE_FAIL_AFTER)")


def _first_to_fail(marker: str | None) -> bool:
    if marker is None:
        return True
    try:
        with open(marker, "x"):
            return True
    except FileExistsError:
        return False

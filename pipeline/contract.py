"""The stage contract: units of work committed atomically, skipped on restart, and a manifest.

A stage lists its units, runs the ones without a committed record (in worker processes),
and writes `manifest.json` when all are done. A unit function writes its own outputs
atomically and returns a `UnitResult`; the record that marks the unit done is written
here, after the outputs, so a unit is either complete and recorded or absent.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.files import MANIFEST, atomic_write_json, read_json
from pipeline.units import ProgressFn, Unit, UnitFn, UnitResult, run_and_record

if TYPE_CHECKING:
    from pipeline.config import ExecutorConfig

log = logging.getLogger(__name__)


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
        threads: bool = False,
    ) -> dict[str, dict]:
        """Run every unit without a record; return all records by unit id, in unit order.

        Locally the units run in `workers` processes, or `workers` threads of this process with
        `threads` (for work that releases the GIL: no process start-up, state set up once);
        with a Ray or Slurm `executor` they run as datatrove tasks on the cluster. Either way
        each unit commits its own record.
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
            finished = _execute_locally(fn, jobs, workers, failures, threads)
        else:
            from pipeline.executors import execute_distributed

            finished = execute_distributed(self.name, self.folder, fn, jobs, executor, failures)
        for _ in finished:
            done += 1
            _maybe_fail_for_test(self.name, done)
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
    runs the units and writes the manifest (resuming committed units)."""
    stage = Stage(name, folder, config_hash)
    if manifest := stage.finished_manifest():
        return manifest
    stage.claim(overwrite)
    return work(stage)


def _execute_locally(fn: UnitFn, jobs: list[tuple[Unit, str]], workers: int,
                     failures: list[str], threads: bool = False) -> Iterable[dict]:
    """Yield each unit's record as it is committed; a failing unit is reported, not fatal."""
    if workers <= 1 or len(jobs) <= 1:
        for unit, record in jobs:
            try:
                yield run_and_record(fn, unit, record)
            except Exception as e:  # noqa: BLE001 - reported and retried on rerun
                log.exception("%s failed", unit.id)
                failures.append(f"{unit.id}: {type(e).__name__}: {e}")
        return
    # spawn, not fork: the parent may hold threads (progress bar, Prefect) that fork would copy
    pool = (ThreadPoolExecutor(max_workers=workers) if threads else
            ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")))
    with pool:
        queue = iter(jobs)
        running = {}
        for unit, record in queue:
            running[pool.submit(run_and_record, fn, unit, record)] = unit
            if len(running) >= workers * 2:
                break
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                unit = running.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    raise StageError("a worker process died (out of memory?); rerun the same "
                                     "command to resume") from None
                except Exception as e:  # noqa: BLE001 - reported and retried on rerun
                    log.error("%s failed: %s", unit.id, e)
                    failures.append(f"{unit.id}: {type(e).__name__}: {e}")
                nxt = next(queue, None)
                if nxt is not None:
                    running[pool.submit(run_and_record, fn, *nxt)] = nxt[0]


def _maybe_fail_for_test(stage: str, committed: int) -> None:
    """FORGE_FAIL_AFTER=stage:N raises after N committed units: the crash tests' injection."""
    spec = os.environ.get("FORGE_FAIL_AFTER", "")
    if spec and spec.split(":")[0] == stage and committed >= int(spec.split(":")[1]):
        raise StageError(f"{stage}: injected failure after {committed} units (FORGE_FAIL_AFTER)")

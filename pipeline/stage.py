"""The stage contract: units of work committed atomically, skipped on restart, and a manifest.

A stage lists its units, runs the ones without a committed record (in worker processes),
and writes `manifest.json` when all are done. A unit function writes its own outputs
atomically and returns a `UnitResult`; the record that marks the unit done is written
here, after the outputs, so a unit is either complete and recorded or absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import ExecutorConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class StageError(RuntimeError):
    """A stage could not finish; the message says why and what to do."""


# ---------------------------------------------------------------- atomic files


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(final: Path) -> Path:
    """A unique sibling name: concurrent writers (an orphaned worker, a rerun) never collide."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    return Path(name)


def commit(tmp: Path, final: Path) -> None:
    """fsync `tmp` (file or folder) and rename it over `final`."""
    if tmp.is_file():
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    tmp.write_bytes(data)
    commit(tmp, final)


def atomic_write_json(final: Path, obj: Any) -> None:
    atomic_write_bytes(final, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_name(text: str, limit: int = 120) -> str:
    """A file name that cannot escape its folder: no separators, no leading dots."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "unnamed"
    if len(name) > limit:
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        name = f"{name[: limit - 13]}-{digest}"
    return name


# ---------------------------------------------------------------- units


@dataclass
class UnitResult:
    """What one unit did: the document accounting plus stage-specific outputs."""

    docs_in: int = 0
    docs_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)  # kept, but changed: counted too
    bytes_in: int = 0
    bytes_out: int = 0
    outputs: dict[str, Any] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.docs_in += n
        self.dropped[reason] += n

    def keep(self, n: int = 1) -> None:
        self.docs_in += n
        self.docs_out += n

    def to_json(self) -> dict:
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "dropped": dict(sorted(self.dropped.items())),
            "repaired": dict(sorted(self.repaired.items())),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "outputs": self.outputs,
        }


@dataclass(frozen=True)
class Unit:
    id: str  # file-name safe, unique within the stage, sorts in output order
    payload: dict


UnitFn = Callable[[dict], UnitResult]
ProgressFn = Callable[[int, int], None]


def run_and_record(fn: UnitFn, unit: Unit, record: str) -> dict:
    """Run one unit and commit its record: the unit's outputs are already committed by `fn`."""
    start = time.perf_counter()
    result = fn(unit.payload).to_json()
    result["seconds"] = round(time.perf_counter() - start, 4)
    # Crash tests widen the window between a unit's outputs and its record with this.
    time.sleep(float(os.environ.get("FORGE_TEST_UNIT_DELAY", "0")))
    atomic_write_json(Path(record), result)
    return result


@dataclass
class Stage:
    """One stage's folder: `units/<id>.json` records, `stage.json`, `manifest.json`."""

    name: str
    folder: Path
    config_hash: str

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
            import shutil

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

            finished = execute_distributed(self, fn, jobs, executor, failures)
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
            **extra,
        }
        atomic_write_json(self.manifest_path, manifest)
        return manifest


def _execute_locally(fn: UnitFn, jobs: list[tuple[Unit, str]], workers: int,
                     failures: list[str]) -> Iterable[dict]:
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
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
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

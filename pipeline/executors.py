"""Scale-out: a stage's pending units as datatrove tasks on Ray or Slurm.

The units are the same as locally; datatrove's executors only decide where they run.
Task `rank` of `world_size` runs every world_size-th unit and commits each unit's record
itself, so the driver (this process) just watches the records appear: progress, failures
and resume work exactly as with local workers. Ray and Slurm need a filesystem shared by
the driver and the workers (the work folder).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from pipeline.config import ExecutorConfig
from pipeline.files import read_json
from pipeline.units import Unit, UnitFn, run_and_record

log = logging.getLogger(__name__)


class RunUnits(PipelineStep):
    """A datatrove step that runs this task's share of a stage's units."""

    name = "forge units"
    type = "forge"

    def __init__(self, fn: UnitFn, jobs: list[tuple[Unit, str]], cwd: str):
        super().__init__()
        self.fn, self.jobs, self.cwd = fn, jobs, cwd

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        os.chdir(self.cwd)  # payload paths may be relative to the driver's folder
        for unit, record in self.jobs[rank::world_size]:
            if Path(record).exists():
                continue  # committed by an earlier, interrupted attempt
            with self.track_time():
                run_and_record(self.fn, unit, record)
            self.stat_update("units")
        yield from ()


def build_executor(name: str, folder: Path, fn: UnitFn, jobs: list[tuple[Unit, str]],
                   cfg: ExecutorConfig):
    """The datatrove executor for stage `name`'s jobs, logging under its `folder`."""
    tasks = min(cfg.tasks or len(jobs), len(jobs))
    logging_dir = str(folder / "executor" / time.strftime("%Y%m%d-%H%M%S"))
    pipeline = [RunUnits(fn, jobs, os.getcwd())]
    if cfg.kind == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        return RayPipelineExecutor(pipeline, tasks=tasks, logging_dir=logging_dir,
                                   skip_completed=False)
    from datatrove.executor.slurm import SlurmPipelineExecutor

    slurm = cfg.slurm
    return SlurmPipelineExecutor(
        pipeline,
        tasks=tasks,
        time=slurm.time,
        partition=slurm.partition,
        cpus_per_task=slurm.cpus_per_task,
        mem_per_cpu_gb=slurm.mem_per_cpu_gb,
        job_name=f"{slurm.job_name}-{name}",
        env_command=slurm.env_command or f"source {Path(sys.prefix) / 'bin' / 'activate'}",
        sbatch_args=dict(slurm.sbatch_args),
        logging_dir=logging_dir,
        skip_completed=False,
        with_srun=False,
        requeue=False,
        qos="",
    )


def execute_distributed(name: str, folder: Path, fn: UnitFn, jobs: list[tuple[Unit, str]],
                        cfg: ExecutorConfig, failures: list[str]) -> Iterator[dict]:
    """Run stage `name`'s jobs on the cluster; yield each record as it appears in `folder`.

    A unit without a record when the tasks have ended is added to `failures`."""
    executor = build_executor(name, folder, fn, jobs, cfg)
    errors: list[BaseException] = []

    def launch() -> None:
        try:
            if cfg.kind == "ray":
                import ray

                if not ray.is_initialized():
                    ray.init(address=cfg.ray_address, ignore_reinit_error=True,
                             log_to_driver=False)
            executor.run()  # Ray: returns when every task ended; Slurm: once submitted
        except BaseException as e:  # noqa: BLE001 - reported by the driver below
            errors.append(e)

    runner = threading.Thread(target=launch, name=f"{name}-{cfg.kind}", daemon=True)
    runner.start()
    remaining = {record: unit for unit, record in jobs}
    while remaining:
        for record in [r for r in remaining if Path(r).exists()]:
            remaining.pop(record)
            yield read_json(Path(record))
        if not remaining:
            break
        if not runner.is_alive() and not _cluster_busy(executor, cfg):
            for record in [r for r in remaining if Path(r).exists()]:  # the last moment
                remaining.pop(record)
                yield read_json(Path(record))
            why = (f"the {cfg.kind} executor failed: {errors[0]}" if errors else
                   f"no record after the {cfg.kind} tasks ended (see "
                   f"{executor.logging_dir.path})")
            failures.extend(f"{unit.id}: {why}" for unit in remaining.values())
            return
        time.sleep(min(cfg.poll_s, 0.5) if cfg.kind == "ray" else cfg.poll_s)


def _cluster_busy(executor, cfg: ExecutorConfig) -> bool:
    """Slurm jobs of this stage still queued or running (sbatch returns at once)."""
    if cfg.kind != "slurm" or not executor.job_id or executor.job_id == -1:
        return False
    if shutil.which("squeue") is None:
        return False
    out = subprocess.run(["squeue", "--noheader", "--jobs", str(executor.job_id)],
                         capture_output=True, text=True).stdout
    return bool(out.strip())

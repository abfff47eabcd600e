"""Scale-out through datatrove's executors: Ray and Slurm give the local fingerprint."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import forge, small_config

from pipeline.shards import TokenDataset

pytestmark = pytest.mark.slow

FAKE_SBATCH = r"""#!/usr/bin/env bash
# Stands in for Slurm's sbatch: runs every array task of the script, one after the other.
script="${@: -1}"
printf '%s\n' "$@" >> "$(dirname "$0")/sbatch.calls"
offset=0
for arg in "$@"; do [[ $arg == --export=*RUN_OFFSET=* ]] && offset=${arg##*RUN_OFFSET=}; done
array=$(sed -n 's/^#SBATCH --array=0-\([0-9]*\).*/\1/p' "$script")
if [ -z "$array" ]; then bash "$script" > /dev/null 2>&1 || exit 1
else
  for i in $(seq 0 "$array"); do
    SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_JOB_ID=4242 SLURM_JOB_ID=$((4243 + i)) \
      SLURM_NODELIST=localhost SLURM_NODEID=0 RUN_OFFSET=$offset \
      bash "$script" >> "$(dirname "$0")/tasks.log" 2>&1 || exit 1
  done
fi
echo "Submitted batch job 4242"
"""


FAKE_SCONTROL = """#!/usr/bin/env bash
# Stands in for `scontrol show hostnames NODELIST`: one node, this machine.
echo localhost
"""


def fingerprint(work: Path) -> str:
    return TokenDataset(work / "tokenize" / "dataset.zarr").attrs["fingerprint"]


def with_executor(config: Path, executor: dict) -> Path:
    raw = yaml.safe_load(config.read_text())
    raw["executor"] = executor
    config.write_text(yaml.safe_dump(raw))
    return config


def test_slurm_executor_writes_sbatch_scripts_whose_tasks_build_the_same_dataset(
        prepared: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (("sbatch", FAKE_SBATCH), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    work = tmp_path / "work"
    config = with_executor(small_config(tmp_path / "c.yaml", work), {
        "kind": "slurm", "tasks": 3, "poll_s": 0.2,
        "slurm": {"partition": "cpu-long", "time": "01:00:00", "cpus_per_task": 2,
                  "sbatch_args": {"account": "forge-team"}},
    })
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    forge("prepare", "--config", str(config), "--quiet", env=env)

    assert fingerprint(work) == fingerprint(prepared)
    scripts = sorted(work.glob("*/executor/*/launch_script.slurm"))
    assert {p.parts[-4] for p in scripts} >= {"download", "extract", "tokenize"}
    script = scripts[0].read_text()
    for directive in ("#SBATCH --partition=cpu-long", "#SBATCH --time=01:00:00",
                      "#SBATCH --cpus-per-task=2", "#SBATCH --array=0-2",
                      "#SBATCH --account=forge-team", "#SBATCH --job-name=forge-data-"):
        assert directive in script, directive
    assert f"source {Path(sys.prefix) / 'bin' / 'activate'}" in script
    assert "launch_pickled_pipeline" in script
    assert "Submitted" not in (bin_dir / "sbatch.calls").read_text()


@pytest.fixture
def ray_cluster(tmp_path: Path):
    """A real local Ray head node, started the way a user starts one."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray is None:
        pytest.fail("ray is not installed; `pip install -e '.[dev]'` installs it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = Path("/tmp") / f"ray-{port}"  # Ray's socket paths must stay short
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                    "--object-store-memory=200000000", f"--temp-dir={temp}"],
                   check=True, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_executor_gives_the_local_fingerprint(prepared: Path, tmp_path: Path,
                                                   ray_cluster: str) -> None:
    work = tmp_path / "work"
    config = with_executor(small_config(tmp_path / "c.yaml", work),
                           {"kind": "ray", "ray_address": ray_cluster, "tasks": 2})
    forge("prepare", "--config", str(config), "--quiet")
    assert fingerprint(work) == fingerprint(prepared)
    assert list((work / "extract" / "executor").glob("*/stats/*.json"))  # datatrove ran it

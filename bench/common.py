"""Shared helpers of the benchmarks: paths, timing, the machine description, tables, JSON.

A benchmark here measures its sides interleaved in one run (the machine is shared and
noisy), keeps every repetition, reports the median, and writes all of it to a JSON file
under bench/results/ together with the machine and the inputs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/, not the repository, first
    sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"
VOCAB_DIR = DATA / "gpt2-bpe"


@dataclass
class Timing:
    """One measurement: wall seconds, and CPU seconds of this process and its reaped children."""

    wall_s: float
    cpu_s: float


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(fn: Callable[[], Any]) -> tuple[Timing, Any]:
    """Run `fn` once; return its timing and its result."""
    cpu, wall = _cpu_seconds(), time.perf_counter()
    result = fn()
    wall = time.perf_counter() - wall
    return Timing(round(wall, 4), round(_cpu_seconds() - cpu, 4)), result


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def summarize(timings: Sequence[Timing]) -> dict:
    """Every repetition plus the medians, as JSON-ready data."""
    return {
        "runs": [asdict(t) for t in timings],
        "median_wall_s": round(median(t.wall_s for t in timings), 4),
        "median_cpu_s": round(median(t.cpu_s for t in timings), 4),
    }


def rotated(items: Sequence[str], rep: int) -> list[str]:
    """The sides in a different order each repetition, so drifting load hits each of them."""
    k = rep % len(items)
    return list(items[k:]) + list(items[:k])


# ---------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> str | None:
    """The checked-out commit (read only), with '+dirty' when the tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")


def machine_info(packages: Sequence[str]) -> dict:
    """What the figures were measured on."""
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "packages": {name: package_version(name) for name in packages},
        "forge_revision": git_revision(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---------------------------------------------------------------- output


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table: first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def write_json(path: Path, payload: dict) -> None:
    """Write atomically (a .tmp sibling, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"\nresults written to {path}")

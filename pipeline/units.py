"""A unit of work: its payload, its result (the document accounting), and how one is run.

A unit function writes its own outputs atomically and returns a `UnitResult`;
`run_and_record` then commits the record that marks the unit done. The local worker pool
(pipeline/contract.py) and the cluster executors (pipeline/executors.py) both run units
through it.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.files import atomic_write_json


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
    if delay := float(os.environ.get("FORGE_TEST_UNIT_DELAY", "0")):
        time.sleep(delay)
    atomic_write_json(Path(record), result)
    return result

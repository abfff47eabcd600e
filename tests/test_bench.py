"""Every benchmark stays runnable: `make bench-smoke` runs each one (bench/smoke.py); here, the
quick part: each script has a smoke line and imports and parses its arguments."""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in ("common.py", "smoke.py"))


def smoke_table() -> dict[str, list[str]]:
    sys.path.insert(0, str(BENCH))  # smoke.py imports its neighbour common.py, as when run
    try:
        spec = importlib.util.spec_from_file_location("bench_smoke", BENCH / "smoke.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module.SMOKE


def test_every_benchmark_has_a_smoke_run() -> None:
    assert sorted(smoke_table()) == SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_imports_and_parses_its_arguments(script: str, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # as `python bench/<script>` puts it first
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out

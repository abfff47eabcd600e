"""Prefect's overhead: the prepare-data flow against the same stage functions called directly.

Both sides prepare the same corpus (configs/demo.yaml by default) into a fresh work folder,
interleaved in one run (the order rotates each repetition), in this process; the flow talks
to a real `forge server` started here first (its start-up is reported, not counted: a server
runs for days). The machine is shared, so the stages' own time varies from run to run by more
than Prefect costs. The overhead is therefore the time spent outside the stage functions (run
wall time minus the stages' own `wall_seconds` from their manifests), flow minus direct; the
plain wall and CPU times are reported beside it. Also reported: the import of Prefect and the
flows, the start-up of an embedded server (`forge run` with no server), and a rerun of the
finished work both ways (the flow: every stage a cache hit; directly: every stage a no-op).
Goal (the issue): overhead under 10% of the direct run or under 15 s, whichever is larger.
Run: .venv/bin/python bench/prefect_overhead.py  ->  bench/results/prefect_overhead.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    REPO,
    RESULTS,
    Timing,
    machine_info,
    measure,
    median,
    print_table,
    rotated,
    summarize,
    write_json,
)

# Heavy imports (pipeline, prefect) stay inside functions: the stages' spawned workers
# re-import this script, and must not pay for what only the parent needs.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml",
                        help="run config whose sources are prepared (paths relative to the repo)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side (median)")
    parser.add_argument("--out", type=Path, default=RESULTS / "prefect_overhead.json")
    return parser.parse_args(argv)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str, float]:
    """`forge server` on a free port; (process, API URL, seconds until healthy)."""
    from flows.settings import server_is_up

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "server", "--port", str(port), "--home", str(home)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    while not server_is_up(api):
        if process.poll() is not None or time.perf_counter() - started > 300:
            raise RuntimeError("forge server did not become healthy")
        time.sleep(0.5)
    return process, api, time.perf_counter() - started


def embedded_startup(home: Path) -> float:
    """Seconds for a trivial flow in a fresh process with no server: the embedded start-up."""
    from flows.settings import prefect_environment

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(prefect_environment(home))
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    code = "from prefect import flow\nflow(lambda: 1, name='noop')()"
    bare = "import prefect"
    times = {}
    for label, script in (("import", bare), ("flow", code)):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", script], env=env, check=True,
                       capture_output=True)
        times[label] = time.perf_counter() - started
    return times["flow"] - times["import"]


def direct(cfg) -> dict:
    """What `forge prepare` does: the stage functions in order."""
    from pipeline.registry import prepare_stages, stage_function

    return {name: stage_function(name)(cfg) for name in prepare_stages(cfg)}


def with_prefect(cfg) -> dict:
    from flows.stages import prepare_data

    return prepare_data(config=cfg)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)  # the demo config's paths (../shared/data/...) are relative to the repo root
    machine = machine_info(["forge", "prefect", "datatrove", "trafilatura", "tiktoken"])
    scratch = Path(tempfile.mkdtemp(prefix="forge-bench-prefect-"))
    server = None
    try:
        server, api, server_s = start_server(scratch / "server-home")
        print(f"forge server healthy after {server_s:.1f} s (not counted)", flush=True)
        embedded_s = embedded_startup(scratch / "embedded-home")
        print(f"embedded server start-up: {embedded_s:.1f} s (not counted)", flush=True)

        from flows.settings import apply_environment, prefect_environment

        apply_environment(prefect_environment(scratch / "client-home", api))
        import_timing, _ = measure(lambda: __import__("flows.stages"))
        from configs.run import data_config, load_run_config
        from pipeline.registry import prepare_stages, stage_function

        def load_config(path: Path, overrides: dict) -> object:
            return data_config(load_run_config(path, overrides))

        for name in prepare_stages(load_config(args.config, {})):
            stage_function(name)  # imported before timing: the first side would pay for it

        sides = {"direct": direct, "prefect": with_prefect}
        timings: dict[str, list[Timing]] = {side: [] for side in sides}
        reruns: dict[str, list[Timing]] = {side: [] for side in sides}
        outside: dict[str, list[float]] = {side: [] for side in sides}
        fingerprints: dict[str, set[str]] = {side: set() for side in sides}
        for rep in range(args.repeats):
            for side in rotated(list(sides), rep):
                work = scratch / f"{side}-{rep}"
                cfg = load_config(args.config, {"workdir": str(work), "workers": args.workers})
                cfg = cfg.model_copy(update={"workdir": str(work.resolve())})
                timing, result = measure(lambda side=side, cfg=cfg: sides[side](cfg))
                timings[side].append(timing)
                fingerprints[side].add(result["tokenize"]["output_fingerprint"])
                in_stages = sum(m["wall_seconds"] for m in result.values())
                outside[side].append(round(timing.wall_s - in_stages, 3))
                rerun, _ = measure(lambda side=side, cfg=cfg: sides[side](cfg))
                reruns[side].append(rerun)
                print(f"  rep {rep + 1}/{args.repeats} {side}: {timing.wall_s:.1f} s wall "
                      f"({outside[side][-1]:.1f} s outside the stages), {timing.cpu_s:.1f} s "
                      f"cpu; rerun {rerun.wall_s:.2f} s", flush=True)
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
        shutil.rmtree(scratch, ignore_errors=True)

    assert fingerprints["direct"] == fingerprints["prefect"], fingerprints
    summary = {side: summarize(timings[side]) for side in sides}
    rerun_summary = {side: summarize(reruns[side]) for side in sides}
    base = summary["direct"]["median_wall_s"]
    outside_median = {side: median(outside[side]) for side in sides}
    overhead = outside_median["prefect"] - outside_median["direct"]
    wall_difference = summary["prefect"]["median_wall_s"] - base
    cpu_overhead = summary["prefect"]["median_cpu_s"] - summary["direct"]["median_cpu_s"]
    allowed = max(0.10 * base, 15.0)
    rows = [[side, f"{summary[side]['median_wall_s']:.1f}", f"{outside_median[side]:.2f}",
             f"{summary[side]['median_cpu_s']:.1f}", f"{rerun_summary[side]['median_wall_s']:.2f}"]
            for side in sides]
    print_table(f"prepare-data on {args.config.name}, workers={args.workers}, median of "
                f"{args.repeats}", ["side", "wall s", "outside stages s", "cpu s",
                                    "rerun wall s"], rows)
    print(f"\noverhead (time outside the stage functions, flow minus direct): {overhead:.2f} s "
          f"= {overhead / base:.1%} of the direct run; goal under {allowed:.1f} s: "
          f"{'met' if overhead < allowed else 'NOT met'}")
    print(f"plain difference of the median wall times: {wall_difference:+.1f} s (load noise); "
          f"cpu: {cpu_overhead:+.1f} s")
    print(f"not counted: import of prefect and the flows {import_timing.wall_s:.1f} s, "
          f"server start-up {server_s:.1f} s, embedded server start-up {embedded_s:.1f} s")
    write_json(args.out, {
        "benchmark": "prefect_overhead",
        "machine": machine,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "config": str(args.config),
        "workers": args.workers,
        "repeats": args.repeats,
        "fingerprint": next(iter(fingerprints["direct"])),
        "sides": summary,
        "reruns": rerun_summary,
        "outside_stages_s": {side: outside[side] for side in sides},
        "overhead_s": round(overhead, 3),
        "overhead_fraction": round(overhead / base, 4),
        "median_wall_difference_s": round(wall_difference, 3),
        "overhead_cpu_s": round(cpu_overhead, 3),
        "goal_s": round(allowed, 3),
        "goal_met": overhead < allowed,
        "not_counted": {"import_prefect_and_flows_s": import_timing.wall_s,
                        "server_startup_s": round(server_s, 3),
                        "embedded_server_startup_s": round(embedded_s, 3)},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`prepare` end to end on the whole demo corpus: wall time by stage and MB/s per core.

Runs the stages `forge prepare` runs (download, the enabled document stages, tokenize),
through the same functions the command calls, with the sources of configs/demo.yaml, a
fresh work folder in a temporary directory for every repetition and `--workers` processes,
once per HTML extractor (`extract.html_extractor`, `--extractors`), the sides interleaved.
Reports, per extractor, each stage's wall time and share, the MB/s of extracted text per core
(per worker) over the whole run, and the extraction time per source (from
<workdir>/extract/units/*.json).
Run: .venv/bin/python bench/prepare_throughput.py  ->  bench/results/prepare_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from common import REPO, RESULTS, machine_info, measure, median, print_table, rotated, write_json

# Heavy imports (pipeline) stay inside functions: the stages' spawned workers re-import
# this script, and must not pay for what only the parent needs.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        type=Path,
        default=REPO / "configs" / "demo.yaml",
        help="run config whose sources are prepared (its paths are relative to the repo)",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--repeats", type=int, default=1, help="end-to-end runs per side (median)")
    parser.add_argument("--extractors", default="trafilatura,resiliparse",
                        help="the sides: comma-separated extract.html_extractor values")
    parser.add_argument("--goal", type=float, default=2.0, help="MB of text per s per core")
    parser.add_argument("--out", type=Path, default=RESULTS / "prepare_throughput.json")
    parser.add_argument("--keep", action="store_true", help="keep each side's last work folder")
    return parser.parse_args(argv)


def run_prepare(cfg) -> tuple[dict[str, dict], dict[str, dict]]:
    """What `forge prepare` does, stage by stage; (timings, manifests) by stage name."""
    from pipeline.registry import prepare_stages, stage_function

    timings, manifests = {}, {}
    for name in prepare_stages(cfg):
        fn = stage_function(name)
        timing, manifests[name] = measure(lambda fn=fn: fn(cfg))
        timings[name] = {"wall_s": timing.wall_s, "cpu_s": timing.cpu_s}
    return timings, manifests


def extraction_by_source(workdir: Path) -> dict[str, dict]:
    """Sum the extract unit records per source (a unit id is its downloaded file's name)."""
    from pipeline.files import read_json, safe_name

    download = read_json(workdir / "download" / "manifest.json")
    source_of = {
        safe_name(f["path"].replace("/", "__"), limit=150): f["source"] for f in download["files"]
    }
    totals: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    files: dict[str, set] = defaultdict(set)
    for path in sorted((workdir / "extract" / "units").glob("*.json")):
        file_id = path.stem.split("@")[0]  # an archive's slices are <file>@<first member>
        source = source_of.get(file_id, "?")
        record = json.loads(path.read_text())
        files[source].add(file_id)
        row = totals[source]
        row["units"] += 1
        for key in ("docs_in", "docs_out", "bytes_in", "bytes_out", "seconds"):
            row[key] += record[key]
    all_seconds = sum(row["seconds"] for row in totals.values()) or 1.0
    result = {}
    for source, row in sorted(totals.items(), key=lambda kv: -kv[1]["seconds"]):
        seconds = row["seconds"]
        result[source] = {
            **row,
            "files": len(files[source]),
            "seconds": round(seconds, 3),
            "share_of_extract_work": round(seconds / all_seconds, 4),
            "text_mb_per_s": round(row["bytes_out"] / 1e6 / seconds, 3) if seconds else None,
        }
    return result


def summarize_stages(runs: list[dict], manifests: dict[str, dict]) -> dict[str, dict]:
    walls = {s: median(r[s]["wall_s"] for r in runs) for s in manifests}
    total = sum(walls.values())
    return {
        s: {
            "median_wall_s": round(walls[s], 3),
            "median_cpu_s": round(median(r[s]["cpu_s"] for r in runs), 3),
            "share_of_wall": round(walls[s] / total, 4),
            **{
                key: m.get(key)
                for key in ("units", "unit_seconds", "docs_in", "docs_out", "dropped")
                + ("bytes_in", "bytes_out")
            },
        }
        for s, m in manifests.items()
    }


def print_report(title: str, stages: dict, total: float, by_source: dict) -> None:
    rows = [
        [
            s,
            f"{r['median_wall_s']:.2f}",
            f"{r['share_of_wall']:.0%}",
            f"{r['median_cpu_s']:.2f}",
            r["units"],
            r["docs_in"],
            r["docs_out"],
            f"{r['bytes_in'] / 1e6:.1f}",
            f"{r['bytes_out'] / 1e6:.1f}",
        ]
        for s, r in stages.items()
    ]
    cpu = sum(r["median_cpu_s"] for r in stages.values())
    rows.append(["total", f"{total:.2f}", "100%", f"{cpu:.2f}", "", "", "", "", ""])
    header = ["stage", "wall s", "share", "cpu s", "units", "in", "out", "MB in", "MB out"]
    print_table(title, header, rows)
    rows = [
        [
            source,
            r["files"],
            r["units"],
            r["docs_out"],
            r["docs_in"] - r["docs_out"],
            f"{r['bytes_in'] / 1e6:.2f}",
            f"{r['bytes_out'] / 1e6:.2f}",
            f"{r['seconds']:.2f}",
            f"{r['share_of_extract_work']:.0%}",
            "-" if r["text_mb_per_s"] is None else f"{r['text_mb_per_s']:.2f}",
        ]
        for source, r in by_source.items()
    ]
    header = ["source", "files", "units", "docs", "dropped", "MB in", "MB text", "unit s"]
    header += ["share", "text MB/s"]
    print_table(
        "extraction by source (last run; unit seconds summed; MB in = files as downloaded)",
        header,
        rows,
    )


def run_side(args: argparse.Namespace, extractor: str) -> tuple[dict, dict, dict]:
    """One end-to-end `prepare` in a fresh work folder: (timings, manifests, by source)."""
    from configs.run import data_config, load_run_config

    tmp = Path(tempfile.mkdtemp(prefix=f"forge-bench-prepare-{extractor}-"))
    overrides = {"workdir": str(tmp / "work"), "workers": args.workers}
    cfg = data_config(load_run_config(args.config, overrides))
    cfg.data.extract.html_extractor = extractor
    try:
        timings, manifests = run_prepare(cfg)
        by_source = extraction_by_source(Path(cfg.workdir))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return timings, manifests, by_source


def summarize_side(runs: list[dict], manifests: dict, workers: int, goal: float) -> dict:
    total = median(sum(t["wall_s"] for t in r.values()) for r in runs)
    cpu = median(sum(t["cpu_s"] for t in r.values()) for r in runs)
    text_bytes = manifests["extract"]["bytes_out"]
    tokens = sum(s["tokens"] for s in manifests["tokenize"]["splits"].values())
    per_core = text_bytes / 1e6 / total / workers
    return {
        "median_total_wall_s": round(total, 3),
        "median_total_cpu_s": round(cpu, 3),
        "text_bytes": text_bytes,
        "tokens": tokens,
        # per CPU second: what a core does when it is not shared (the wall figure is not)
        "text_mb_per_cpu_s": round(text_bytes / 1e6 / cpu, 3),
        "text_mb_per_s": round(text_bytes / 1e6 / total, 3),
        "text_mb_per_s_per_core": round(per_core, 3),
        "goal_mb_per_s_per_core": goal,
        "goal_met": per_core >= goal,
        "input_file_mb_per_s": round(manifests["download"]["bytes_out"] / 1e6 / total, 3),
        "tokens_per_s": round(tokens / total),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.config = args.config.resolve()
    os.chdir(REPO)  # the demo config's paths (../shared/data/...) are relative to the repo root
    extractors = [e.strip() for e in args.extractors.split(",") if e.strip()]
    packages = ["forge", "tiktoken", "resiliparse", "trafilatura", "datatrove", "numpy", "zarr"]
    machine = machine_info(packages + ["warcio", "zstandard"])
    runs: dict[str, list[dict]] = {e: [] for e in extractors}
    manifests: dict[str, dict] = {}
    by_source: dict[str, dict] = {}
    for rep in range(args.repeats):
        for extractor in rotated(extractors, rep):
            timings, manifests[extractor], by_source[extractor] = run_side(args, extractor)
            runs[extractor].append(timings)
            walls = ", ".join(f"{k} {t['wall_s']:.2f}" for k, t in timings.items())
            total = sum(t["wall_s"] for t in timings.values())
            print(f"  rep {rep + 1}/{args.repeats} {extractor}: {walls}; total {total:.2f} s",
                  flush=True)

    sides = {}
    for e in extractors:
        stages = summarize_stages(runs[e], manifests[e])
        throughput = summarize_side(runs[e], manifests[e], args.workers, args.goal)
        sides[e] = {"runs": runs[e], "stages": stages, "throughput": throughput,
                    "extraction_by_source": by_source[e]}
        m = manifests[e]
        title = (
            f"prepare with html_extractor={e}, {args.config.name}: "
            f"{m['download']['bytes_out'] / 1e6:.1f} MB of input files, "
            f"{throughput['text_bytes'] / 1e6:.1f} MB of extracted text, "
            f"{throughput['tokens']:,} tokens; workers={args.workers}, median of {args.repeats}"
        )
        print_report(title, stages, throughput["median_total_wall_s"], by_source[e])

    rows = [[e, f"{t['median_total_wall_s']:.1f}", f"{t['median_total_cpu_s']:.1f}",
             f"{t['text_bytes'] / 1e6:.1f}", f"{t['text_mb_per_s']:.2f}",
             f"{t['text_mb_per_s_per_core']:.2f}", f"{t['text_mb_per_cpu_s']:.2f}",
             f"{sides[e]['stages']['extract']['share_of_wall']:.0%}",
             "yes" if t["goal_met"] else "NO"]
            for e, t in ((e, sides[e]["throughput"]) for e in extractors)]
    header = ["extractor", "wall s", "cpu s", "MB text", "MB/s", "MB/s/core", "MB/cpu s",
              "extract share", f">= {args.goal} MB/s/core"]
    print_table(f"prepare side by side (workers={args.workers}; busy shared machine)", header,
                rows)

    write_json(
        args.out,
        {
            "benchmark": "prepare_throughput",
            "machine": machine,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "inputs": {
                "config": str(args.config),
                "config_text": args.config.read_text(),
                "stages": list(next(iter(manifests.values()))),
                "workers": args.workers,
                "repeats": args.repeats,
                "extractors": extractors,
                "input_files": next(iter(manifests.values()))["download"]["docs_out"],
                "input_file_bytes": next(iter(manifests.values()))["download"]["bytes_out"],
            },
            "sides": sides,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

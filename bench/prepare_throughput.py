"""`prepare` end to end on the whole demo corpus: wall time by stage and MB/s per worker.

Runs the stages `forge prepare` runs (download, the enabled document stages, tokenize),
through the same functions the command calls, with the sources of configs/demo.yaml, a
fresh work folder in a temporary directory for every repetition and `--workers` processes.
Reports each stage's wall time and share, the MB/s of extracted text per worker over the
whole run, and the extraction time per source (from <workdir>/extract/units/*.json).
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

from common import REPO, RESULTS, machine_info, measure, median, print_table, write_json

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
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end runs (median)")
    parser.add_argument("--out", type=Path, default=RESULTS / "prepare_throughput.json")
    parser.add_argument("--keep", action="store_true", help="keep the last work folder")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from configs.run import data_config, load_run_config

    args.config = args.config.resolve()
    os.chdir(REPO)  # the demo config's paths (../shared/data/...) are relative to the repo root
    packages = ["forge", "tiktoken", "trafilatura", "datatrove", "numpy", "zarr", "warcio"]
    machine = machine_info(packages + ["zstandard"])
    runs: list[dict] = []
    for rep in range(args.repeats):
        tmp = Path(tempfile.mkdtemp(prefix="forge-bench-prepare-"))
        cfg = data_config(load_run_config(
            args.config, {"workdir": str(tmp / "work"), "workers": args.workers}))
        try:
            timings, manifests = run_prepare(cfg)
            by_source = extraction_by_source(Path(cfg.workdir))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        runs.append(timings)
        walls = ", ".join(f"{k} {t['wall_s']:.2f}" for k, t in timings.items())
        total = sum(t["wall_s"] for t in timings.values())
        print(f"  rep {rep + 1}/{args.repeats}: {walls}; total {total:.2f} s", flush=True)
        if args.keep and rep == args.repeats - 1:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    stages = summarize_stages(runs, manifests)
    total = median(sum(t["wall_s"] for t in r.values()) for r in runs)
    input_bytes = manifests["download"]["bytes_out"]
    text_bytes = manifests["extract"]["bytes_out"]
    tokens = sum(s["tokens"] for s in manifests["tokenize"]["splits"].values())
    cpu = median(sum(t["cpu_s"] for t in r.values()) for r in runs)
    throughput = {
        "median_total_wall_s": round(total, 3),
        "median_total_cpu_s": round(cpu, 3),
        # per CPU second: what a core does when it is not shared (the wall figure is not)
        "text_mb_per_cpu_s": round(text_bytes / 1e6 / cpu, 3),
        "text_mb_per_s": round(text_bytes / 1e6 / total, 3),
        "text_mb_per_s_per_worker": round(text_bytes / 1e6 / total / args.workers, 3),
        "input_file_mb_per_s": round(input_bytes / 1e6 / total, 3),
        "tokens_per_s": round(tokens / total),
    }

    title = (
        f"prepare, {args.config.name}: {input_bytes / 1e6:.1f} MB of input files, "
        f"{text_bytes / 1e6:.1f} MB of extracted text, {tokens:,} tokens; "
        f"workers={args.workers}, median of {args.repeats}"
    )
    print_report(title, stages, total, by_source)
    print(
        f"\nthroughput: {throughput['text_mb_per_s']:.2f} MB/s of extracted text, "
        f"{throughput['text_mb_per_s_per_worker']:.2f} MB/s per worker ({args.workers} workers), "
        f"{throughput['tokens_per_s'] / 1e6:.2f} M tokens/s; "
        f"{throughput['text_mb_per_cpu_s']:.2f} MB of text per CPU second"
    )

    write_json(
        args.out,
        {
            "benchmark": "prepare_throughput",
            "machine": machine,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "inputs": {
                "config": str(args.config),
                "config_text": args.config.read_text(),
                "stages": list(manifests),
                "workers": args.workers,
                "repeats": args.repeats,
                "input_files": manifests["download"]["docs_out"],
                "input_file_bytes": input_bytes,
                "text_bytes": text_bytes,
                "tokens": tokens,
            },
            "runs": runs,
            "stages": stages,
            "throughput": throughput,
            "extraction_by_source": by_source,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Runs every benchmark in bench/ once with its smallest arguments: does each still run?

`make bench-smoke` (about 10 minutes on 2 cores). Figures go to a temporary folder, so the
measurements in bench/results stay as they are. The data benchmarks run on a small corpus (one
book, the web pages, the WARC captures) instead of the whole demo corpus. A new script needs
its line in SMOKE; tests/test_bench.py checks that every script has one.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import DATA, REPO, print_table

# script -> its smallest arguments; {tmp}, {config} and {extract} are filled in by main().
# Order matters: pretrain_vs_nanogpt builds the books dataset the two after it read.
SMOKE: dict[str, list[str]] = {
    "tokenize_throughput.py": ["--repeats", "1", "--sides", "forge,tiktoken"],
    "prepare_throughput.py": ["--config", "{config}", "--repeats", "1"],
    "extract_compare.py": ["--sources", "web-html,warc"],
    "prefect_overhead.py": ["--config", "{config}", "--repeats", "1"],
    "filter_throughput.py": ["--extract", "{extract}", "--mb-per-source", "0.1",
                             "--repeats", "1"],
    "filter_report.py": ["--extract", "{extract}", "--config", "{config}", "--examples", "1",
                         "--out-dir", "{tmp}/filter_report"],
    "dedup_quality.py": ["--web-sample", "10", "--book-sample", "3", "--embed-sample", "2"],
    "classifier_throughput.py": ["--repeats", "1"],
    "minhash_throughput.py": ["--mb", "0.2", "--repeats", "1", "--forge-passes", "1"],
    "pretrain_vs_nanogpt.py": ["--steps", "3", "--eval-windows", "8"],
    "recipe_ablation.py": ["--steps", "2", "--set", "warmup_steps=1", "--eval-windows", "8"],
    "curation.py": ["--small", "--steps", "2", "--seeds", "1337", "--eval-windows", "8"],
    "loader_throughput.py": ["--batches", "20", "--repeats", "1"],
    "train_throughput.py": ["--steps", "2", "--repeats", "1"],
    "finetune_throughput.py": ["--steps", "1", "--repeats", "1"],
    # the cache part only: the other parts train a stand-in model that later runs reuse
    "generation.py": ["--parts", "cache", "--new-tokens", "8", "--repeats", "1"],
    "generation_gpu.py": ["--device", "cpu", "--preset", "tiny", "--new-tokens", "8",
                          "--dtype", "float32", "--repeats", "1"],
    "server_throughput.py": ["--clients", "1,4", "--new-tokens", "4", "--repeats", "1"],
    # the GPU script's CPU check, on the books dataset pretrain_vs_nanogpt built
    "pretrain_gpu.py": ["--device", "cpu", "--dtype", "float32", "--no-compile", "--preset",
                        "tiny", "--tokens", "20000", "--total-batch", "1024", "--micro-batch",
                        "8", "--compile-steps", "1", "--eval-batches", "2"],
}
NO_OUT_FLAG = {"filter_report.py"}  # it writes a folder of reports (--out-dir above)

SMALL_SOURCES = [
    {"name": "books", "uri": str(DATA / "books" / "the-verdict.txt")},
    {"name": "web-html", "uri": str(DATA / "html" / "trafilatura-cache-*.html.gz")},
    {"name": "warc", "uri": str(DATA / "warc" / "*.warc*")},
]


def small_config(tmp: Path) -> Path:
    """configs/demo.yaml with a small corpus and its work folder under tmp."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["workdir"] = str(tmp / "work")
    config["data"]["sources"] = SMALL_SOURCES
    path = tmp / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(command: list[str], log: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - start


def main() -> int:
    chosen = sys.argv[1:] or list(SMOKE)  # `bench/smoke.py a.py b.py`: only those
    unknown = sorted(set(chosen) - set(SMOKE))
    if unknown:
        print(f"no smoke line for {', '.join(unknown)}; choose from {', '.join(SMOKE)}")
        return 2
    with tempfile.TemporaryDirectory(prefix="forge-bench-smoke-") as name:
        tmp = Path(name)
        config = small_config(tmp)
        forge = str(Path(sys.executable).parent / "forge")
        for stage in ("download", "extract"):  # the filter benchmarks read extract's output
            code, _ = run([forge, stage, "--config", str(config), "--quiet"], tmp / "prep.log")
            if code:
                print((tmp / "prep.log").read_text())
                return 1
        fill = {"tmp": str(tmp), "config": str(config), "extract": str(tmp / "work" / "extract")}
        rows, failed = [], []
        for script in chosen:
            args = SMOKE[script]
            command = [sys.executable, f"bench/{script}", *(a.format(**fill) for a in args)]
            if script not in NO_OUT_FLAG:
                command += ["--out", str(tmp / f"{Path(script).stem}.json")]
            log = tmp / f"{script}.log"
            print(f"running {script} ...", flush=True)
            code, seconds = run(command, log)
            rows.append([script, "ok" if code == 0 else f"FAILED ({code})", f"{seconds:.0f}"])
            if code:
                failed.append(script)
                print(log.read_text()[-3000:], flush=True)
        print_table("bench smoke: every script with its smallest arguments",
                    ["script", "result", "seconds"], rows)
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

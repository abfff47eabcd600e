"""Tokenize throughput on the books: forge's tokenize stage against its bounds, side by side.

Sides, each with the same number of processes or threads (`--workers`), interleaved in
one run and repeated (median reported):
  forge     `pipeline.tokenize.run_tokenize` on an extract folder made beforehand (download
            and extract are not timed; each repetition starts from a fresh tokenize folder)
  tiktoken  `encode_ordinary_batch(texts, num_threads=workers)` on the same documents, already
            in memory, EOT appended per document: the upper bound
  datatrove `DocumentTokenizer` (HF tokenizers, GPT-2 built offline from the same vocab.bpe
            and encoder.json) under `LocalPipelineExecutor(tasks=workers, workers=workers)`

forge's and tiktoken's tokens must agree exactly (count, and sha256 per extracted part).
Run: .venv/bin/python bench/tokenize_throughput.py  ->  bench/results/tokenize_throughput.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import (
    DATA,
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

# Heavy imports (pipeline, numpy, datatrove, tokenizers) stay inside functions: the stage's
# spawned workers re-import this script, and must not pay for what only the parent needs.

EOT = "<|endoftext|>"
SIDES = ("forge", "tiktoken", "datatrove")
GOALS = {"forge/tiktoken": 0.9, "forge/datatrove": 4.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="processes (threads) per side")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per side")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=1_000_000,
        help="forge's tokenize.shard_tokens (configs/demo.yaml uses 1M)",
    )
    parser.add_argument(
        "--sides",
        default="forge,tiktoken,datatrove",
        help="comma-separated subset of forge,tiktoken,datatrove",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "tokenize_throughput.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    return parser.parse_args(argv)


def books_config(workdir: Path, data: Path, workers: int, shard_tokens: int):
    """A forge config over the books (every *.txt.gz plus the-verdict.txt), tokenized straight
    from the extract stage: optional document stages (filter, ...) are switched off."""
    from pipeline.config import DataConfig, validate_config

    optional = {
        name: {"enabled": False}
        for name, field in DataConfig.model_fields.items()
        if "enabled" in getattr(field.annotation, "model_fields", {})
    }
    return validate_config(
        {
            "workdir": str(workdir),
            "workers": workers,
            "data": {
                "sources": [
                    {"name": "books", "uri": str(data / "books" / "*.txt.gz")},
                    {"name": "books", "uri": str(data / "books" / "the-verdict.txt")},
                ],
                "tokenize": {"vocab_dir": str(data / "gpt2-bpe"), "shard_tokens": shard_tokens},
                **optional,
            },
        }
    )


def prepare_documents(cfg) -> dict:
    """Download and extract (not timed); return the extracted documents grouped by part."""
    from pipeline.download import run_download
    from pipeline.extract import run_extract
    from pipeline.files import read_json

    started = time.perf_counter()
    run_download(cfg)
    extract = run_extract(cfg)
    extract_dir = Path(cfg.workdir) / "extract"
    parts = []
    for part in read_json(extract_dir / "manifest.json")["parts"]:
        with open(extract_dir / part["file"], encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        parts.append({"unit": part["unit"], "texts": texts})
    return {
        "parts": parts,
        "extract_dir": extract_dir,
        "docs": extract["docs_out"],
        "setup_seconds": round(time.perf_counter() - started, 2),
    }


# ---------------------------------------------------------------- the sides


def run_forge(cfg, phases: dict[str, float]) -> dict:
    """The real stage (in a fresh tokenize folder: see `clear_forge`); `phases` gets each
    Stage.run_units' wall."""
    from pipeline.tokenize import run_tokenize

    phases.clear()
    return run_tokenize(cfg)


def clear_forge(cfg) -> None:
    """Remove the previous repetition's tokenize folder (untimed: the stage does not do it)."""
    shutil.rmtree(Path(cfg.workdir) / "tokenize", ignore_errors=True)


def instrument_run_units(phases: dict[str, float]) -> None:
    """Time each Stage.run_units call (in this process only; the stage's code is unchanged)."""
    from pipeline.contract import Stage

    original = Stage.run_units

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            phases[self.name] = phases.get(self.name, 0.0) + time.perf_counter() - started

    Stage.run_units = timed


def run_tiktoken(texts: list[str], workers: int, vocab_dir: Path) -> list[list[int]]:
    from pipeline.encoding import EOT_ID, get_encoding

    ids = get_encoding(str(vocab_dir)).encode_ordinary_batch(texts, num_threads=workers)
    for doc in ids:
        doc.append(EOT_ID)
    return ids


def build_hf_tokenizer(vocab_dir: Path, dest: Path) -> Path:
    """GPT-2 as an HF `tokenizers` tokenizer.json, built offline from encoder.json + vocab.bpe.

    datatrove's `load_tokenizer` takes a path to a tokenizer.json file (`Tokenizer.from_file`)
    and falls back to the Hub only for a name, so a local file keeps it offline.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(
        models.BPE.from_file(str(vocab_dir / "encoder.json"), str(vocab_dir / "vocab.bpe"))
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([EOT])
    check = tokenizer.encode("Hello world").ids
    if check != [15496, 995] or tokenizer.token_to_id(EOT) != 50256:
        raise RuntimeError(f"the HF GPT-2 tokenizer built from {vocab_dir} is wrong: {check}")
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@contextmanager
def redirect_stderr_fd(path: Path) -> Iterator[None]:
    """Point file descriptor 2 at `path`; spawned children inherit it, so their logs go there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def run_datatrove(docs_dir: Path, tokenizer_json: Path, out: Path, workers: int) -> int:
    """DocumentTokenizer over the extract stage's JSONL parts; returns the tokens written."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    shutil.rmtree(out, ignore_errors=True)
    executor = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(docs_dir), glob_pattern="*.jsonl"),
            # no shuffling: forge does not shuffle either, and it is less work for datatrove
            DocumentTokenizer(
                str(out / "tokens"),
                tokenizer_name_or_path=str(tokenizer_json),
                eos_token=EOT,
                shuffle_documents=False,
            ),
        ],
        tasks=workers,
        workers=workers,
        logging_dir=str(out / "logs"),
        start_method="spawn",  # as forge's stage; its workers are then this process' children
    )
    with redirect_stderr_fd(out / "stderr.log"):  # its workers log every file read at INFO
        executor.run()
    return sum(p.stat().st_size for p in (out / "tokens").glob("*.ds")) // 2  # uint16 tokens


def part_digests(ids: list[list[int]], parts: list[dict]) -> dict[str, str]:
    """sha256 of each part's tokens as uint16, the way forge's unit records hold them."""
    import numpy as np

    digests, i = {}, 0
    for part in parts:
        n = len(part["texts"])
        tokens = np.concatenate(
            [np.asarray(d, dtype=np.uint16) for d in ids[i : i + n]]
            or [np.zeros(0, dtype=np.uint16)]
        )
        digests[part["unit"]] = hashlib.sha256(tokens.tobytes()).hexdigest()
        i += n
    return digests


def forge_breakdown(timing: Timing, phases: dict[str, float], manifest: dict) -> dict:
    """Where the stage's wall time went: encoding units, writing shards, and the rest."""
    encode, shards = phases.get("tokenize", 0.0), phases.get("tokenize-shards", 0.0)
    return {
        "encode_units_s": round(encode, 3),
        "write_shards_s": round(shards, 3),
        "rest_s": round(timing.wall_s - encode - shards, 3),
        "unit_seconds_sum": manifest["unit_seconds"],
    }


def forge_digests(workdir: Path) -> dict[str, str]:
    records = sorted((workdir / "tokenize" / "units").glob("*.json"))
    return {p.stem: json.loads(p.read_text())["outputs"]["tokens_sha256"] for p in records}


# ---------------------------------------------------------------- measuring and reporting


def check_sides(spec: str) -> tuple[list[str], dict[str, str]]:
    """The sides to run, and the ones skipped with the reason (a missing package)."""
    sides = [s.strip() for s in spec.split(",") if s.strip()]
    if unknown := set(sides) - set(SIDES):
        sys.exit(f"--sides: unknown {sorted(unknown)}; choose from {', '.join(SIDES)}")
    skipped = {}
    if "datatrove" in sides:
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            skipped["datatrove"] = (
                "the `tokenizers` package (which datatrove's DocumentTokenizer uses) is not "
                "installed: .venv/bin/pip install tokenizers"
            )
            print(f"skipping the datatrove side: {skipped['datatrove']}", file=sys.stderr)
            sides.remove("datatrove")
        else:
            from datatrove.utils.logging import logger

            logger.remove()  # only warnings on the terminal; task logs go to its logging_dir
            logger.add(sys.stderr, level="WARNING")
    return sides, skipped


def side_descriptions(workers: int) -> dict[str, str]:
    return {
        "forge": "pipeline.tokenize.run_tokenize(cfg), a fresh tokenize folder each time",
        "tiktoken": f"encode_ordinary_batch(texts, num_threads={workers}), EOT appended",
        "datatrove": "JsonlReader + DocumentTokenizer(shuffle_documents=False) under "
        f"LocalPipelineExecutor(tasks={workers}, workers={workers}, start_method='spawn')",
    }


def summarize_side(timings: list[Timing], tokens: list[int], text_bytes: int, workers: int) -> dict:
    summary = summarize(timings)
    wall = summary["median_wall_s"]
    return {
        **summary,
        "tokens": tokens,
        "mb_per_s": round(text_bytes / 1e6 / wall, 3),
        "mb_per_s_per_worker": round(text_bytes / 1e6 / wall / workers, 3),
        "tokens_per_s": round(tokens[0] / wall),
    }


def compute_ratios(results: dict[str, dict]) -> dict[str, dict]:
    """Throughput ratios against their goals, plus the same by CPU seconds (no goal)."""
    ratios = {}
    for name, goal in GOALS.items():
        num, den = name.split("/")
        if num in results and den in results:
            value = results[num]["mb_per_s"] / results[den]["mb_per_s"]
            ratios[name] = {"value": round(value, 3), "goal": goal, "met": value >= goal}
            # CPU seconds for the same work: steadier than wall time on a loaded machine
            value = results[den]["median_cpu_s"] / results[num]["median_cpu_s"]
            ratios[f"{name} (cpu)"] = {"value": round(value, 3), "goal": None, "met": None}
    return ratios


def print_report(title: str, results: dict[str, dict], ratios: dict[str, dict]) -> None:
    rows = [
        [
            side,
            f"{r['median_wall_s']:.2f}",
            f"{r['median_cpu_s']:.2f}",
            f"{r['mb_per_s']:.2f}",
            f"{r['mb_per_s_per_worker']:.2f}",
            f"{r['tokens_per_s'] / 1e6:.2f}",
            f"{r['tokens'][0]:,}",
        ]
        for side, r in results.items()
    ]
    header = ["side", "wall s", "cpu s", "MB/s", "MB/s/worker", "Mtokens/s", "tokens"]
    print_table(title, header, rows)
    if ratios:
        rows = [
            [
                name,
                f"{r['value']:.2f}",
                f">= {r['goal']}" if r["goal"] else "-",
                "-" if r["met"] is None else "yes" if r["met"] else "NO",
            ]
            for name, r in ratios.items()
        ]
        title = "ratios of throughput (cpu: inverse ratio of CPU seconds for the same work)"
        print_table(title, ["ratio", "value", "goal", "met"], rows)
    if breakdown := results.get("forge", {}).get("breakdown_median"):
        title = "forge's tokenize stage: median wall s by phase (each Stage.run_units timed)"
        print_table(title, list(breakdown), [[f"{v:.2f}" for v in breakdown.values()]])


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sides, skipped = check_sides(args.sides)
    machine = machine_info(["forge", "tiktoken", "datatrove", "tokenizers", "numpy", "zarr"])
    tmp = Path(tempfile.mkdtemp(prefix="forge-bench-tokenize-"))
    try:
        return run(args, sides, skipped, tmp, machine)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, sides: list[str], skipped: dict, tmp: Path, machine: dict) -> int:
    cfg = books_config(tmp / "work", args.data, args.workers, args.shard_tokens)
    vocab_dir = args.data / "gpt2-bpe"
    print(f"preparing the books in {tmp} (download + extract, not timed) ...", flush=True)
    prepared = prepare_documents(cfg)
    parts = prepared["parts"]
    texts = [t for part in parts for t in part["texts"]]
    text_bytes = sum(len(t.encode()) for t in texts)
    print(f"{len(texts)} documents, {text_bytes / 1e6:.1f} MB of text", flush=True)

    reference = run_tiktoken(texts, args.workers, vocab_dir)  # untimed: what all must match
    ref_tokens = sum(len(d) for d in reference)
    ref_digests = part_digests(reference, parts)
    del reference
    tokenizer_json = (
        build_hf_tokenizer(vocab_dir, tmp / "hf-gpt2") if "datatrove" in sides else None
    )
    phases: dict[str, float] = {}
    instrument_run_units(phases)
    runners: dict[str, Callable[[], Any]] = {
        "forge": lambda: run_forge(cfg, phases),
        "tiktoken": lambda: run_tiktoken(texts, args.workers, vocab_dir),
        "datatrove": lambda: run_datatrove(
            prepared["extract_dir"] / "docs", tokenizer_json, tmp / "datatrove", args.workers
        ),
    }

    timings: dict[str, list[Timing]] = {s: [] for s in sides}
    tokens: dict[str, list[int]] = {s: [] for s in sides}
    breakdowns: list[dict] = []
    problems: list[str] = []
    for rep in range(args.repeats):
        for side in rotated(sides, rep):
            if side == "forge":
                clear_forge(cfg)
            timing, out = measure(runners[side])
            if side == "forge":
                count = sum(s["tokens"] for s in out["splits"].values())
                breakdowns.append(forge_breakdown(timing, phases, out))
                if forge_digests(Path(cfg.workdir)) != ref_digests:
                    problems.append(f"rep {rep + 1}: forge's tokens differ from tiktoken's")
            else:
                count = sum(len(d) for d in out) if side == "tiktoken" else out
            del out
            timings[side].append(timing)
            tokens[side].append(count)
            print(
                f"  rep {rep + 1}/{args.repeats} {side:9s} {timing.wall_s:7.2f} s wall "
                f"{timing.cpu_s:7.2f} s cpu  {count:,} tokens",
                flush=True,
            )

    results = {s: summarize_side(timings[s], tokens[s], text_bytes, args.workers) for s in sides}
    if breakdowns:
        results["forge"]["breakdown"] = breakdowns
        results["forge"]["breakdown_median"] = {
            k: round(median(b[k] for b in breakdowns), 3) for k in breakdowns[0]
        }
    for side in ("forge", "tiktoken"):
        if side in sides and any(n != ref_tokens for n in tokens[side]):
            problems.append(f"{side}: token counts {tokens[side]} != {ref_tokens}")
    datatrove_agrees = "datatrove" in sides and all(n == ref_tokens for n in tokens["datatrove"])
    ratios = compute_ratios(results)

    title = (
        f"tokenize throughput, books: {len(texts)} docs, {text_bytes / 1e6:.1f} MB, "
        f"{ref_tokens:,} tokens; workers={args.workers}, median of {args.repeats}"
    )
    print_report(title, results, ratios)
    print(
        f"\ntoken counts: forge and tiktoken {'MISMATCH' if problems else 'agree'} ({ref_tokens:,})"
    )
    if "datatrove" in sides:
        print(f"datatrove {'agrees' if datatrove_agrees else 'DIFFERS'}: {tokens['datatrove']}")
    for problem in problems:
        print(f"PROBLEM: {problem}")

    inputs = {
        "corpus": [
            str(args.data / "books" / "*.txt.gz"),
            str(args.data / "books" / "the-verdict.txt"),
        ],
        "documents": len(texts),
        "text_bytes": text_bytes,
        "reference_tokens": ref_tokens,
        "workers": args.workers,
        "repeats": args.repeats,
        "shard_tokens": args.shard_tokens,
        "sides": {s: d for s, d in side_descriptions(args.workers).items() if s in sides},
        "skipped_sides": skipped,
        "setup_seconds_untimed": prepared["setup_seconds"],
    }
    write_json(
        args.out,
        {
            "benchmark": "tokenize_throughput",
            "machine": machine,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "inputs": inputs,
            "results": results,
            "ratios": ratios,
            "token_check": {
                "forge_equals_tiktoken": not problems,
                "datatrove_equals_tiktoken": datatrove_agrees,
                "problems": problems,
            },
        },
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

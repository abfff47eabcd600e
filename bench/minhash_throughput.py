"""MinHash signature throughput, one core: forge's sketches against datatrove's signature step.

Sides, interleaved in one run on the same documents already in memory, each repeated
(median reported), each in this one process (so the figures are per core):
  forge          `pipeline.minhash.MinHasher.sketch` with the dedupe stage's defaults: word
                 3-grams, 126 permutations (42 bands x 3 rows), a bottom-k sketch (k=512) and
                 the content-defined chunks of long documents with theirs: all the stage's
                 signature unit computes per document
  forge-fineweb  the same code at FineWeb's setting: word 5-grams, 112 permutations, no
                 chunks (the bottom-k sketch is still computed)
  datatrove      `MinhashDedupSignature` (datatrove 0.10.1, FineWeb's `MinhashConfig()`: 5-grams,
                 14 buckets x 8 hashes, 64-bit xxhash), run over `Document`s: per-document
                 shingles and signature, bucket files written and sorted, its whole step
  datatrove-sig  the same step's `get_shingles` + `get_signature` only (no files)
datatrove's module is loaded from its file: importing `datatrove.pipeline.dedup` needs the
`tokenizers` package, which this project does not install. Its xxhash helper passes `str`,
which xxhash 4 refuses, so its hash function is given the UTF-8 bytes (what xxhash 3 did).
Run: .venv/bin/python bench/minhash_throughput.py  ->  bench/results/minhash_throughput.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from common import (
    DATA,
    RESULTS,
    Timing,
    machine_info,
    measure,
    print_table,
    rotated,
    summarize,
    write_json,
)

SIDES = ("forge", "forge-fineweb", "datatrove", "datatrove-sig")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--mb", type=float, default=3.0,
                        help="megabytes of text (books, then speeches and web documents)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per side")
    parser.add_argument("--forge-passes", type=int, default=10,
                        help="passes over the documents per forge measurement (it is fast; "
                        "figures are per pass)")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=RESULTS / "minhash_throughput.json")
    return parser.parse_args(argv)


def load_documents(data: Path, mb: float) -> list[str]:
    """Books and short documents, half the bytes each, read and normalized as extract does."""
    from pipeline.extract import strip_gutenberg
    from pipeline.readers import Doc, normalize_text, read_file

    def texts(paths: list[Path]):
        for path in paths:
            for item in read_file(str(path), 50_000_000):
                if isinstance(item, Doc):
                    text = normalize_text(strip_gutenberg(normalize_text(item.text)))
                    if text:
                        yield text

    books = sorted((data / "books").glob("pg*.txt.gz"))
    short = [*sorted((data / "books").glob("nltk_*.zip")), *sorted((data / "webdocs").glob("*.gz"))]
    out: list[str] = []
    for group in (books, short):
        budget = mb * 1e6 / 2
        for text in texts(group):
            if budget <= 0:
                break
            out.append(text)
            budget -= len(text.encode())
    return out


def datatrove_step():
    """datatrove's MinhashDedupSignature module, loaded without its package's __init__."""
    import datatrove
    import xxhash

    path = Path(datatrove.__file__).parent / "pipeline" / "dedup" / "minhash.py"
    spec = importlib.util.spec_from_file_location("datatrove_minhash_alone", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def make(folder: str):
        step = module.MinhashDedupSignature(output_folder=folder, config=module.MinhashConfig())
        step._hash_func = lambda text: xxhash.xxh64_intdigest(text.encode())
        return step

    return make


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sides = [s for s in args.sides.split(",") if s]
    texts = load_documents(args.data, args.mb)
    total_bytes = sum(len(t.encode()) for t in texts)
    print(f"{len(texts)} documents, {total_bytes / 1e6:.2f} MB")

    from datatrove.data import Document

    from pipeline.minhash import MinHasher

    forge = MinHasher(shingle_words=3, num_perm=126, chunk_words=500, bottom_k=512)
    fineweb = MinHasher(shingle_words=5, num_perm=112, chunk_words=0, bottom_k=512)
    make_step = datatrove_step()
    scratch = Path(tempfile.mkdtemp(prefix="forge-minhash-bench-"))
    warm = make_step(str(scratch / "warm"))
    warm.get_signature(warm.get_shingles(texts[0][:2000]))  # loads spaCy: not timed
    forge.sketch(texts[0][:2000])  # builds the character tables: not timed

    def run_forge(hasher: MinHasher):
        return lambda: [hasher.sketch(t) for _ in range(args.forge_passes) for t in texts]

    def run_datatrove(rep: int):
        def go():
            step = make_step(str(scratch / f"rep{rep}"))
            step.run(iter(Document(text=t, id=str(i)) for i, t in enumerate(texts)))
        return go

    def run_datatrove_sig():
        for t in texts:
            shingles = warm.get_shingles(t)
            if shingles.size:
                warm.get_signature(shingles)

    timings: dict[str, list] = {s: [] for s in sides}
    for rep in range(args.repeats):
        for side in rotated(sides, rep):
            fn = {"forge": run_forge(forge), "forge-fineweb": run_forge(fineweb),
                  "datatrove": run_datatrove(rep), "datatrove-sig": run_datatrove_sig}[side]
            timing, _ = measure(fn)
            if side.startswith("forge"):
                timing = Timing(round(timing.wall_s / args.forge_passes, 4),
                                round(timing.cpu_s / args.forge_passes, 4))
            timings[side].append(timing)
            print(f"  rep {rep} {side}: {timing.wall_s:.3f} s per pass")
    results = {}
    for side in sides:
        summary = summarize(timings[side])
        wall = summary["median_wall_s"]
        results[side] = {**summary, "docs_per_s": round(len(texts) / wall, 2),
                         "mb_per_s": round(total_bytes / 1e6 / wall, 3)}
    ratios = {f"{a}/{b}": round(results[a]["mb_per_s"] / results[b]["mb_per_s"], 2)
              for a in ("forge", "forge-fineweb") for b in ("datatrove", "datatrove-sig")
              if a in results and b in results}
    print_table("MinHash signatures, one core (median of the repetitions)",
                ["side", "docs/s", "MB/s", "median wall s"],
                [[s, r["docs_per_s"], r["mb_per_s"], r["median_wall_s"]]
                 for s, r in results.items()])
    for name, value in ratios.items():
        print(f"{name}: {value}x")
    write_json(args.out, {
        "benchmark": "minhash_throughput",
        "machine": machine_info(["numpy", "xxhash", "datatrove", "spacy"]),
        "documents": len(texts),
        "bytes": total_bytes,
        "processes": 1,
        "forge_passes_per_measurement": args.forge_passes,
        "sides": results,
        "ratios": ratios,
    })
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())

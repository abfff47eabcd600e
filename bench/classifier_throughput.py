"""Quality-classifier cost: scoring documents with a forge-trained fastText classifier,
against fastText language ID (which the filter already runs on every document) on the same
text, interleaved and repeated (median reported), one process (per-core figures).

The classifier is trained here as the tests train it (instruction data and 4 books as
positive, web pages and WARC as negative) unless --model names one. Documents: every book
of ../shared/data/books/pg1*.txt.gz and the web pages, read as the extract stage reads them.
A top-fraction cut scores each document twice (once before the units to find the cutoff,
once in them): its cost is twice the `classifier` row.
Run: nice .venv/bin/python bench/classifier_throughput.py
  -> bench/results/classifier_throughput.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import DATA, RESULTS, machine_info, measure, print_table, rotated, summarize, write_json

from pipeline.classifier import TrainSettings, load_classifier, read_documents, train_classifier
from pipeline.filter import predict_language


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a fastText classifier (default: train one here)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "quality.bin")
            train_classifier([str(DATA / "instruct" / "rasbt-instruction-data.json"),
                              str(DATA / "books" / "pg11*.txt.gz")],
                             [str(DATA / "webdocs" / "*"),
                              str(DATA / "warc" / "dolma-sample-*.warc.gz")], model,
                             TrainSettings())
        classifier = load_classifier(model, "hq")
        texts = [text for source in (str(DATA / "books" / "pg1*.txt.gz"),
                                     str(DATA / "webdocs" / "*"))
                 for _, text in read_documents(source)]
        mb = sum(len(t.encode()) for t in texts) / 1e6
        read_mb = sum(len(t[:100_000].encode()) for t in texts) / 1e6  # what both sides read
        sides = {
            "classifier (100k chars)": lambda: [classifier.score(t) for t in texts],
            "language ID (100k chars)": lambda: [
                predict_language(t[:100_000].replace("\n", " ").strip()) for t in texts],
        }
        timings: dict[str, list] = {name: [] for name in sides}
        for rep in range(args.repeats):
            for name in rotated(list(sides), rep):
                timings[name].append(measure(sides[name])[0])
    results = {name: summarize(runs) for name, runs in timings.items()}
    rows = [(name, f"{r['median_cpu_s']:.2f}", f"{read_mb / r['median_cpu_s']:.1f}",
             f"{len(texts) / r['median_cpu_s']:.0f}") for name, r in results.items()]
    print_table(f"scoring {len(texts)} documents of {mb:.1f} MB, {read_mb:.1f} MB read "
                f"(median of {args.repeats})",
                ["side", "CPU s", "MB read/s per core", "docs/s per core"], rows)
    write_json(RESULTS / "classifier_throughput.json", {
        "machine": machine_info(["fasttext-numpy2", "fasttext-predict"]),
        "inputs": {"documents": len(texts), "mb": round(mb, 2),
                   "mb_read": round(read_mb, 2), "model": model if args.model
                   else "trained here: instruct + pg11* books vs webdocs + dolma WARC"},
        "results": results,
        "note": "shared machine (2 cores, several agents): CPU seconds, not wall",
    })


if __name__ == "__main__":
    main()

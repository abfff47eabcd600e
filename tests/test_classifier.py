"""The learned quality score: a fastText classifier trained from labelled real documents
separates held-out ones, and the filter keeps and drops by it under its own reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DATA

from pipeline.classifier import (
    NEGATIVE,
    POSITIVE,
    TrainSettings,
    load_classifier,
    passages,
    top_fraction_cutoff,
    train_classifier,
)
from pipeline.config import ConfigError

POSITIVE_SOURCES = [str(DATA / "instruct" / "rasbt-instruction-data.json"),
                    str(DATA / "books" / "pg11*.txt.gz")]
NEGATIVE_SOURCES = [str(DATA / "webdocs" / "*"), str(DATA / "warc" / "dolma-sample-*.warc.gz")]
SMALL = TrainSettings(bucket=50_000, dim=32)  # a 6 MB model: fast to write and read


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Instruction data and books (positive) against web pages and WARC (negative)."""
    out = tmp_path_factory.mktemp("classifier") / "quality.bin"
    return out, train_classifier(POSITIVE_SOURCES, NEGATIVE_SOURCES, out, SMALL)


def test_a_trained_classifier_separates_held_out_documents(trained: tuple[Path, dict]) -> None:
    out, report = trained
    assert out.is_file() and out.with_name("quality.bin.json").is_file()
    # Held out by whole document: no passage of a test book was trained on.
    assert report["test_passages"] > 300
    assert report["precision"] >= 0.97 and report["recall"] >= 0.95
    sources = report["sources"]
    assert {s["label"] for s in sources.values()} == {POSITIVE, NEGATIVE}
    for source, row in sources.items():
        assert sum(row["histogram"]) == row["docs"] > 0
        if row["label"] == POSITIVE:
            assert row["median"] > 0.8, source
    warc = sources[NEGATIVE_SOURCES[1]]
    assert warc["median"] < 0.2 and warc["above_threshold"] <= 0.2
    classifier = load_classifier(str(out), POSITIVE)
    answer = ("To convert the temperature, multiply by nine, divide by five and add thirty-two. "
              "The result is the temperature in degrees Fahrenheit.")
    menu = "Home | Login | Cart | Free shipping on orders over $50 | Click here | Subscribe now"
    assert classifier.score(answer) > classifier.score(menu)


def test_training_is_reproducible_with_one_thread(trained: tuple[Path, dict],
                                                 tmp_path: Path) -> None:
    out, report = trained
    again = train_classifier(POSITIVE_SOURCES, NEGATIVE_SOURCES, tmp_path / "again.bin", SMALL)
    assert again["sources"] == report["sources"]


def test_passages_cut_at_paragraphs() -> None:
    text = "\n\n".join(f"paragraph {i} " + "word " * 40 for i in range(20))
    cut = passages(text, 500)
    assert len(cut) > 5 and all(p.startswith("paragraph") for p in cut)
    assert passages("short", 500) == ["short"]


def test_top_fraction_cutoff_keeps_the_top() -> None:
    scores = [0.1, 0.9, 0.5, 0.7, 0.3]
    assert top_fraction_cutoff(scores, 0.4) == 0.7
    assert top_fraction_cutoff(scores, 0.01) == 0.9  # at least one document
    assert top_fraction_cutoff(scores, 1.0) == 0.1


def test_training_refuses_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="matches no file"):
        train_classifier([str(tmp_path / "none*.txt")], NEGATIVE_SOURCES, tmp_path / "m.bin")

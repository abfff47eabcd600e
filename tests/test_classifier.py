"""The learned quality score: a fastText classifier trained from labelled real documents
separates held-out ones, and the filter keeps and drops by it under its own reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import DATA, forge, write_config

from pipeline.classifier import (
    NEGATIVE,
    POSITIVE,
    TrainSettings,
    collect_examples,
    load_classifier,
    passages,
    top_fraction_cutoff,
    train_classifier,
)
from pipeline.config import ConfigError, load_config, validate_config
from pipeline.documents import iter_documents
from pipeline.filter import rules_fingerprint, run_filter
from pipeline.tokenize import run_tokenize

POSITIVE_SOURCES = [str(DATA / "instruct" / "rasbt-instruction-data.json"),
                    str(DATA / "books" / "pg11*.txt.gz")]
NEGATIVE_SOURCES = [str(DATA / "webdocs" / "*"), str(DATA / "warc" / "dolma-sample-*.warc.gz")]
# forge train-classifier's defaults: smaller models (bucket 50,000, dim 32) stop with
# fastText's "Encountered NaN"
SETTINGS = TrainSettings()


def train_by_command(out: Path) -> dict:
    """`forge train-classifier` in its own process, as a user runs it. (In-process, one
    full-suite run once got a different model from a training that followed other tests in
    the same process; a fresh process has always given the same bytes.)"""
    shown = forge("train-classifier", str(out), "--positive", *POSITIVE_SOURCES,
                  "--negative", *NEGATIVE_SOURCES, "--json").stdout
    return json.loads(shown)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Instruction data and books (positive) against web pages and WARC (negative)."""
    out = tmp_path_factory.mktemp("classifier") / "quality.bin"
    return out, train_by_command(out)


def test_a_trained_classifier_separates_held_out_documents(trained: tuple[Path, dict]) -> None:
    out, report = trained
    assert out.is_file() and out.with_name("quality.bin.json").is_file()
    # Held out by whole document: no passage of a test book was trained on.
    assert report["test_passages"] > 300
    assert report["precision"] >= 0.97 and report["recall"] >= 0.9
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
    again = train_by_command(tmp_path / "again.bin")
    assert again["sources"] == report["sources"]
    assert (tmp_path / "again.bin").read_bytes() == out.read_bytes()


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


def test_the_split_holds_out_whole_documents_wherever_the_data_lives(tmp_path: Path) -> None:
    """Two books give one held out and one trained on, the same ones in any folder (CI reads
    the data from another path than a developer's machine)."""
    import shutil

    splits = []
    for folder in ("here", "elsewhere/deeper"):
        (tmp_path / folder).mkdir(parents=True)
        for book in ("pg11.txt.gz", "pg110.txt.gz"):
            shutil.copy(DATA / "books" / book, tmp_path / folder / book)
        examples = collect_examples({str(tmp_path / folder / "pg11*.txt.gz"): POSITIVE},
                                    SETTINGS)
        splits.append([e.test for e in examples])
    assert splits[0] == splits[1]
    assert any(splits[0]) and not all(splits[0])
    with pytest.raises(ConfigError, match="at least 2"):
        collect_examples({str(tmp_path / "here" / "pg110.txt.gz"): POSITIVE}, SETTINGS)


def test_training_refuses_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="matches no file"):
        train_classifier([str(tmp_path / "none*.txt")], NEGATIVE_SOURCES, tmp_path / "m.bin")


# ---------------------------------------------------------------- the filter's classify step

RULES_OFF = {"language": None, "gopher_repetition": {"enabled": False},
             "gopher_quality": {"enabled": False}, "c4": {"enabled": False},
             "fineweb": {"enabled": False}, "mask_pii": False}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out books (none trained on) and web pages, extracted by the real command."""
    root = tmp_path_factory.mktemp("scored")
    sources = [{"name": "books", "uri": str(DATA / "books" / f"{b}.txt.gz")}
               for b in ("pg1342", "pg84", "pg2701", "pg5827", "pg74")]
    sources += [{"name": "web", "uri": str(DATA / "webdocs" / "*.gz")},
                {"name": "web", "uri": str(DATA / "warc" / "dolma-sample-0000.warc.gz")}]
    config = write_config(root / "config.yaml", root / "work", sources)
    forge("download", "--config", str(config), "--quiet")
    forge("extract", "--config", str(config), "--quiet")
    return config


def _filter(config: Path, workdir: Path, classifier: dict, **per_source) -> dict:
    import shutil

    shutil.copytree(Path(yaml.safe_load(config.read_text())["workdir"]) / "extract",
                    workdir / "extract")
    section = {**RULES_OFF, "classifier": classifier, "per_source": per_source}
    cfg = load_config(config, {"workdir": str(workdir), "data.filter": section})
    return run_filter(cfg)


# Web pages score 0.00-0.38 with this model: a threshold below the best few keeps some of each.
THRESHOLD = 0.25


def test_the_filter_keeps_and_drops_by_the_score(trained: tuple[Path, dict], extracted: Path,
                                                 tmp_path: Path) -> None:
    model, _ = trained
    manifest = _filter(extracted, tmp_path, {"model": str(model), "threshold": THRESHOLD})
    kept = list(iter_documents(tmp_path / "filter"))
    dropped = manifest["dropped"]
    assert set(dropped) == {"classifier:below_threshold"}  # the other rules are off
    assert manifest["docs_in"] == len(kept) + dropped["classifier:below_threshold"]
    assert all(d["meta"]["quality_score"] >= THRESHOLD for d in kept)
    assert {d["source"] for d in kept} == {"books", "web"}
    # Novels score 0.66-0.91 with this small model, Russell's philosophy (pg5827) 0.09.
    assert sum(d["source"] == "books" for d in kept) >= 4
    scores = manifest["scores"]
    assert sum(s["docs"] - s["kept"] for s in scores.values()) == \
        dropped["classifier:below_threshold"]
    assert sum(scores["web"]["histogram"]) == scores["web"]["docs"]
    assert scores["books"]["mean"] > scores["web"]["mean"]
    examples = scores["web"]["examples"]
    assert examples["top"][0]["score"] >= examples["middle"][0]["score"] >= \
        examples["bottom"][0]["score"]
    assert examples["bottom"][0]["score"] < THRESHOLD <= examples["top"][0]["score"]
    drop = manifest["drop_examples"]["classifier:below_threshold"][0]
    assert drop.endswith(f" < {THRESHOLD:.4f}")

    # forge stats: the distribution per source, as a table, examples and a PNG.
    run_tokenize(load_config(extracted, {"workdir": str(tmp_path), "data.dedupe.enabled": False}))
    shown = forge("stats", str(tmp_path)).stdout
    assert "quality scores per source" in shown and "examples by score" in shown
    assert f"│ top    │ {examples['top'][0]['score']:.3f} │" in shown
    assert f"│ bottom │ {examples['bottom'][0]['score']:.3f} │" in shown
    assert (tmp_path / "tokenize" / "quality_scores.png").stat().st_size > 5000
    as_json = json.loads(forge("stats", str(tmp_path), "--json").stdout)
    assert as_json["scores"]["web"]["histogram"] == scores["web"]["histogram"]


def test_the_filter_keeps_a_top_fraction_per_source(trained: tuple[Path, dict],
                                                    extracted: Path, tmp_path: Path) -> None:
    model, _ = trained
    manifest = _filter(extracted, tmp_path, {"model": str(model), "top_fraction": 0.25},
                       books={"classifier": None})
    kept = list(iter_documents(tmp_path / "filter"))
    web_in = manifest["scores"]["web"]["docs"]
    web_kept = [d for d in kept if d["source"] == "web"]
    assert len(web_kept) == manifest["scores"]["web"]["kept"] == -(-web_in // 4)  # ceil
    cutoff = manifest["scores"]["web"]["cutoff"]
    assert min(d["meta"]["quality_score"] for d in web_kept) >= round(cutoff, 4)
    assert manifest["dropped"] == {"classifier:below_top_fraction": web_in - len(web_kept)}
    assert "books" not in manifest["scores"]  # not scored: its override turns it off
    assert all("quality_score" not in d["meta"] for d in kept if d["source"] == "books")


# ---------------------------------------------------------------- bad input, before any work


def _broken(kind: str, model: Path, tmp_path: Path) -> tuple[dict, str]:
    """A classifier section that is wrong in one way, and what the error must say."""
    if kind == "missing":
        return {"model": str(tmp_path / "none.bin")}, "none.bin does not exist"
    if kind == "not_fasttext":
        (tmp_path / "notes.bin").write_text("not a model")
        return {"model": str(tmp_path / "notes.bin")}, "is not a fastText model"
    if kind == "truncated":
        data = model.read_bytes()
        (tmp_path / "cut.bin").write_bytes(data[: len(data) - 4096])
        return {"model": str(tmp_path / "cut.bin")}, "is truncated or corrupt"
    return {"model": str(model), "label": "good"}, "has no label 'good' (its labels: "


@pytest.mark.parametrize("kind", ["missing", "not_fasttext", "truncated", "no_label"])
def test_a_bad_classifier_fails_before_any_work(kind: str, trained: tuple[Path, dict],
                                                tmp_path: Path) -> None:
    section, message = _broken(kind, trained[0], tmp_path)
    sources = [{"name": "web", "uri": str(DATA / "webdocs" / "*.gz")}]
    config = write_config(tmp_path / "config.yaml", tmp_path / "work", sources)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["filter"] = {"per_source": {"web": {"classifier": {**section, "threshold": 0.5}}}}
    config.write_text(yaml.safe_dump(raw))
    result = forge("prepare", "--config", str(config), check=False)
    assert result.returncode == 2
    error = result.stderr.splitlines()[0]
    assert error.startswith("error: data.filter.per_source.web.classifier.") and message in error
    assert "forge train-classifier" in error or "set the field" in error or "point" in error
    assert not (tmp_path / "work").exists()  # nothing downloaded


def test_threshold_and_top_fraction_together_fail_at_load() -> None:
    raw = {"data": {"filter": {"classifier": {"model": "m.bin", "threshold": 0.5,
                                              "top_fraction": 0.1}}}}
    with pytest.raises(ConfigError, match="data.filter.classifier': set threshold or "
                                          "top_fraction, not both"):
        validate_config(raw)


def test_another_model_file_changes_the_filter_fingerprint(trained: tuple[Path, dict],
                                                           tmp_path: Path) -> None:
    model, _ = trained
    other = tmp_path / "other.bin"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # one weight changed: same size, other scores
    other.write_bytes(bytes(data))
    fingerprints = {rules_fingerprint(validate_config({"data": {"filter": {"classifier": {
        "model": str(path), "threshold": 0.5}}}}).data.filter) for path in (model, other)}
    assert len(fingerprints) == 2

"""tokenize.mix: per-source weights repeat or subsample a source's train documents,
deterministically, recorded in the dataset and shown by `forge stats`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from conftest import DATA, forge, write_config

from pipeline.config import ConfigError, validate_config
from pipeline.tokenize import DOC_TABLE, mix_copies, plan_shards, split_rank


def _unit(name: str, sources: list[str], n: int, val_fraction: float) -> tuple:
    ranks = [split_rank(7, f"{name}/{i}") for i in range(n)]
    docs = np.array([(10 + i, 40, i % len(sources), r < val_fraction, r)
                     for i, r in enumerate(ranks)], dtype=DOC_TABLE)
    return name, docs, sources


def test_weights_repeat_and_subsample_train_documents() -> None:
    units = [_unit("u0", ["a", "b", "c"], 600, 0.1), _unit("u1", ["b", "a"], 400, 0.1)]
    plain_tally: dict = {}
    plain = plan_shards(units, 5_000, True, val_fraction=0.1, tally=plain_tally)
    tally: dict = {}
    mixed = plan_shards(units, 5_000, True, {"a": 2, "b": 0.5, "c": 0}, 0.1, tally)
    assert tally["before"] == plain_tally["before"] == plain_tally["after"]
    assert tally["after"]["a"] == 2 * tally["before"]["a"]  # every document twice
    assert "c" not in tally["after"]  # weight 0: gone from train
    # weight 0.5: a seeded half, within sampling noise of 500 documents
    assert 0.4 < tally["after"]["b"] / tally["before"]["b"] < 0.6

    def docs(plans: list[dict], split: str, source: str) -> int:
        return sum(p["sources"].get(source, 0) for p in plans if p["split"] == split)

    for source in "abc":  # the val split is never reweighted
        assert docs(mixed, "val", source) == docs(plain, "val", source) > 0
    assert docs(mixed, "train", "a") == 2 * docs(plain, "train", "a")
    assert docs(mixed, "train", "c") == 0
    # Repeats come in a second pass over the corpus, not next to the first copy.
    first_pass = [p for p in mixed if p["split"] == "train"][: len(mixed) // 3]
    assert sum(p["sources"].get("a", 0) for p in first_pass) <= docs(plain, "train", "a")
    # Deterministic: the same plan again.
    assert plan_shards(units, 5_000, True, {"a": 2, "b": 0.5, "c": 0}, 0.1) == mixed


def test_fractional_weights_add_a_seeded_share() -> None:
    ranks = np.linspace(0.1, 0.999, 1000)
    copies = [mix_copies(1.5, r, 0.1) for r in ranks]
    assert set(copies) == {1, 2} and 450 <= copies.count(2) <= 550
    assert all(mix_copies(0.0, r, 0.1) == 0 for r in ranks)


@pytest.mark.parametrize(("mix", "message"), [
    ({"books": -1}, "weight of 'books' must be a number >= 0"),
    ({"books": "lots"}, "data.tokenize.mix.books"),
    ({"books": float("nan")}, "must be a number >= 0"),
])
def test_a_bad_weight_fails_at_load_naming_the_field(mix: dict, message: str) -> None:
    raw = {"data": {"sources": [{"uri": "x.txt"}], "tokenize": {"mix": mix}}}
    with pytest.raises(ConfigError, match="data.tokenize.mix") as error:
        validate_config(raw)
    assert message in str(error.value)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mix")
    sources = [{"name": "books", "uri": str(DATA / "books" / "the-verdict.txt")},
               {"name": "books", "uri": str(DATA / "books" / "pg84.txt.gz")},
               {"name": "speeches", "uri": str(DATA / "books" / "nltk_inaugural.zip")},
               {"name": "web", "uri": str(DATA / "webdocs" / "*.gz")}]
    config = write_config(root / "config.yaml", root / "work", sources, val_fraction=0.05,
                          mix={"books": 2, "web": 0.5})
    raw = yaml.safe_load(config.read_text())
    raw["data"].update(filter={"enabled": False}, dedupe={"enabled": False})
    config.write_text(yaml.safe_dump(raw))
    forge("prepare", "--config", str(config), "--quiet")
    return config, root / "work"


def test_the_mix_is_recorded_and_shown(mixed_run: tuple[Path, Path]) -> None:
    _, work = mixed_run
    attrs = dict(zarr.open_group(str(work / "tokenize" / "dataset.zarr"), mode="r").attrs)
    tokens = attrs["source_tokens"]
    assert tokens["books"]["weight"] == 2
    assert tokens["books"]["after_mix"] == 2 * tokens["books"]["before_mix"] > 0
    assert tokens["speeches"]["after_mix"] == tokens["speeches"]["before_mix"] > 0
    assert 0 < tokens["web"]["after_mix"] < tokens["web"]["before_mix"]
    assert attrs["splits"]["train"]["tokens"] == sum(t["after_mix"] for t in tokens.values())
    from flows.artifacts import dataset_markdown
    from pipeline.stats import dataset_stats

    markdown = dataset_markdown(dataset_stats(work / "tokenize" / "dataset.zarr"))
    books = tokens["books"]
    assert f"| 2 | {books['before_mix']:,} | {books['after_mix']:,} |" in markdown
    shown = forge("stats", str(work)).stdout
    before, after = tokens["books"]["before_mix"], tokens["books"]["after_mix"]
    assert f"{before:,}" in shown and f"{after:,}" in shown and "tokens after" in shown


def test_a_mix_naming_an_unknown_source_fails_before_any_work(
        mixed_run: tuple[Path, Path], tmp_path: Path) -> None:
    config, _ = mixed_run
    raw = yaml.safe_load(config.read_text())
    raw["workdir"] = str(tmp_path / "work")
    raw["data"]["tokenize"]["mix"] = {"bookz": 2}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = forge("prepare", "--config", str(config), check=False)
    assert result.returncode == 2
    assert "data.tokenize.mix names source 'bookz'" in result.stderr
    assert "books" in result.stderr and "fix the name" in result.stderr
    assert not (tmp_path / "work").exists()  # nothing downloaded

"""Decontamination: documents sharing a 13-gram with an evaluation set are removed."""

from __future__ import annotations

import bz2
import gzip
import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import DATA, dead_writer_temp, forge, write_config

from pipeline.config import DecontaminateConfig
from pipeline.decontaminate import NgramIndex, build_index, eval_texts, ngram_hashes
from pipeline.files import temp_path_for
from pipeline.instructions import load_records, split_records

INSTRUCT = DATA / "instruct" / "rasbt-instruction-data.json"


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real evaluation data, cut to a few items so the index builds in a moment."""
    root = tmp_path_factory.mktemp("eval")
    lines = bz2.decompress((DATA / "eval" / "hellaswag_val_full.txt.bz2").read_bytes())
    hellaswag = root / "hellaswag.txt"
    hellaswag.write_text("\n".join(lines.decode().splitlines()[: 6 * 50]) + "\n")
    wiki = root / "wikitext.txt"
    text = gzip.decompress((DATA / "eval" / "wikitext-2-test.txt.gz").read_bytes()).decode()
    wiki.write_text(text[:20_000])
    return {"hellaswag": hellaswag, "wikitext": wiki}


def section(eval_files: dict[str, Path], **kwargs) -> dict:
    return {
        "enabled": True,
        "eval_sets": [
            {"name": "hellaswag", "path": str(eval_files["hellaswag"]), "format": "hellaswag"},
            {"name": "wikitext2", "path": str(eval_files["wikitext"]), "format": "text"},
            {"name": "instruct-test", "path": str(INSTRUCT), "format": "instructions"},
        ],
        **kwargs,
    }


def test_ngram_hashes_ignore_case_and_punctuation() -> None:
    a = ngram_hashes("The quick brown fox, jumps over the lazy dog!", 5)
    b = ngram_hashes("the QUICK brown fox jumps -- over the lazy dog", 5)
    assert a.size == 5 and (a == b).all()
    assert ngram_hashes("too short", 5).size == 0


def test_index_lookup_finds_members_and_only_members(eval_files: dict[str, Path]) -> None:
    cfg = DecontaminateConfig.model_validate(section(eval_files))
    index = NgramIndex(*build_index(cfg))
    item = eval_texts(cfg.eval_sets[0])[7]
    assert (index.lookup(ngram_hashes(item, 13)) == 0).any()
    book = gzip.decompress((DATA / "books" / "pg1952.txt.gz").read_bytes()).decode()
    assert (index.lookup(ngram_hashes(book, 13)) == -1).all()


def test_the_stage_drops_contaminated_documents_by_eval_set(eval_files: dict[str, Path],
                                                            tmp_path: Path) -> None:
    hellaswag_item = eval_texts(DecontaminateConfig.model_validate(
        section(eval_files)).eval_sets[0])[10]
    wiki = eval_files["wikitext"].read_text()
    records, _ = load_records(INSTRUCT)
    split = split_records(records, 1337, 0.05, 0.10)
    held_out, trained = split["test"][0], split["train"][0]
    docs = {
        "hellaswag.txt": f"Some preface that is ours.\n{hellaswag_item}\nAnd an epilogue.",
        "wiki.txt": wiki[2000:4000],
        "heldout.txt": f"{held_out['instruction']} {held_out['input']} {held_out['output']}",
        "trained.txt": f"{trained['instruction']} {trained['input']} {trained['output']}",
        "clean.txt": gzip.decompress((DATA / "books" / "pg1952.txt.gz").read_bytes()).decode(),
    }
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in docs.items():
        (folder / name).write_text(text)
    config = write_config(tmp_path / "c.yaml", tmp_path / "work", [{"uri": str(folder)}])
    raw = yaml.safe_load(config.read_text())
    raw["data"]["decontaminate"] = section(eval_files)
    raw["data"].update({"filter": {"enabled": False}, "dedupe": {"enabled": False}})
    config.write_text(yaml.safe_dump(raw))

    forge("prepare", "--config", str(config), "--quiet")
    manifest = json.loads((tmp_path / "work" / "decontaminate" / "manifest.json").read_text())
    assert manifest["dropped"] == {"contaminated:hellaswag": 1, "contaminated:wikitext2": 1,
                                   "contaminated:instruct-test": 1}
    assert manifest["docs_out"] == 2  # the clean book and the training-split instruction
    assert manifest["eval_ngrams"]["hellaswag"] > 1000
    tokenize = json.loads((tmp_path / "work" / "tokenize" / "manifest.json").read_text())
    assert tokenize["docs_in"] == 2  # tokenize reads the decontaminated documents

    raw["data"]["decontaminate"] = section(eval_files, mode="cut", cut_margin_chars=0)
    config.write_text(yaml.safe_dump(raw))
    forge("decontaminate", "--config", str(config), "--quiet", "--overwrite")
    manifest = json.loads((tmp_path / "work" / "decontaminate" / "manifest.json").read_text())
    assert manifest["repaired"]["cut:hellaswag"] == 1
    kept = [json.loads(line) for p in manifest["parts"]
            for line in (tmp_path / "work" / "decontaminate" / p["file"]).open()]
    cut = next(d["text"] for d in kept if d["id"].endswith("hellaswag.txt"))
    assert cut.startswith("Some preface") and cut.endswith("epilogue.")
    assert hellaswag_item not in cut


def test_a_rerun_reuses_the_index_and_removes_dead_writers_temporary_files(
        eval_files: dict[str, Path], tmp_path: Path) -> None:
    """A run killed after the index was built: the rerun neither rebuilds nor rewrites it,
    and the temporary files of dead writers (a killed index write) are gone; a live one stays."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for number in range(3):
        (folder / f"{number}.txt").write_text(f"Document {number} about nothing in particular.")
    config = write_config(tmp_path / "c.yaml", tmp_path / "work", [{"uri": str(folder)}])
    raw = yaml.safe_load(config.read_text())
    raw["data"]["decontaminate"] = section(eval_files)
    raw["data"].update({"filter": {"enabled": False}, "dedupe": {"enabled": False}})
    config.write_text(yaml.safe_dump(raw))
    failed = forge("prepare", "--config", str(config), "--quiet", check=False,
                   env={**os.environ, "FORGE_FAIL_AFTER": "decontaminate:1"})
    assert failed.returncode == 2 and "injected failure" in failed.stderr
    stage = tmp_path / "work" / "decontaminate"
    (index,) = (stage / "index").iterdir()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in index.glob("*.npy")}
    assert sorted(before) == ["labels.npy", "table.npy"]
    dead = [dead_writer_temp(index / "table.npy"), dead_writer_temp(stage / "docs" / "x.jsonl")]
    live = temp_path_for(index / "labels.npy")  # this process writes it: not stale

    rerun = forge("prepare", "--config", str(config))
    assert rerun.stderr.count("reusing the evaluation 13-gram index") == 1
    assert "decontaminate: removed 2 temporary files of dead writers" in rerun.stderr
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in index.glob("*.npy")}
    assert after == before  # not rebuilt, not rewritten
    assert not any(p.exists() for p in dead) and live.exists()
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["docs_out"] == 3 and manifest["eval_ngrams"]["hellaswag"] > 1000
    live.unlink()

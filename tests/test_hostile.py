"""A folder of hostile inputs goes through `prepare`: counted, never fatal, nothing escapes."""

from __future__ import annotations

import gzip
import json
import os
import zipfile
from pathlib import Path

import pytest
from conftest import DATA, forge, write_config

pytestmark = pytest.mark.slow


def make_hostile_folder(folder: Path) -> None:
    folder.mkdir()
    (folder / "good.txt").write_text("A perfectly ordinary document about ships. " * 20)
    book = (DATA / "books" / "pg11.txt.gz").read_bytes()
    (folder / "truncated.txt.gz").write_bytes(book[: len(book) // 3])
    (folder / "latin1.txt").write_bytes("Ça déjà été à Noël, où ça? ".encode("latin-1") * 300)
    (folder / "binary.txt").write_bytes(os.urandom(4096) + b"\x00" * 64)
    (folder / "blob.bin").write_bytes(os.urandom(1024))
    (folder / "empty.txt").write_bytes(b"")
    with open(folder / "giant.txt", "wb") as f:  # a single 50 MB line
        f.write(b"word " * 10_000_000)
    records = [
        {"text": "a fine JSON document"},
        {"content": "text is missing"},
        {"text": ["not", "a", "string"]},
        {"text": None},
    ]
    lines = [json.dumps(r) for r in records] + ["{broken json"]
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    warc = gzip.decompress((DATA / "warc" / "dolma-sample-0000.warc.gz").read_bytes())
    (folder / "broken.warc").write_bytes(warc[: len(warc) // 2])
    with zipfile.ZipFile(folder / "evil.zip", "w") as z:
        z.writestr("../../escaped.txt", "this must never be written anywhere")
        z.writestr("fine/member.txt", "a harmless member of the zip")


def test_hostile_inputs_are_counted_and_the_run_completes(tmp_path: Path) -> None:
    hostile = tmp_path / "hostile"
    make_hostile_folder(hostile)
    work = tmp_path / "work"
    config = write_config(tmp_path / "c.yaml", work, [{"name": "hostile", "uri": str(hostile)}])
    before = set(tmp_path.parent.iterdir())

    result = forge("prepare", "--config", str(config))

    manifest = json.loads((work / "extract" / "manifest.json").read_text())
    assert manifest["dropped"] == {
        "binary": 1,
        "corrupt_compression": 1,
        "empty": 1,
        "invalid_utf8": 1,
        "malformed_json": 1,
        "missing_text": 2,
        "non_string_text": 1,
        "too_large": 1,
        "truncated_warc_record": 1,
        "unsafe_member_path": 1,
        "unsupported_format": 1,
    }
    assert manifest["docs_in"] == manifest["docs_out"] + sum(manifest["dropped"].values())
    kept = _doc_ids(work)
    for name in ("good.txt", "records.jsonl#1", "evil.zip/fine/member.txt"):
        assert sum(d.endswith(name) for d in kept) == 1, name
    assert any("/broken.warc#" in d for d in kept)  # records before the cut survive
    assert "too_large" in result.stdout and "unsafe_member_path" in result.stdout

    stats = json.loads(forge("stats", str(work), "--json").stdout)
    assert stats["stages"][1]["dropped"] == manifest["dropped"]

    assert set(tmp_path.parent.iterdir()) == before
    assert not list(tmp_path.rglob("escaped.txt"))
    assert set(tmp_path.iterdir()) == {hostile, work, config}


def _doc_ids(work: Path) -> list[str]:
    from pipeline.documents import iter_documents

    return [d["id"] for d in iter_documents(work / "extract")]

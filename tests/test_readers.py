"""Readers and text normalization: each format, and each kind of bad input, alone."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA

from pipeline.extract import strip_gutenberg
from pipeline.readers import Doc, Drop, file_format, list_members, normalize_text, read_file

MAX = 1_000_000


def read_all(path: Path, **kwargs) -> tuple[list[Doc], list[Drop]]:
    items = list(read_file(str(path), kwargs.pop("max_bytes", MAX), **kwargs))
    return [i for i in items if isinstance(i, Doc)], [i for i in items if isinstance(i, Drop)]


@pytest.mark.parametrize("name, expected", [
    ("pg11.txt.gz", ("text", ".gz")),
    ("a.jsonl", ("jsonl", None)),
    ("docs.json.gz", ("jsonl", ".gz")),
    ("x.warc.gz", ("warc", None)),
    ("x.warc.wet.gz", ("warc", None)),
    ("page.htm.gz", ("html", ".gz")),
    ("python-doc.tar.zst", ("tar", None)),
    ("corpus.zip", ("zip", None)),
    ("data.parquet", ("parquet", None)),
    ("README", ("unknown", None)),
])
def test_file_format_from_name(name: str, expected: tuple) -> None:
    assert file_format(name) == expected


def test_normalize_makes_nfc_and_unix_line_endings() -> None:
    decomposed = "Cafe\u0301\r\nline two\rline three\n"
    assert normalize_text(decomposed) == "Caf\u00e9\nline two\nline three"


def test_gutenberg_boilerplate_is_cut_from_a_real_book() -> None:
    text = gzip.decompress((DATA / "books" / "pg74.txt.gz").read_bytes()).decode()
    assert "*** START OF" in text
    body = strip_gutenberg(normalize_text(text))
    assert "PROJECT GUTENBERG" not in body.upper()[:2000]
    assert "*** END OF" not in body
    assert "TOM!" in body  # the novel's first line survives


OLD_STYLE_BOOK = """The Project Gutenberg EBook of Opticks, by Isaac Newton

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever.

*** START OF THIS PROJECT GUTENBERG EBOOK OPTICKS ***




Produced by Suzanne Lybarger, steve harris, Josephine
Paolucci and the Online Distributed Proofreading Team at
http://www.pgdp.net.




OPTICKS:

OR, A TREATISE OF THE Reflections, Refractions, Inflections and Colours OF LIGHT.

My Design in this Book is not to explain the Properties of Light by Hypotheses.



End of the Project Gutenberg EBook of Opticks, by Isaac Newton

*** END OF THIS PROJECT GUTENBERG EBOOK OPTICKS ***

***** This file should be named 33504.txt or 33504.zip *****
"""

NEW_STYLE_BOOK = """*** START OF THE PROJECT GUTENBERG EBOOK OPTICKS ***

Produced by Suzanne Lybarger and the Online Distributed
Proofreading Team at https://www.pgdp.net

OPTICKS:

My Design in this Book is not to explain the Properties of Light by Hypotheses.

*** END OF THE PROJECT GUTENBERG EBOOK OPTICKS ***

Updated editions will replace the previous one.
"""


@pytest.mark.parametrize("style", ["old", "new"])
@pytest.mark.parametrize("encoding", ["lf", "crlf+bom"])
def test_gutenberg_old_and_new_style_boilerplate_is_cut(tmp_path: Path, style: str,
                                                         encoding: str) -> None:
    """The extract stage's own path: read the file, normalize, strip, on LF and CRLF+BOM."""
    text = OLD_STYLE_BOOK if style == "old" else NEW_STYLE_BOOK
    data = text.encode()
    if encoding == "crlf+bom":
        data = b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n")
    path = tmp_path / "opticks.txt"
    path.write_bytes(data)
    (doc,), _ = read_all(path)
    for raw in (doc.text, normalize_text(doc.text)):  # strip_gutenberg copes with CRLF itself
        body = normalize_text(strip_gutenberg(raw))
        assert body.startswith("OPTICKS:"), body[:80]
        assert body.endswith("by Hypotheses."), body[-80:]
        assert "Gutenberg" not in body and "Produced by" not in body


@pytest.mark.parametrize("book, last_words", [
    ("pg20417.txt.gz", "_The Corpuscular Theory of Matter_."),
    ("pg27083.txt.gz", "THE END."),
])
def test_old_style_end_line_is_cut_from_real_books(book: str, last_words: str) -> None:
    text = gzip.decompress((DATA / "books" / book).read_bytes()).decode()
    assert "End of" in text[-300:] and "Project Gutenberg" in text[-300:]
    body = normalize_text(strip_gutenberg(normalize_text(text)))
    assert body.endswith(last_words), body[-80:]


def test_producer_credits_are_cut_from_a_real_book() -> None:
    text = gzip.decompress((DATA / "books" / "pg1450.txt.gz").read_bytes()).decode()
    assert "Produced by Charles Keller" in text[:500]
    body = normalize_text(strip_gutenberg(normalize_text(text)))
    assert body.startswith("POLLYANNA"), body[:80]


def test_text_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "a.txt.gz"
    path.write_bytes(gzip.compress(b"Hello, world.\n"))
    docs, drops = read_all(path)
    assert [d.text for d in docs] == ["Hello, world.\n"] and drops == []


def test_truncated_gzip_is_a_counted_drop(tmp_path: Path) -> None:
    data = (DATA / "books" / "pg11.txt.gz").read_bytes()
    path = tmp_path / "cut.txt.gz"
    path.write_bytes(data[: len(data) // 2])
    docs, drops = read_all(path)
    assert docs == [] and [d.reason for d in drops] == ["corrupt_compression"]


def test_invalid_utf8_is_dropped_but_a_few_bad_bytes_are_repaired(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("déjà vu à la française ".encode("latin-1") * 200)
    one_bad = tmp_path / "one_bad.txt"
    one_bad.write_bytes(b"plain text " * 200 + b"\xff" + b" more text")
    assert [d.reason for d in read_all(latin1)[1]] == ["invalid_utf8"]
    docs, drops = read_all(one_bad)
    assert drops == [] and docs[0].repairs == ["utf8_replaced"] and "\ufffd" in docs[0].text


def test_binary_empty_and_giant_files_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "giant.txt").write_bytes(b"x" * 5000)
    assert read_all(tmp_path / "bin.txt")[1][0].reason == "binary"
    assert read_all(tmp_path / "empty.txt")[1][0].reason == "empty"
    assert read_all(tmp_path / "giant.txt", max_bytes=4000)[1][0].reason == "too_large"


def test_jsonl_bad_records_are_counted_one_by_one(tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "good one", "id": "http://example.com/a"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"content": "no text field"}),
        json.dumps({"text": 42}),
        json.dumps({"text": "good two", "metadata": {"url": "http://example.com/b"}}),
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    docs, drops = read_all(path)
    assert [d.text for d in docs] == ["good one", "good two"]
    assert [d.url for d in docs] == ["http://example.com/a", "http://example.com/b"]
    assert [d.reason for d in drops] == ["malformed_json", "malformed_json", "missing_text",
                                         "non_string_text"]


def test_truncated_jsonl_gz_keeps_the_complete_records(tmp_path: Path) -> None:
    data = (DATA / "webdocs" / "dolma-cc_en_head-0091.jsonl.gz").read_bytes()
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: int(len(data) * 0.6)])
    full, _ = read_all(DATA / "webdocs" / "dolma-cc_en_head-0091.jsonl.gz")
    docs, drops = read_all(path)
    assert 0 < len(docs) < len(full)
    assert [d.text for d in docs] == [d.text for d in full[: len(docs)]]
    assert drops[-1].reason == "truncated_archive"


def test_parquet_rows_and_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["first", None, "third"]}), path)
    docs, drops = read_all(path)
    assert [d.text for d in docs] == ["first", "third"]
    assert [d.reason for d in drops] == ["missing_text"]


def test_real_warc_responses_are_extracted_and_other_records_skipped() -> None:
    docs, drops = read_all(DATA / "warc" / "dolma-sample-0000.warc.gz")
    assert len(docs) + len(drops) == 22  # the file's HTML responses (its SOURCE.txt)
    assert len(docs) >= 15
    assert all(d.url and d.url.startswith("http") for d in docs)
    wet, _ = read_all(DATA / "warc" / "cc-whirlwind.warc.wet.gz")
    assert len(wet) == 1 and "Escopete" in wet[0].text


def test_broken_warc_record_is_counted_and_earlier_records_kept(tmp_path: Path) -> None:
    raw = gzip.decompress((DATA / "warc" / "dolma-sample-0001.warc.gz").read_bytes())
    path = tmp_path / "broken.warc"
    path.write_bytes(raw[: len(raw) // 2] + b"\r\nWARC/1.0\r\nGarbage-Header\r\n\r\nnot a record")
    docs, drops = read_all(path)
    assert len(docs) >= 1
    assert drops[-1].reason in ("corrupt_warc_record", "truncated_warc_record")


def test_a_warc_record_cut_inside_its_headers_is_described_not_a_python_error(
        tmp_path: Path) -> None:
    raw = gzip.decompress((DATA / "warc" / "dolma-sample-0000.warc.gz").read_bytes())
    cut = raw.index(b"WARC-Warcinfo-ID", raw.index(b"Host: talaugust.github.io"))
    path = tmp_path / "cut.warc"
    path.write_bytes(raw[: cut + len(b"WARC-Warcinfo-ID")])  # no WARC-Target-URI yet
    _, drops = read_all(path)
    assert drops[-1].reason == "corrupt_warc_record"
    assert "malformed WARC headers" in drops[-1].detail
    assert "WARC-Target-URI" in drops[-1].detail and "NoneType" not in drops[-1].detail


def test_zip_members_become_documents_and_escaping_paths_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ok/one.txt", "member one")
        z.writestr("../../escape.txt", "should not be read")
        z.writestr("/abs.txt", "absolute")
        z.writestr("nested.zip", b"PK")
    docs, drops = read_all(path)
    assert [d.text for d in docs] == ["member one"]
    assert sorted(d.reason for d in drops) == ["nested_archive", "unsafe_member_path",
                                               "unsafe_member_path"]
    assert not (tmp_path.parent / "escape.txt").exists()


def test_archive_member_slices_partition_the_members(tmp_path: Path) -> None:
    path = tmp_path / "t.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for i in range(7):
            data = f"document {i}".encode()
            info = tarfile.TarInfo(f"d/{i}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert len(list_members(str(path))) == 7
    slices = [read_all(path, members=(s, s + 3))[0] for s in (0, 3, 6)]
    assert [[d.text for d in s] for s in slices] == [
        ["document 0", "document 1", "document 2"],
        ["document 3", "document 4", "document 5"],
        ["document 6"],
    ]


def test_real_html_page_is_extracted_by_trafilatura() -> None:
    docs, drops = read_all(DATA / "html" / "pg11-h.htm.gz")
    assert drops == [] and "Alice" in docs[0].text and "<p>" not in docs[0].text

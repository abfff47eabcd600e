"""Readers: turn one downloaded file into candidate documents, or counted drops.

Every format yields `Doc` or `Drop`; nothing here raises on bad input. A truncated archive
keeps what was readable and counts the rest; a malformed record is one drop, not a crash.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import tarfile
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO

import zstandard

from pipeline.documents import Drop

COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
WARC_SUFFIXES = {".warc", ".wet", ".wat", ".arc"}
ARCHIVE_SUFFIXES = {".zip", ".tar", ".tgz"}

# What a corrupt compressed stream raises, depending on the codec.
CORRUPT_STREAM = (EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError,
                  tarfile.TarError, zipfile.BadZipFile)


@dataclass
class Doc:
    name: str  # position inside the file: member path and/or record number
    text: str
    url: str | None = None
    meta: dict = field(default_factory=dict)
    repairs: list[str] = field(default_factory=list)  # what was fixed on the way, counted


def file_format(name: str) -> tuple[str, str | None]:
    """(format, compression) from the file name: 'pg11.txt.gz' -> ('text', '.gz')."""
    path = PurePosixPath(name.lower())
    suffixes = path.suffixes
    if name.lower().endswith((".tar.gz", ".tar.zst", ".tar.bz2", ".tar.xz", ".tgz")):
        return "tar", None
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else None
    inner = suffixes[-2] if compression and len(suffixes) >= 2 else (
        suffixes[-1] if suffixes and not compression else "")
    if inner in TEXT_SUFFIXES:
        return "text", compression
    if inner in JSON_SUFFIXES:
        return "jsonl", compression
    if inner in HTML_SUFFIXES:
        return "html", compression
    if inner in WARC_SUFFIXES:
        return "warc", None  # warcio decompresses by itself, record by record
    if inner == ".parquet":
        return "parquet", None
    if inner in {".zip"}:
        return "zip", None
    if inner in {".tar"}:
        return "tar", None
    return "unknown", compression


def open_decompressed(raw: IO[bytes], compression: str | None) -> IO[bytes]:
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if compression == ".zst":
        return zstandard.ZstdDecompressor().stream_reader(raw)
    if compression == ".bz2":
        return bz2.BZ2File(raw)
    if compression == ".xz":
        return lzma.LZMAFile(raw)
    return raw


def decode_text(data: bytes, name: str, max_bytes: int) -> Doc | Drop:
    """Bytes to text with the checks every document goes through."""
    if len(data) > max_bytes:
        return Drop("too_large", f"{len(data)} bytes > {max_bytes}", name=name)
    if b"\x00" in data[:8192]:
        return Drop("binary", name=name)
    try:
        text = data.decode("utf-8")
        repaired = 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        repaired = text.count("\ufffd")
        if repaired > max(1, len(text) // 100):  # over 1% bad bytes: not UTF-8 text at all
            return Drop("invalid_utf8", f"{repaired} undecodable bytes", name=name)
    return Doc(name, text, repairs=["utf8_replaced"] if repaired else [])


def normalize_text(text: str) -> str:
    """Unicode NFC, Unix line endings, no byte-order mark: equal text is equal bytes downstream."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    return unicodedata.normalize("NFC", text).strip()


# ---------------------------------------------------------------- per format


def read_file(path: str, max_bytes: int, text_field: str = "text",
              members: tuple[int, int] | None = None) -> Iterator[Doc | Drop]:
    """Every candidate document in `path`; `members` restricts an archive to a slice."""
    fmt, compression = file_format(path)
    name = PurePosixPath(path).name
    try:
        with open(path, "rb") as raw:
            if fmt in ("zip", "tar"):
                yield from _read_archive(raw, fmt, path, max_bytes, text_field, members)
            else:
                yield from read_stream(raw, name, fmt, compression, max_bytes, text_field)
    except OSError as e:
        yield Drop("unreadable_file", str(e), name=name)


def read_stream(raw: IO[bytes], name: str, fmt: str, compression: str | None, max_bytes: int,
                text_field: str) -> Iterator[Doc | Drop]:
    if fmt == "unknown":
        yield Drop("unsupported_format", name=name)
        return
    stream = open_decompressed(raw, compression)
    if fmt == "jsonl":
        yield from _read_jsonl(stream, name, max_bytes, text_field)
    elif fmt == "warc":
        yield from _read_warc(stream, name, max_bytes)
    elif fmt == "parquet":
        yield from _read_parquet(stream, name, max_bytes, text_field)
    else:
        try:
            data = stream.read(max_bytes + 1)
        except CORRUPT_STREAM as e:
            yield Drop("corrupt_compression", str(e), name=name)
            return
        if not data:
            yield Drop("empty", name=name)
            return
        doc = decode_text(data, name, max_bytes)
        if isinstance(doc, Doc) and fmt == "html":
            doc = html_to_text(data, name)
        yield doc


def html_to_text(html: bytes, name: str, url: str | None = None) -> Doc | Drop:
    import trafilatura

    text = trafilatura.extract(html, url=url, include_comments=False, include_tables=True,
                               deduplicate=False, favor_precision=False)
    if not text:
        return Drop("no_extractable_text", name=name)
    return Doc(name, text, url=url)


def _read_jsonl(stream: IO[bytes], name: str, max_bytes: int,
                text_field: str) -> Iterator[Doc | Drop]:
    lines = io.BufferedReader(stream) if not isinstance(stream, io.BufferedIOBase) else stream
    number = 0
    try:
        for number, line in enumerate(lines, start=1):  # noqa: B007 - used after the loop
            if not line.strip():
                continue
            yield _json_record(line, f"{name}#{number}", max_bytes, text_field)
    except CORRUPT_STREAM as e:
        yield Drop("truncated_archive", str(e), name=f"{name}#{number + 1}")


def _json_record(line: bytes, name: str, max_bytes: int, text_field: str) -> Doc | Drop:
    if len(line) > max_bytes:
        return Drop("too_large", name=name)
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return Drop("malformed_json", str(e)[:200], name=name)
    if not isinstance(record, dict):
        return Drop("malformed_json", "record is not an object", name=name)
    if text_field not in record or record[text_field] is None:
        return Drop("missing_text", name=name)
    text = record[text_field]
    if not isinstance(text, str):
        return Drop("non_string_text", type(text).__name__, name=name)
    metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    url = record.get("url") or metadata.get("url")
    record_id = record.get("id")
    if not url and isinstance(record_id, str) and record_id.startswith(("http://", "https://")):
        url = record_id
    meta = {k: record[k] for k in ("id", "source", "created") if k in record and k != text_field}
    return Doc(name, text, url=url if isinstance(url, str) else None, meta=meta)


def _read_parquet(stream: IO[bytes], name: str, max_bytes: int,
                  text_field: str) -> Iterator[Doc | Drop]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(stream)
        if text_field not in table.schema_arrow.names:
            yield Drop("missing_text", f"no column {text_field!r}", name=name)
            return
        row = 0
        for batch in table.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    yield Drop("missing_text", name=f"{name}#{row}")
                elif not isinstance(text, str):
                    yield Drop("non_string_text", type(text).__name__, name=f"{name}#{row}")
                elif len(text.encode()) > max_bytes:
                    yield Drop("too_large", name=f"{name}#{row}")
                else:
                    yield Doc(f"{name}#{row}", text)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
        yield Drop("corrupt_parquet", str(e)[:200], name=name)


def _read_warc(stream: IO[bytes], name: str, max_bytes: int) -> Iterator[Doc | Drop]:
    """HTML responses through trafilatura; WET conversion records as text; the rest skipped."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.recordloader import ArchiveLoadFailed, StatusAndHeadersParserException

    number = 0
    try:
        for record in ArchiveIterator(stream):
            kind = record.rec_type
            if kind not in ("response", "conversion"):
                continue  # request, warcinfo, metadata, revisit: not documents
            number += 1
            url = record.rec_headers.get_header("WARC-Target-URI")
            rec_name = f"{name}#{number}"
            data = record.content_stream().read(max_bytes + 1)
            if len(data) <= max_bytes and getattr(record.raw_stream, "limit", 0) > 0:
                yield Drop("truncated_warc_record", f"{record.raw_stream.limit} "
                           "bytes missing", name=rec_name)
                continue
            if kind == "conversion":
                doc = decode_text(data, rec_name, max_bytes)
                if isinstance(doc, Doc):
                    doc.url = url
                yield doc
                continue
            mime = (record.http_headers.get_header("Content-Type") or ""
                    if record.http_headers else "")
            if "html" not in mime.lower():
                yield Drop("non_html_response", mime[:60], name=rec_name)
            elif len(data) > max_bytes:
                yield Drop("too_large", name=rec_name)
            elif not data.strip():
                yield Drop("empty", name=rec_name)
            else:
                yield html_to_text(data, rec_name, url)
    except (ArchiveLoadFailed, StatusAndHeadersParserException) as e:  # warcio's own words
        yield Drop("corrupt_warc_record", str(e)[:200], name=f"{name}#{number + 1}")
    except Exception as e:  # noqa: BLE001 - warcio trips on headers it did not expect
        yield Drop("corrupt_warc_record", "malformed WARC headers: a required header (such as "
                   "WARC-Target-URI) is missing or the header block is cut off "
                   f"({type(e).__name__} in warcio)", name=f"{name}#{number + 1}")


# ---------------------------------------------------------------- archives


def _safe_member(member: str) -> bool:
    path = PurePosixPath(member)
    return not path.is_absolute() and ".." not in path.parts and "\\" not in member


def list_members(path: str) -> list[str] | None:
    """File members of a zip or tar archive, in order; None if the archive is unreadable."""
    fmt, _ = file_format(path)
    try:
        if fmt == "zip":
            with zipfile.ZipFile(path) as z:
                return [i.filename for i in z.infolist() if not i.is_dir()]
        with _open_tar(path) as tar:
            return [m.name for m in tar if m.isfile()]
    except CORRUPT_STREAM:
        return None


def _open_tar(path: str) -> _ClosingTar:
    raw = open(path, "rb")  # noqa: SIM115 - closed by _ClosingTar
    compression = next((c for c in COMPRESSIONS if path.lower().endswith(c)), None)
    if path.lower().endswith(".tgz"):
        compression = ".gz"
    return _ClosingTar(tarfile.open(fileobj=open_decompressed(raw, compression), mode="r|"), raw)


class _ClosingTar:
    def __init__(self, tar: tarfile.TarFile, raw: IO[bytes]):
        self.tar, self.raw = tar, raw

    def __enter__(self) -> tarfile.TarFile:
        return self.tar

    def __exit__(self, *exc: object) -> None:
        self.tar.close()
        self.raw.close()


def _read_archive(raw: IO[bytes], fmt: str, path: str, max_bytes: int, text_field: str,
                  members: tuple[int, int] | None) -> Iterator[Doc | Drop]:
    """Members of a zip or tar, each read as its own file; never written to disk."""
    start, stop = members or (0, 1 << 62)
    archive_name = PurePosixPath(path).name
    index = -1
    try:
        for index, (member, read) in enumerate(_archive_entries(path, fmt)):
            if index < start:
                continue
            if index >= stop:
                return
            name = f"{archive_name}/{member}"
            if not _safe_member(member):
                yield Drop("unsafe_member_path", member, name=name)
                continue
            member_fmt, compression = file_format(member)
            if member_fmt in ("zip", "tar"):
                yield Drop("nested_archive", name=name)
                continue
            try:
                data = read()
            except CORRUPT_STREAM as e:
                yield Drop("corrupt_compression", str(e)[:200], name=name)
                continue
            yield from read_stream(io.BytesIO(data), name, member_fmt, compression, max_bytes,
                                   text_field)
    except CORRUPT_STREAM as e:
        yield Drop("truncated_archive", str(e)[:200], name=f"{archive_name}#{index + 1}")


def _archive_entries(path: str, fmt: str) -> Iterator[tuple[str, callable]]:
    if fmt == "zip":
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: z.read(info)
        return
    with _open_tar(path) as tar:
        for member in tar:
            if member.isfile():
                yield member.name, lambda member=member: tar.extractfile(member).read()

"""download: bring every source into the work folder as files, each checksummed.

Sources are local files or globs (copied), http(s) URLs (resumable with Range requests,
retried with backoff, size-capped, checksum-checked) and Hugging Face datasets streamed
with `datasets` into JSONL parts. One unit is one file (or one part of a streamed dataset).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import http.client
import io
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

import zstandard

from pipeline.config import DownloadConfig, ForgeConfig, SourceConfig
from pipeline.contract import ProgressFn, Stage, StageError, Unit, UnitResult, run_stage
from pipeline.files import (
    WorkFolder,
    atomic_write_json,
    commit,
    config_hash,
    read_json,
    safe_name,
    sha256_file,
    temp_path_for,
)
from pipeline.readers import file_format, open_decompressed

log = logging.getLogger(__name__)

USER_AGENT = "forge-data/0.1 (+https://github.com/)"
PERMANENT_HTTP_ERRORS = {400, 401, 403, 404, 410, 451}
MAX_UNIT_ID = 150  # a record's temporary name adds up to ~50 characters; names stop at 255
CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)")


class PermanentDownloadError(Exception):
    """The file cannot be had by retrying (404, checksum mismatch, too large): a counted drop."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def source_kind(uri: str) -> str:
    if uri.startswith("hf://"):
        return "hf"
    if uri.startswith(("http://", "https://")):
        return "url"
    return "local"


def source_name(source: SourceConfig) -> str:
    if source.name:
        return safe_name(source.name)
    uri = source.uri
    kind = source_kind(uri)
    if kind == "hf":
        return safe_name(uri.removeprefix("hf://").rstrip("/").split("/")[-1])
    if kind == "url":
        return safe_name(urlparse(uri).netloc)
    base = _glob_base(uri)
    return safe_name((base if base.is_dir() else base.parent).resolve().name)


def _glob_base(pattern: str) -> Path:
    """The longest leading part of a glob without wildcards."""
    parts = Path(pattern).parts
    fixed = [p for p in _takewhile_plain(parts)]
    return Path(*fixed) if fixed else Path(".")


def _takewhile_plain(parts: tuple[str, ...]):
    for part in parts:
        if glob.has_magic(part):
            return
        yield part


# ---------------------------------------------------------------- which rules a source gets

BOOK_BYTES = 150_000  # plain text this long is a book (a novella is ~25k words), not a page
SNIFF_BYTES = 65_536  # where a Project Gutenberg header would be
SNIFF_FILES = 16


def _sniff_book(path: str) -> str | None:
    """Why the file is plainly a book (a Project Gutenberg header, or book-length plain
    text), or None."""
    fmt, compression = file_format(path)
    if fmt not in ("text", "html"):
        return None
    try:
        with open(path, "rb") as raw, open_decompressed(raw, compression) as stream:
            head = stream.read(SNIFF_BYTES)
            if b"project gutenberg" in head.lower():
                return f"Project Gutenberg header in {Path(path).name}"
            if fmt == "text" and len(head) + len(stream.read(BOOK_BYTES)) >= BOOK_BYTES:
                return f"book-length plain text in {Path(path).name}"
    except (OSError, EOFError, ValueError, zstandard.ZstdError):
        return None  # unreadable here: the extract stage counts it as a drop
    return None


def _sniff_source(source: SourceConfig) -> str | None:
    """Why an unnamed source is plainly not web text (at least half of its first files are
    books, or it is a Project Gutenberg URL), or None."""
    kind = source_kind(source.uri)
    if kind == "url":
        host = urlparse(source.uri).hostname or ""
        return "a Project Gutenberg URL" if host.endswith("gutenberg.org") else None
    if kind != "local":
        return None
    files = _expand_local(source.uri)[:SNIFF_FILES]
    reasons = [r for r in map(_sniff_book, files) if r]
    return reasons[0] if reasons and 2 * len(reasons) >= len(files) else None


def with_source_presets(cfg: ForgeConfig) -> tuple[ForgeConfig, list[str]]:
    """The config with the books preset for every unnamed source that plainly is not web
    text, and one line per source saying which filter rules it gets and why."""
    per_source = dict(cfg.data.filter.per_source)
    lines: list[str] = []
    seen: set[str] = set()
    for source in cfg.data.sources:
        name = source_name(source)
        if name in seen:  # sources sharing a name share their rules
            continue
        seen.add(name)
        if name in per_source:
            preset = per_source[name].get("preset")
            rules = f"{preset} preset" if preset else "web rules with overrides"
            lines.append(f"source {name}: {rules} (filter.per_source.{name})")
        elif source.name is None and (why := _sniff_source(source)):
            per_source[name] = {"preset": "books"}
            lines.append(f"source {name}: books preset (not web text: {why}; set "
                         f"filter.per_source.{name} or --source NAME=PATH to choose)")
        else:
            lines.append(f"source {name}: web rules (no filter.per_source.{name})")
    if per_source != cfg.data.filter.per_source:
        cfg = cfg.model_copy(deep=True)
        cfg.data.filter.per_source = per_source
    return cfg, lines


# ---------------------------------------------------------------- planning


def plan_units(cfg: ForgeConfig) -> list[Unit]:
    """One unit per local file or URL. Names are sanitized and unique within a source."""
    units: list[Unit] = []
    for index, source in enumerate(cfg.data.sources):
        name = source_name(source)
        kind = source_kind(source.uri)
        if kind == "hf":
            continue  # streamed separately: its parts are only known while streaming
        prefix = f"{index:02d}-{name}"
        if kind == "url":
            target = _file_name_for_url(source.uri)
            units.append(_unit(prefix, target, kind, source.uri, source))
            continue
        matches = _expand_local(source.uri)
        if not matches and not source.optional:
            raise StageError(f"data.sources[{index}] ({source.uri}) matches no file: fix the "
                             "path, or mark the source `optional: true` to run without it")
        if not matches:
            units.append(_unit(prefix, "no_match", "missing", source.uri, source))
        base = _glob_base(source.uri)
        base = base if base.is_dir() else base.parent
        used: set[str] = set()
        for path in matches:
            rel = os.path.relpath(path, base)
            target = safe_name(rel.replace(os.sep, "__"))
            if target in used:  # `a b.txt` and `a_b.txt` must not share one output file
                target = f"{hashlib.sha256(rel.encode()).hexdigest()[:8]}-{target}"
            used.add(target)
            units.append(_unit(prefix, target, kind, path, source))
    return units


def _unit(prefix: str, target: str, kind: str, origin: str, source: SourceConfig) -> Unit:
    unit_id = f"{prefix}--{target}"
    return Unit(
        id=unit_id if len(unit_id) <= MAX_UNIT_ID else safe_name(unit_id, MAX_UNIT_ID),
        payload={
            "kind": kind,
            "origin": origin,
            "target": f"{prefix}/{target}",
            "source": source_name(source),
            "sha256": source.sha256,
            "text_field": source.text_field,
        },
    )


def _expand_local(pattern: str) -> list[str]:
    path = Path(pattern)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file())
    return sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def _file_name_for_url(url: str) -> str:
    parsed = urlparse(url)
    name = unquote(Path(parsed.path).name) or "index.html"
    digest = hashlib.sha256(url.encode()).hexdigest()[:8]
    return f"{digest}-{safe_name(name)}"


# ---------------------------------------------------------------- one unit


def download_unit(payload: dict) -> UnitResult:
    """Fetch or copy one file into files/; a permanent failure is a counted drop."""
    out_root = Path(payload["out_dir"])
    cfg = DownloadConfig.model_validate(payload["download"])
    dest = out_root / payload["target"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    result = UnitResult()
    try:
        if payload["kind"] == "missing":
            raise PermanentDownloadError(
                "no_matching_files", f"{payload['origin']} matches no file"
            )
        origin = apply_mirror(payload["origin"], cfg.mirror)
        if source_kind(origin) == "url":
            fetch_url(origin, dest, cfg)
        else:
            _copy_local(Path(origin), dest, cfg)
        digest = sha256_file(dest)
        if payload["sha256"] and digest != payload["sha256"].lower():
            dest.unlink()
            raise PermanentDownloadError(
                "checksum_mismatch",
                f"{payload['origin']}: sha256 {digest} != expected {payload['sha256']}",
            )
    except PermanentDownloadError as e:
        log.warning("dropped %s: %s", payload["origin"], e)
        result.drop(e.reason)
        result.outputs = {"error": str(e)}
        return result
    size = dest.stat().st_size
    result.keep()
    result.bytes_in = result.bytes_out = size
    result.outputs = {
        "files": [
            {
                "path": payload["target"],
                "sha256": digest,
                "bytes": size,
                "source": payload["source"],
                "origin": payload["origin"],
                "text_field": payload["text_field"],
            }
        ]
    }
    return result


def apply_mirror(uri: str, mirror: dict[str, str]) -> str:
    """Map a URL onto a mirror: the longest matching prefix wins.

    A local mirror folder holds files under their decoded URL paths (`a%20b.txt` is
    `a b.txt`, no query string); a URL that would reach outside it with `..` is a
    PermanentDownloadError (`outside_mirror`), not a read of some other local file.
    """
    for prefix in sorted(mirror, key=len, reverse=True):
        if not uri.startswith(prefix):
            continue
        base, rest = mirror[prefix], uri[len(prefix) :]
        if source_kind(base) == "url":
            return base.rstrip("/") + "/" + rest.lstrip("/")
        rest = unquote(rest.split("#")[0].split("?")[0]).lstrip("/")
        root = os.path.normpath(base)
        local = os.path.normpath(os.path.join(root, rest))
        if local != root and not local.startswith(root.rstrip(os.sep) + os.sep):
            raise PermanentDownloadError("outside_mirror", f"{uri} maps outside the mirror {base}")
        return local
    return uri


def _copy_local(src: Path, dest: Path, cfg: DownloadConfig) -> None:
    if not src.is_file():
        raise PermanentDownloadError("not_found", f"{src} does not exist")
    if src.stat().st_size > cfg.max_file_mb * 1e6:
        raise PermanentDownloadError("too_large", f"{src} exceeds {cfg.max_file_mb} MB")
    tmp = temp_path_for(dest)
    shutil.copyfile(src, tmp)
    commit(tmp, dest)


def fetch_url(url: str, dest: Path, cfg: DownloadConfig) -> None:
    """Download to `dest.part`, resuming with Range after drops; rename when complete.

    `retries` counts attempts that got nothing new: a flaky link that delivers more each
    time keeps going (a finite file ends it), a dead one gives up. A permanent failure
    removes the partial file so that nothing half-written stays in files/.
    """
    part = dest.with_name(dest.name + ".part")
    cap = int(cfg.max_file_mb * 1e6)
    delay = cfg.backoff_s
    failures = 0
    while True:
        before = _size(part)
        try:
            if _fetch_into(url, part, cap, cfg.timeout_s):
                commit(part, dest)
                return
            error: Exception = ConnectionError("connection closed before the end of the file")
        except PermanentDownloadError:
            part.unlink(missing_ok=True)
            raise
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in PERMANENT_HTTP_ERRORS:
                part.unlink(missing_ok=True)
                raise PermanentDownloadError(f"http_{e.code}", f"{url}: HTTP {e.code}") from None
            error = e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            error = e  # timeouts, resets, broken chunked encoding: all worth another try
        have = _size(part)
        if have > before:  # progress: start the backoff afresh
            failures, delay = 0, cfg.backoff_s
        else:
            failures += 1
        if failures > cfg.retries:
            raise ConnectionError(f"{url}: giving up after {failures} failed attempts: {error}")
        log.info("%s: %s; retrying in %.1fs from byte %d", url, error, delay, have)
        time.sleep(delay)
        if failures:
            delay *= 2


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header; None where absent or `*`."""
    match = CONTENT_RANGE.fullmatch(value.strip()) if value else None
    if not match:
        return None, None
    first, total = match.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


def _fetch_into(url: str, part: Path, cap: int, timeout: float) -> bool:
    """Write what the server sends into `part` at the offset it says; True when complete.

    The server decides where its bytes go: a 200 restarts the file, a 206 is placed at the
    first byte of its Content-Range (whatever was asked), and a 416 means done only when
    the file's total size equals what is already here.
    """
    have = _size(part)
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        _, total = _content_range(e.headers.get("Content-Range"))
        e.close()
        if total == have:  # nothing left to send: the part is already whole
            return True
        part.unlink()  # longer than the file (it changed upstream), or unknowable: restart
        raise ConnectionError(f"HTTP 416 for bytes={have}- of a {total}-byte file") from None
    with response:
        start, total = 0, None
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start is None or start > have:  # no usable range: a gap would corrupt the file
                part.unlink(missing_ok=True)
                given = response.headers.get("Content-Range")
                raise ConnectionError(f"unusable 206 Content-Range {given!r} for bytes={have}-")
        length = response.headers.get("Content-Length")
        expected = total if total is not None else (
            start + int(length) if length is not None and length.isdigit() else None)
        if expected is not None and expected > cap:
            raise PermanentDownloadError("too_large", f"{url}: {expected} bytes exceeds the cap")
        with open(part, "r+b" if start else "wb") as f:
            f.truncate(start)
            f.seek(start)
            received = start
            # read1: whatever has arrived, so a timeout mid-block loses nothing already here
            while block := response.read1(1 << 20):
                received += len(block)
                if received > cap:
                    raise PermanentDownloadError("too_large", f"{url}: exceeds {cap} bytes")
                f.write(block)
    return expected is None or received == expected


# ---------------------------------------------------------------- Hugging Face streaming


def stream_hf_source(stage: Stage, index: int, source: SourceConfig, cfg: DownloadConfig,
                     files_dir: Path) -> dict[str, dict]:
    """Stream a dataset into JSONL parts; each part is a unit, resumed by skipping done parts."""
    from datasets import load_dataset

    name = source_name(source)
    prefix = f"{index:02d}-{name}"
    per_part = cfg.hf_docs_per_part
    records: dict[str, dict] = {}
    part = 0
    while stage.record_path(f"{prefix}--part-{part:05d}").exists():
        unit_id = f"{prefix}--part-{part:05d}"
        records[unit_id] = read_json(stage.record_path(unit_id))
        part += 1
    already = sum(r["outputs"]["rows"] for r in records.values())
    if records:
        last_rows = records[f"{prefix}--part-{part - 1:05d}"]["outputs"]["rows"]
        if last_rows < per_part or (source.max_docs and already >= source.max_docs):
            return records  # the stream ended (or reached max_docs) in an earlier run
    path = source.uri.removeprefix("hf://")
    dataset = load_dataset(path, name=source.hf_config, split=source.hf_split, streaming=True)
    if source.max_docs:
        dataset = dataset.take(source.max_docs)
    rows = iter(dataset.skip(already) if already else dataset)
    while True:
        start = time.perf_counter()
        batch = [row for _, row in zip(range(per_part), rows, strict=False)]
        if not batch:
            break
        unit_id = f"{prefix}--part-{part:05d}"
        target = f"{prefix}/part-{part:05d}.jsonl.gz"
        dest = files_dir / target
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(dest)
        _write_jsonl_gz(tmp, batch)
        commit(tmp, dest)
        size = dest.stat().st_size
        result = UnitResult(bytes_in=size, bytes_out=size)
        result.keep()
        result.outputs = {
            "rows": len(batch),
            "files": [{"path": target, "sha256": sha256_file(dest), "bytes": size,
                       "source": name, "origin": source.uri, "text_field": source.text_field}],
        }
        record = {**result.to_json(), "seconds": round(time.perf_counter() - start, 4)}
        atomic_write_json(stage.record_path(unit_id), record)
        records[unit_id] = record
        part += 1
        if len(batch) < per_part:
            break
    return records


def _write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    """gzip without a name or time in its header: a redone part is byte-identical."""
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        io.TextIOWrapper(gz, encoding="utf-8") as f,
    ):
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


# ---------------------------------------------------------------- the stage


def download_fingerprint(cfg: ForgeConfig) -> str:
    """The download settings and the sources decide what is fetched."""
    return config_hash(cfg.data.download, json.dumps(
        [s.model_dump(mode="json") for s in cfg.data.sources], sort_keys=True))


def run_download(cfg: ForgeConfig, progress: ProgressFn | None = None,
                 overwrite: bool = False) -> dict:
    if not cfg.data.sources:
        raise StageError("data.sources is empty: list at least one source in the config, or "
                         "pass --source PATH_OR_URL_OR_GLOB")
    planned = plan_units(cfg)  # a required source that matches nothing fails here, before work

    def work(stage: Stage) -> dict:
        files_dir = stage.folder / "files"
        files_dir.mkdir(parents=True, exist_ok=True)
        common = {"out_dir": str(files_dir),
                  "download": cfg.data.download.model_dump(mode="json")}
        units = [Unit(u.id, {**u.payload, **common}) for u in planned]
        records = stage.run_units(units, download_unit, cfg.workers, progress,
                                  executor=cfg.executor)
        for index, source in enumerate(cfg.data.sources):
            if source_kind(source.uri) == "hf":
                records.update(stream_hf_source(stage, index, source, cfg.data.download,
                                                files_dir))
        files = [f for r in records.values() for f in r["outputs"].get("files", [])]
        if not files:
            raise StageError("download: no source yielded a file; check the sources' paths "
                             "or URLs")
        fingerprint = hashlib.sha256(
            "".join(f"{f['path']}:{f['sha256']};" for f in files).encode()
        ).hexdigest()
        errors = {uid: r["outputs"]["error"] for uid, r in records.items()
                  if "error" in r["outputs"]}
        return stage.write_manifest(records, count_unit="files", files=files, errors=errors,
                                    output_fingerprint=fingerprint)

    return run_stage("download", WorkFolder(cfg.workdir).stage("download"),
                     download_fingerprint(cfg), overwrite, work)

"""download stage: HTTP against a loopback server (resume, retries, caps, checksums, odd
servers), mirrors, sanitized names, local globs, Hugging Face streaming and no-op reruns.

Every URL points at a server started here on 127.0.0.1; nothing needs the network.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import DATA, forge, write_config

from pipeline.config import DownloadConfig, ForgeConfig, SourceConfig, load_config
from pipeline.contract import StageError
from pipeline.download import (
    PermanentDownloadError,
    apply_mirror,
    fetch_url,
    plan_units,
    run_download,
    source_kind,
    source_name,
    with_source_presets,
)

BOOK = DATA / "books" / "pg11.txt.gz"
BOOK_BYTES = BOOK.read_bytes()
BOOK_SHA = hashlib.sha256(BOOK_BYTES).hexdigest()
STALL_S = 1.5  # how long a "stall" response hangs; tests set timeout_s well below it


# ---------------------------------------------------------------- a loopback HTTP server


class Server(ThreadingHTTPServer):
    """Serves `files` (or `default` for any other path) with Range support.

    `plan` holds one action per request, consumed in order; when it is empty requests are
    served normally. Actions: "serve", "drop" (full Content-Length, half the body, close),
    "stall" (half the body, then hang), "ignore_range" (200 with the whole file),
    "wrong_start" (206 from byte 0 whatever was asked), "no_length" (no Content-Length),
    "chunked_drop" (chunked encoding, one chunk, close), or an HTTP status code ("503").
    """

    daemon_threads = True  # a stalled handler must not hold up the teardown

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.default: bytes | None = None
        self.plan: list[str] = []
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - keep pytest output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        srv = self.server
        asked = self.headers.get("Range")
        with srv.lock:
            srv.requests.append((self.path, asked))
            action = srv.plan.pop(0) if srv.plan else "serve"
        if action.isdigit():
            self.send_error(int(action))
            return
        body = srv.files.get(self.path, srv.default)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if asked and action != "ignore_range":
            start = int(asked.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if action == "wrong_start":
                start = 0
        payload = body[start:]
        if chunked := action == "chunked_drop":
            self.protocol_version = "HTTP/1.1"
        if asked and action != "ignore_range":
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif action != "no_length":
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if chunked:
            half = payload[: len(payload) // 2]
            self.wfile.write(f"{len(half):x}\r\n".encode() + half + b"\r\n")
            self._hang_up()
        elif action in ("drop", "stall"):
            self.wfile.write(payload[: len(payload) // 2])
            if action == "stall":
                time.sleep(STALL_S)
            self._hang_up()
        else:
            self.wfile.write(payload)

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------- helpers


def make_config(tmp_path: Path, sources: list[dict], workers: int = 1, **download) -> ForgeConfig:
    path = write_config(tmp_path / "forge.yaml", tmp_path / "work", sources, workers=workers)
    return load_config(path, {"data.download": {"backoff_s": 0.01, "timeout_s": 5, **download}})


def quick(**kwargs) -> DownloadConfig:
    return DownloadConfig(**{"retries": 3, "backoff_s": 0.01, "timeout_s": 5, **kwargs})


def files_dir(tmp_path: Path) -> Path:
    return tmp_path / "work" / "download" / "files"


def written_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in files_dir(tmp_path).rglob("*") if p.is_file())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected network access: {args[0]!r}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# ---------------------------------------------------------------- 1. resume after a drop


def test_dropped_connection_resumes_with_range(tmp_path, server):
    server.files["/books/pg11.txt.gz"] = BOOK_BYTES
    server.plan = ["drop"]
    url = server.base + "books/pg11.txt.gz"
    cfg = make_config(tmp_path, [{"uri": url}])

    manifest = run_download(cfg)

    half = len(BOOK_BYTES) // 2
    assert server.requests == [("/books/pg11.txt.gz", None),
                               ("/books/pg11.txt.gz", f"bytes={half}-")]
    [entry] = manifest["files"]
    assert entry["sha256"] == BOOK_SHA and entry["bytes"] == len(BOOK_BYTES)
    assert entry["origin"] == url
    [path] = written_files(tmp_path)  # no .part or temporary file left beside it
    assert path == files_dir(tmp_path) / entry["path"]
    assert sha(path) == BOOK_SHA
    assert manifest["docs_out"] == 1 and manifest["dropped"] == {} and manifest["errors"] == {}


def test_stalled_server_times_out_and_resumes(tmp_path, server):
    server.files["/f.gz"] = BOOK_BYTES
    server.plan = ["stall"]
    dest = tmp_path / "f.gz"
    started = time.perf_counter()
    fetch_url(server.base + "f.gz", dest, quick(timeout_s=0.3))
    assert time.perf_counter() - started < STALL_S
    assert sha(dest) == BOOK_SHA
    assert server.requests[1][1] == f"bytes={len(BOOK_BYTES) // 2}-"


def test_drops_that_make_progress_do_not_use_up_retries(tmp_path, server):
    """A flaky link that delivers a little more each time is not a dead one."""
    server.files["/f.gz"] = BOOK_BYTES
    server.plan = ["drop"] * 4
    dest = tmp_path / "f.gz"
    fetch_url(server.base + "f.gz", dest, quick(retries=1))
    assert sha(dest) == BOOK_SHA
    starts = [int(r[1].removeprefix("bytes=").rstrip("-")) if r[1] else 0
              for r in server.requests]
    assert len(starts) == 5 and starts == sorted(set(starts))


@pytest.mark.parametrize("second", ["ignore_range", "wrong_start"])
def test_server_answering_from_byte_zero_restarts_the_file(tmp_path, server, second):
    """After a drop, a server that sends the whole file again (200, or 206 from byte 0)
    must not have it appended to the half already there."""
    server.files["/f.gz"] = BOOK_BYTES
    server.plan = ["drop", second]
    dest = tmp_path / "f.gz"
    fetch_url(server.base + "f.gz", dest, quick())
    assert server.requests[1][1] == f"bytes={len(BOOK_BYTES) // 2}-"
    assert sha(dest) == BOOK_SHA
    assert not dest.with_name("f.gz.part").exists()


def test_complete_part_is_committed_on_416(tmp_path, server):
    """A crash after the last byte but before the rename: the server answers 416."""
    server.files["/f.gz"] = BOOK_BYTES
    dest = tmp_path / "f.gz"
    dest.with_name("f.gz.part").write_bytes(BOOK_BYTES)
    fetch_url(server.base + "f.gz", dest, quick())
    assert server.requests == [("/f.gz", f"bytes={len(BOOK_BYTES)}-")]
    assert sha(dest) == BOOK_SHA and not dest.with_name("f.gz.part").exists()


def test_stale_longer_part_is_discarded_on_416(tmp_path, server):
    """A part longer than the file (the file changed upstream) is not the file: start over."""
    server.files["/f.gz"] = BOOK_BYTES
    dest = tmp_path / "f.gz"
    dest.with_name("f.gz.part").write_bytes(BOOK_BYTES + b"stale tail")
    fetch_url(server.base + "f.gz", dest, quick())
    assert sha(dest) == BOOK_SHA
    assert server.requests[-1] == ("/f.gz", None)


def test_broken_chunked_response_is_retried(tmp_path, server):
    server.files["/f.gz"] = BOOK_BYTES
    server.plan = ["chunked_drop"]
    dest = tmp_path / "f.gz"
    fetch_url(server.base + "f.gz", dest, quick())
    assert sha(dest) == BOOK_SHA and len(server.requests) == 2


# ---------------------------------------------------------------- 2-4. counted drops


def test_404_is_a_counted_drop_and_the_stage_completes(tmp_path, server):
    server.files["/ok.gz"] = BOOK_BYTES
    cfg = make_config(tmp_path, [{"uri": server.base + "missing.txt"},
                                 {"uri": server.base + "ok.gz"},
                                 {"uri": str(DATA / "books" / "pg11231.txt.gz")}])
    manifest = run_download(cfg)
    assert manifest["dropped"] == {"http_404": 1}
    assert manifest["docs_in"] == 3 and manifest["docs_out"] == 2
    [(unit_id, error)] = manifest["errors"].items()
    assert unit_id.startswith("00-") and "404" in error and "missing.txt" in error
    assert sorted(f["sha256"] for f in manifest["files"]) == sorted(
        [BOOK_SHA, sha(DATA / "books" / "pg11231.txt.gz")])
    assert len(written_files(tmp_path)) == 2
    assert [p for p in server.requests if p[0] == "/missing.txt"] == [("/missing.txt", None)]


def test_wrong_checksum_is_dropped_and_leaves_no_file(tmp_path, server):
    server.files["/bad.gz"] = BOOK_BYTES
    server.files["/good.gz"] = BOOK_BYTES
    cfg = make_config(tmp_path, [{"uri": server.base + "bad.gz", "sha256": "0" * 64},
                                 {"uri": server.base + "good.gz", "sha256": BOOK_SHA.upper()}])
    manifest = run_download(cfg)
    assert manifest["dropped"] == {"checksum_mismatch": 1}
    [error] = manifest["errors"].values()
    assert BOOK_SHA in error and "0" * 64 in error
    [entry] = manifest["files"]
    assert entry["origin"].endswith("/good.gz")
    assert [p.name for p in written_files(tmp_path)] == [Path(entry["path"]).name]


def test_size_cap_gives_too_large(tmp_path, server):
    server.default = BOOK_BYTES
    server.plan = ["serve", "no_length"]  # the cap holds with and without Content-Length
    cfg = make_config(tmp_path, [{"uri": server.base + "big.gz"},
                                 {"uri": server.base + "big.gz?again"},
                                 {"uri": str(BOOK)},
                                 {"uri": str(tmp_path / "small.txt")}],
                      max_file_mb=0.01)
    (tmp_path / "small.txt").write_text("small enough\n")
    manifest = run_download(cfg)
    assert manifest["dropped"] == {"too_large": 3}
    assert [Path(f["path"]).name for f in manifest["files"]] == ["small.txt"]
    assert [p.name for p in written_files(tmp_path)] == ["small.txt"]
    assert len(server.requests) == 2


def test_size_cap_is_decided_from_content_length_before_the_body(tmp_path, server):
    """Half the file fits under the cap, then the server hangs: only a refusal based on
    Content-Length returns at once, without waiting for a body that exceeds the cap."""
    server.files["/f.gz"] = BOOK_BYTES
    server.plan = ["stall"]
    cap_mb = (len(BOOK_BYTES) * 0.6) / 1e6
    started = time.perf_counter()
    with pytest.raises(PermanentDownloadError) as info:
        fetch_url(server.base + "f.gz", tmp_path / "f.gz", quick(max_file_mb=cap_mb))
    assert info.value.reason == "too_large" and time.perf_counter() - started < STALL_S / 2
    assert len(server.requests) == 1 and not os.listdir(tmp_path)


# ---------------------------------------------------------------- 5. retries


def test_retries_with_backoff_then_success(tmp_path, server):
    server.files["/f.gz"] = BOOK_BYTES
    server.plan = ["500", "503"]
    cfg = make_config(tmp_path, [{"uri": server.base + "f.gz"}], retries=2, backoff_s=0.05)
    started = time.perf_counter()
    manifest = run_download(cfg)
    assert time.perf_counter() - started >= 0.05 + 0.1  # backoff doubles: 0.05 s, then 0.1 s
    assert len(server.requests) == 3
    assert [f["sha256"] for f in manifest["files"]] == [BOOK_SHA]
    assert manifest["dropped"] == {}


def test_exhausted_retries_fail_the_unit_and_a_rerun_finishes_it(tmp_path, server):
    server.files["/f.gz"] = BOOK_BYTES
    server.files["/g.gz"] = BOOK_BYTES
    server.plan = ["503", "503"]  # the first URL's two attempts
    cfg = make_config(tmp_path, [{"uri": server.base + "f.gz"}, {"uri": server.base + "g.gz"}],
                      retries=1)
    with pytest.raises(StageError, match=r"1 unit\(s\) failed.*503.*rerun"):
        run_download(cfg)
    units = tmp_path / "work" / "download" / "units"
    assert [p.name.startswith("01-") for p in units.glob("*.json")] == [True]
    assert not (tmp_path / "work" / "download" / "manifest.json").exists()
    manifest = run_download(cfg)
    assert [f["sha256"] for f in manifest["files"]] == [BOOK_SHA, BOOK_SHA]
    assert [r[0] for r in server.requests] == ["/f.gz", "/f.gz", "/g.gz", "/f.gz"]


# ---------------------------------------------------------------- 6. mirrors


def test_mirror_to_a_local_folder_needs_no_network(tmp_path, monkeypatch):
    no_network(monkeypatch)
    mirror = tmp_path / "mirror"
    (mirror / "cache" / "epub").mkdir(parents=True)
    (mirror / "cache" / "epub" / "a book.txt").write_text("mirrored\n")
    book_url = "https://www.gutenberg.org/cache/epub/11/pg11.txt.gz"
    cfg = make_config(tmp_path, [
        {"uri": "https://www.gutenberg.org/cache/epub/a%20book.txt"},
        {"uri": book_url, "sha256": BOOK_SHA},
        {"uri": "https://www.gutenberg.org/..%2Fforge.yaml"},  # must not leave the mirror
    ], retries=0, mirror={"https://www.gutenberg.org/": str(mirror),
                          "https://www.gutenberg.org/cache/epub/11/": str(DATA / "books")})
    manifest = run_download(cfg)
    assert [f["origin"] for f in manifest["files"]] == [
        "https://www.gutenberg.org/cache/epub/a%20book.txt", book_url]
    assert manifest["files"][1]["sha256"] == BOOK_SHA
    assert (files_dir(tmp_path) / manifest["files"][0]["path"]).read_text() == "mirrored\n"
    assert manifest["docs_out"] == 2 and sum(manifest["dropped"].values()) == 1


def test_mirror_to_another_base_url(tmp_path, server):
    server.files["/mirror/cache/epub/11/pg11.txt.gz"] = BOOK_BYTES
    cfg = make_config(tmp_path, [{"uri": "https://www.gutenberg.org/cache/epub/11/pg11.txt.gz"}],
                      retries=0, mirror={"https://www.gutenberg.org/": server.base + "mirror/"})
    manifest = run_download(cfg)
    assert server.requests == [("/mirror/cache/epub/11/pg11.txt.gz", None)]
    assert [f["sha256"] for f in manifest["files"]] == [BOOK_SHA]


def test_apply_mirror_longest_prefix_wins():
    mirror = {"https://a.org/": "http://m1/", "https://a.org/deep/": "http://m2/x"}
    assert apply_mirror("https://a.org/deep/f.txt", mirror) == "http://m2/x/f.txt"
    assert apply_mirror("https://a.org/f.txt", mirror) == "http://m1/f.txt"
    assert apply_mirror("https://b.org/f.txt", mirror) == "https://b.org/f.txt"


# ---------------------------------------------------------------- 7. sanitized names


def test_hostile_and_odd_names_stay_inside_the_work_folder(tmp_path, server):
    server.default = b"payload\n"
    outside_before = sorted(tmp_path.parent.iterdir())
    long_dir = tmp_path / "src" / ("d" * 150)
    long_dir.mkdir(parents=True)
    (long_dir / ("f" * 200 + ".txt")).write_text("long\n")
    paths = ["dir/..%2F..%2Fescape.txt", "%2e%2e/", "%2e%2e", "", "..%5c..%5cwin.txt",
             "a%00b.txt", "x" * 300 + ".txt", "q.txt?name=../../escape2.txt",
             "%2F%2Fabs%2Fescape3.txt"]
    sources = [{"uri": server.base + p} for p in paths]
    sources += [{"uri": str(long_dir / "*.txt"), "name": "n" * 200}]
    sources += [{"uri": server.base + "y.txt", "name": "../../escape4"}]
    cfg = make_config(tmp_path, sources)

    manifest = run_download(cfg)

    assert manifest["docs_out"] == len(sources) and manifest["dropped"] == {}
    work = (tmp_path / "work").resolve()
    root = files_dir(tmp_path).resolve()
    written = written_files(tmp_path)
    assert len(written) == len(sources)
    assert {p.resolve() for p in written} == {(root / f["path"]).resolve()
                                              for f in manifest["files"]}
    for path in written:
        assert root in path.resolve().parents
        assert len(path.name) <= 255
    for record in (work / "download" / "units").iterdir():
        assert len(record.name) <= 255
    assert not [p for p in work.rglob("*") if p.name.endswith((".part", ".tmp"))]
    assert sorted(tmp_path.parent.iterdir()) == outside_before
    assert {p.name for p in tmp_path.iterdir()} == {"forge.yaml", "work", "src"}
    assert {p.name for p in (work / "download").iterdir()} == {"files", "units", "stage.json",
                                                               "manifest.json"}
    assert {p.parent for p in written} <= set(root.iterdir())  # one level: files/<source>/


def test_local_names_that_sanitize_alike_stay_distinct(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a b.txt", "a_b.txt", "a?b.txt", "a__b.txt"):
        (src / name).write_text(name)
    (src / "a").mkdir()
    (src / "a" / "b.txt").write_text("a/b.txt")  # becomes a__b.txt once flattened
    cfg = make_config(tmp_path, [{"uri": str(src)}])
    manifest = run_download(cfg)
    assert manifest["docs_out"] == 5
    contents = sorted((files_dir(tmp_path) / f["path"]).read_text() for f in manifest["files"])
    assert contents == sorted(["a b.txt", "a_b.txt", "a?b.txt", "a__b.txt", "a/b.txt"])


# ---------------------------------------------------------------- 8. local globs


def test_local_glob_is_one_unit_per_file(tmp_path):
    pattern = str(DATA / "books" / "pg11*.txt.gz")
    expected = sorted(p for p in (DATA / "books").glob("pg11*.txt.gz"))
    assert len(expected) >= 3
    cfg = make_config(tmp_path, [{"uri": pattern},
                                 {"uri": str(tmp_path / "none" / "*.txt"), "optional": True}],
                      workers=2)
    assert [u.payload["kind"] for u in plan_units(cfg)] == ["local"] * len(expected) + ["missing"]

    manifest = run_download(cfg)

    assert manifest["units"] == len(expected) + 1
    assert manifest["dropped"] == {"no_matching_files": 1}
    assert "none" in next(iter(manifest["errors"].values()))
    assert [f["origin"] for f in manifest["files"]] == [str(p) for p in expected]
    assert [f["sha256"] for f in manifest["files"]] == [sha(p) for p in expected]
    assert {f["source"] for f in manifest["files"]} == {"books"}
    units = sorted((tmp_path / "work" / "download" / "units").glob("*.json"))
    assert len(units) == len(expected) + 1


def test_a_required_source_that_matches_nothing_fails_before_work_naming_it(tmp_path):
    typo = str(tmp_path / "bookz" / "*.txt")
    config = write_config(tmp_path / "forge.yaml", tmp_path / "work",
                          [{"uri": str(DATA / "books" / "the-verdict.txt")}, {"uri": typo}])
    result = forge("prepare", "--config", str(config), check=False)
    assert result.returncode == 2
    assert f"data.sources[1] ({typo}) matches no file" in result.stderr
    assert "optional: true" in result.stderr
    assert not list((tmp_path / "work" / "download").glob("units/*.json"))  # no unit ran


def test_a_failing_unit_prints_one_sentence_and_its_traceback_only_with_debug(tmp_path):
    import yaml

    config = write_config(tmp_path / "forge.yaml", tmp_path / "work",
                          [{"uri": "http://127.0.0.1:9/x.txt"}])  # port 9: connection refused
    raw = yaml.safe_load(config.read_text())
    raw["data"]["download"] = {"retries": 1, "backoff_s": 0.01}
    config.write_text(yaml.safe_dump(raw))
    result = forge("prepare", "--config", str(config), "--quiet", check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "x.txt" in line]
    assert len(errors) == 1 and errors[0].startswith("error: download: 1 unit(s) failed")
    debug = forge("prepare", "--config", str(config), "--quiet", "--debug", check=False)
    assert "Traceback" in debug.stderr and "giving up after 2 failed attempts" in debug.stderr


def test_recursive_glob_keeps_subfolders_apart(tmp_path):
    src = tmp_path / "src"
    for sub in ("x", "y"):
        (src / sub).mkdir(parents=True)
        (src / sub / "doc.jsonl").write_text(json.dumps({"text": sub}) + "\n")
    (src / "skip.txt").write_text("not matched")
    cfg = make_config(tmp_path, [{"uri": str(src / "**" / "*.jsonl"), "text_field": "body"}])
    manifest = run_download(cfg)
    assert sorted(Path(f["path"]).name for f in manifest["files"]) == ["x__doc.jsonl",
                                                                        "y__doc.jsonl"]
    assert {f["text_field"] for f in manifest["files"]} == {"body"}


def test_no_file_from_any_source_fails_the_stage(tmp_path):
    cfg = make_config(tmp_path, [{"uri": str(tmp_path / "nothing" / "*.gz"), "optional": True}])
    with pytest.raises(StageError, match="no source yielded a file; check the sources"):
        run_download(cfg)


# ---------------------------------------------------------------- 9. Hugging Face streaming


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    # the flags are read when `datasets` is imported: another test may have imported it first
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    no_network(monkeypatch)


def make_hf_folder(root: Path, n: int = 25) -> list[dict]:
    rows = [{"id": f"doc-{i}", "text": f"Document {i}: caf\u00e9 \u2014 {'word ' * i}"}
            for i in range(n)]
    root.mkdir(parents=True)
    for k, (a, b) in enumerate([(0, 9), (9, 17), (17, n)]):
        with open(root / f"data-{k:05d}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[a:b])
    return rows


def read_part(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_hf_streaming_parts_and_resume(tmp_path, hf_offline, monkeypatch):
    import datasets

    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append(kwargs.get("streaming"))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    rows = make_hf_folder(tmp_path / "webtext")
    cfg = make_config(tmp_path, [{"uri": f"hf://{tmp_path / 'webtext'}"}], hf_docs_per_part=10)

    manifest = run_download(cfg)

    assert calls == [True]
    parts = [files_dir(tmp_path) / f["path"] for f in manifest["files"]]
    assert [p.name for p in parts] == ["part-00000.jsonl.gz", "part-00001.jsonl.gz",
                                       "part-00002.jsonl.gz"]
    assert [len(read_part(p)) for p in parts] == [10, 10, 5]
    assert [r for p in parts for r in read_part(p)] == rows
    assert {f["source"] for f in manifest["files"]} == {"webtext"}
    assert manifest["units"] == 3 and manifest["docs_out"] == 3
    assert [f["sha256"] for f in manifest["files"]] == [sha(p) for p in parts]

    units = tmp_path / "work" / "download" / "units"
    first = (units / "00-webtext--part-00000.json").stat().st_mtime_ns
    [last] = units.glob("*part-00002.json")
    last.unlink()
    parts[2].unlink()
    (tmp_path / "work" / "download" / "manifest.json").unlink()  # a crash leaves none
    time.sleep(0.01)

    again = run_download(cfg)

    assert again["output_fingerprint"] == manifest["output_fingerprint"]
    assert again["files"] == manifest["files"]
    assert [r for p in parts for r in read_part(p)] == rows
    assert (units / "00-webtext--part-00000.json").stat().st_mtime_ns == first


def test_hf_parts_are_byte_identical_across_runs(tmp_path, hf_offline):
    make_hf_folder(tmp_path / "ds")
    fingerprints = []
    for run in ("a", "b"):
        if fingerprints:
            time.sleep(1.1)  # gzip headers count seconds: a timestamp in them would differ
        sources = [{"uri": f"hf://{tmp_path}/ds"}]
        path = write_config(tmp_path / f"{run}.yaml", tmp_path / run, sources)
        cfg = load_config(path, {"data.download": {"hf_docs_per_part": 10}})
        fingerprints.append(run_download(cfg)["output_fingerprint"])
    assert fingerprints[0] == fingerprints[1]


@pytest.mark.parametrize("max_docs, sizes", [(13, [10, 3]), (20, [10, 10]), (40, [10, 10, 5])])
def test_hf_max_docs_limits_rows(tmp_path, hf_offline, max_docs, sizes):
    rows = make_hf_folder(tmp_path / "ds")
    cfg = make_config(tmp_path, [{"uri": f"hf://{tmp_path / 'ds'}", "max_docs": max_docs}],
                      hf_docs_per_part=10)
    manifest = run_download(cfg)
    parts = [read_part(files_dir(tmp_path) / f["path"]) for f in manifest["files"]]
    assert [len(p) for p in parts] == sizes
    assert [r for p in parts for r in p] == rows[:max_docs]
    # a rerun after a crash that left no manifest finds the stream done: same files
    (tmp_path / "work" / "download" / "manifest.json").unlink()
    assert run_download(cfg)["files"] == manifest["files"]


# ---------------------------------------------------------------- 10. reruns


def test_rerun_of_a_finished_download_is_a_no_op(tmp_path, server):
    server.files["/f.gz"] = BOOK_BYTES
    cfg = make_config(tmp_path, [{"uri": server.base + "f.gz"}, {"uri": str(BOOK)},
                                 {"uri": server.base + "gone"}])
    manifest = run_download(cfg)
    folder = tmp_path / "work" / "download"
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    requests = len(server.requests)
    time.sleep(0.01)

    assert run_download(cfg) == manifest
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == stamps
    assert len(server.requests) == requests


def test_changed_sources_refuse_the_old_folder(tmp_path):
    cfg = make_config(tmp_path, [{"uri": str(BOOK)}])
    run_download(cfg)
    other = make_config(tmp_path, [{"uri": str(DATA / "books" / "pg11231.txt.gz")}])
    with pytest.raises(StageError, match="--overwrite"):
        run_download(other)
    manifest = run_download(other, overwrite=True)
    assert [Path(f["path"]).name for f in manifest["files"]] == ["pg11231.txt.gz"]
    assert len(written_files(tmp_path)) == 1


@pytest.mark.slow
def test_cli_names_the_fix_when_no_source_yields_a_file(tmp_path):
    config = write_config(tmp_path / "forge.yaml", tmp_path / "work",
                          [{"uri": str(tmp_path / "nothing" / "*.gz")}], workers=1)
    failed = forge("download", "--config", str(config), "--quiet", check=False)
    assert failed.returncode == 2
    assert "matches no file: fix the path" in failed.stderr
    forge("download", "--config", str(config), "--quiet", "--source", str(BOOK), "--overwrite")
    manifest = json.loads((tmp_path / "work" / "download" / "manifest.json").read_text())
    assert [f["sha256"] for f in manifest["files"]] == [BOOK_SHA]


# ---------------------------------------------------------------- small pieces


def test_source_kinds_and_names():
    assert source_kind("hf://HuggingFaceFW/fineweb-edu") == "hf"
    assert source_kind("https://x.org/a") == "url" and source_kind("/data/*.gz") == "local"
    assert source_name(SourceConfig(uri="hf://HuggingFaceFW/fineweb-edu/")) == "fineweb-edu"
    assert source_name(SourceConfig(uri="https://www.gutenberg.org/a")) == "www.gutenberg.org"
    assert source_name(SourceConfig(uri=str(DATA / "books" / "*.gz"))) == "books"
    assert source_name(SourceConfig(uri="x", name="../my books")) == "my_books"


def test_permanent_errors_are_not_retried(tmp_path, server):
    for code in (403, 410):
        server.requests.clear()
        server.plan = [str(code)]
        with pytest.raises(PermanentDownloadError) as info:
            fetch_url(server.base + "f", tmp_path / "f", quick())
        assert info.value.reason == f"http_{code}" and len(server.requests) == 1
    assert not os.listdir(tmp_path)


def test_unnamed_sources_that_are_plainly_books_get_the_books_preset(tmp_path):
    """A Gutenberg header or book-length plain text, whatever the folder is called; a named
    source keeps the rules its name picks, a web-like folder keeps the web rules."""
    header = tmp_path / "incoming" / "opticks.txt"
    header.parent.mkdir()
    header.write_text("The Project Gutenberg EBook of Opticks, by Isaac Newton\n\nOPTICKS\n")
    pages = tmp_path / "crawl" / "page.txt"
    pages.parent.mkdir()
    pages.write_text("Buy now! Click here.\n" * 50)
    book = str(DATA / "books" / "pg1004.txt.gz")
    cfg = make_config(tmp_path, [
        {"uri": str(header.parent / "*.txt")},
        {"uri": str(pages.parent)},
        {"uri": book, "name": "mine"},
        {"uri": book},
        {"uri": "https://www.gutenberg.org/cache/epub/1342/pg1342.txt"},
    ])
    resolved, lines = with_source_presets(cfg)
    assert lines == [
        "source incoming: books preset (not web text: Project Gutenberg header in opticks.txt; "
        "set filter.per_source.incoming or --source NAME=PATH to choose)",
        "source crawl: web rules (no filter.per_source.crawl)",
        "source mine: web rules (no filter.per_source.mine)",
        "source books: books preset (not web text: book-length plain text in pg1004.txt.gz; "
        "set filter.per_source.books or --source NAME=PATH to choose)",
        "source www.gutenberg.org: books preset (not web text: a Project Gutenberg URL; set "
        "filter.per_source.www.gutenberg.org or --source NAME=PATH to choose)",
    ]
    assert resolved.data.filter.for_source("incoming").gopher_quality.max_words is None
    assert resolved.data.filter.for_source("crawl").gopher_quality.max_words == 100_000
    assert cfg.data.filter.per_source == {}  # the given config is left as it was

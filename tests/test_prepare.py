"""`forge prepare` end to end on real data: what comes out must equal what went in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import yaml
import zarr
from conftest import forge, small_config, write_config

from pipeline.documents import iter_documents
from pipeline.encoding import EOT_ID, get_encoding
from pipeline.shards import TokenDataset, chunk_file


def decoded_documents(dataset: TokenDataset, split: str) -> list[str]:
    encoding = get_encoding(str(Path(__file__).resolve().parents[2] / "shared/data/gpt2-bpe"))
    texts = []
    for shard in dataset.shards(split):
        tokens, start = shard.tokens(), 0
        for end in shard.doc_ends():
            doc = tokens[start:int(end)]
            assert doc[-1] == EOT_ID and EOT_ID not in doc[:-1]
            texts.append(encoding.decode(doc[:-1].tolist()))
            start = int(end)
        assert start == tokens.size
    return texts


def tokenized_stage(work: Path) -> Path:
    """The document stage tokenize read (extract, or the last enabled one after it)."""
    return work / json.loads((work / "tokenize" / "manifest.json").read_text())["input_stage"]


def test_documents_decoded_from_the_shards_equal_the_input_text(prepared: Path) -> None:
    extracted = [d["text"] for d in iter_documents(tokenized_stage(prepared))]
    dataset = TokenDataset(prepared / "tokenize" / "dataset.zarr")
    train, val = decoded_documents(dataset, "train"), decoded_documents(dataset, "val")
    assert len(extracted) > 50 and len(val) >= 1
    assert sorted(train + val) == sorted(extracted)
    in_order = [t for t in extracted if t in set(train)]
    assert train == in_order  # shards keep the extraction order


def test_memmap_and_zarr_reads_agree_and_plain_zarr_opens_it(prepared: Path) -> None:
    path = prepared / "tokenize" / "dataset.zarr"
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    assert attrs["tokenizer"] == "gpt2" and attrs["eot_id"] == EOT_ID
    assert attrs["dtype"] == "uint16" and len(attrs["fingerprint"]) == 64
    total = 0
    for split in ("train", "val"):
        for name in group[split].array_keys():
            array = group[f"{split}/{name}"]
            mapped = np.memmap(chunk_file(path / split / name), dtype="<u2", mode="r")
            assert array.dtype == np.uint16 and array.shape == mapped.shape
            assert np.array_equal(array[:], mapped)
            ends = group[f"doc_ends/{split}/{name}"][:]
            assert ends[-1] == array.shape[0]
            total += array.shape[0]
    assert total == attrs["splits"]["train"]["tokens"] + attrs["splits"]["val"]["tokens"]


def test_verify_passes_and_a_flipped_byte_fails_naming_the_shard(prepared: Path,
                                                               tmp_path: Path) -> None:
    assert "OK" in forge("verify", str(prepared)).stdout
    copy = tmp_path / "dataset.zarr"
    shutil.copytree(prepared / "tokenize" / "dataset.zarr", copy)
    chunk = chunk_file(copy / "train" / "000000")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    result = forge("verify", str(copy), check=False)
    assert result.returncode == 1
    assert "train/000000" in result.stderr and "checksum" in result.stderr


def test_stats_json_matches_the_dataset_and_writes_a_histogram(prepared: Path,
                                                             tmp_path: Path) -> None:
    plot = tmp_path / "lengths.png"
    stats = json.loads(forge("stats", str(prepared), "--json", "--plot", str(plot)).stdout)
    attrs = TokenDataset(prepared / "tokenize" / "dataset.zarr").attrs
    for split in ("train", "val"):
        assert stats["splits"][split]["tokens"] == attrs["splits"][split]["tokens"]
        assert stats["splits"][split]["docs"] == attrs["splits"][split]["docs"]
        assert 2.0 < stats["splits"][split]["bytes_per_token"] < 8.0
    assert [s["stage"] for s in stats["stages"]][:2] == ["download", "extract"]
    assert stats["stages"][-1]["stage"] == "tokenize"
    extract = stats["stages"][1]
    assert extract["in"] == extract["out"] + sum(extract["dropped"].values())
    assert {"books", "speeches", "webdocs"} <= set(stats["source_docs"]) <= {
        "books", "speeches", "gutenberg-html", "warc", "webdocs"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = forge("stats", str(prepared), "--plot", str(plot)).stdout
    assert "train/000000" in text and "extract" in text


def test_every_document_is_accounted_for_across_stages(prepared: Path) -> None:
    stages = [p.parent.name for p in prepared.glob("*/manifest.json")]
    assert {"download", "extract", "tokenize"} <= set(stages)
    manifests = {s: json.loads((prepared / s / "manifest.json").read_text()) for s in stages}
    for manifest in manifests.values():
        assert manifest["docs_in"] == manifest["docs_out"] + sum(manifest["dropped"].values())
    fed = tokenized_stage(prepared).name
    assert manifests["tokenize"]["docs_in"] == manifests[fed]["docs_out"]
    attrs = TokenDataset(prepared / "tokenize" / "dataset.zarr").attrs
    assert attrs["splits"]["train"]["docs"] + attrs["splits"]["val"]["docs"] == \
        manifests["tokenize"]["docs_out"]


def test_one_worker_gives_the_same_fingerprint_as_two(prepared: Path, tmp_path: Path) -> None:
    config = small_config(tmp_path / "c.yaml", tmp_path / "work", workers=1)
    forge("prepare", "--config", str(config), "--quiet")
    one = TokenDataset(tmp_path / "work" / "tokenize" / "dataset.zarr").attrs["fingerprint"]
    two = TokenDataset(prepared / "tokenize" / "dataset.zarr").attrs["fingerprint"]
    assert one == two


def test_rerunning_a_finished_prepare_is_a_no_op(prepared: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(prepared, work)
    config = small_config(tmp_path / "c.yaml", work)
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    result = forge("prepare", "--config", str(config))
    after = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    assert before == after  # nothing rewritten, not even a manifest
    assert "tokenize" in result.stdout  # the summary is still shown


def test_source_option_replaces_the_configs_sources(tmp_path: Path) -> None:
    from conftest import DATA

    config = small_config(tmp_path / "c.yaml", tmp_path / "work")
    forge("prepare", "--config", str(config), "--quiet",
          "--source", str(DATA / "books" / "the-verdict.txt"),
          "--source", str(DATA / "webdocs" / "dolma-cc_en_head-0091.jsonl.gz"),
          "--workdir", str(tmp_path / "other"))
    manifest = json.loads((tmp_path / "other" / "extract" / "manifest.json").read_text())
    assert manifest["docs_out"] == 11  # 1 story + 10 web documents
    assert not (tmp_path / "work").exists()


def test_a_config_typo_fails_before_any_work_naming_the_field(tmp_path: Path) -> None:
    config = small_config(tmp_path / "c.yaml", tmp_path / "work")
    raw = yaml.safe_load(config.read_text())
    raw["data"]["tokenize"]["shard_tokns"] = 5
    raw["workers"] = "two"
    config.write_text(yaml.safe_dump(raw))
    result = forge("prepare", "--config", str(config), check=False)
    assert result.returncode == 2
    assert "data.tokenize.shard_tokns" in result.stderr and "spelling" in result.stderr
    assert "'workers'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "work").exists()


def test_an_unnamed_folder_of_books_gets_the_books_preset_whatever_its_name(
        tmp_path: Path) -> None:
    """A verse book in a folder named like no preset: judged as a book, said at the start."""
    from conftest import DATA

    hostile = tmp_path / "hostile-src"
    hostile.mkdir()
    shutil.copy(DATA / "books" / "pg1004.txt.gz", hostile)  # The Divine Comedy, in verse
    config = write_config(tmp_path / "c.yaml", tmp_path / "work", [{"uri": "replaced"}])
    raw = yaml.safe_load(config.read_text())
    raw["data"]["filter"] = {"per_source": {"mine": {"preset": "books"}}}
    config.write_text(yaml.safe_dump(raw))
    result = forge("prepare", "--config", str(config),
                   "--source", str(hostile / "*.txt.gz"),
                   "--source", f"mine={DATA / 'books' / 'pg1041.txt.gz'}",
                   "--source", str(DATA / "webdocs" / "dolma-cc_en_head-0091.jsonl.gz"))
    lines = result.stdout.splitlines()
    assert ("source hostile-src: books preset (not web text: book-length plain text in "
            "pg1004.txt.gz") in lines[0]
    assert lines[1] == "source mine: books preset (filter.per_source.mine)"
    assert lines[2] == "source webdocs: web rules (no filter.per_source.webdocs)"
    kept = {doc["source"]: doc["text"] for doc in iter_documents(tmp_path / "work" / "filter")}
    assert "Midway upon the journey of our life" in kept["hostile-src"]
    assert "mine" in kept


def test_source_names_come_before_an_equals_sign_and_urls_stay_whole(tmp_path: Path) -> None:
    from cli.common import parse_source

    assert parse_source("books=../data/*.txt") == {"name": "books", "uri": "../data/*.txt"}
    assert parse_source("my_src-2=https://x.org/a.txt") == {"name": "my_src-2",
                                                            "uri": "https://x.org/a.txt"}
    url = "https://example.org/get?id=5&f=txt"
    assert parse_source(url) == {"uri": url}
    assert parse_source("a b=c.txt") == {"uri": "a b=c.txt"}
    odd = tmp_path / "x=y.txt"
    odd.write_text("a file whose name holds '='")
    assert parse_source(str(odd)) == {"uri": str(odd)}
    assert parse_source("x=y.txt") == {"name": "x", "uri": "y.txt"}


def test_no_document_error_leads_to_a_stats_command_that_reports_the_drops(
        tmp_path: Path) -> None:
    """Every document dropped: the error names the command, and that command works."""
    import re

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Too short to keep.\n")
    work = tmp_path / "work"
    config = write_config(tmp_path / "c.yaml", work, [{"uri": str(tiny)}])
    result = forge("prepare", "--config", str(config), check=False)
    assert result.returncode == 2 and "holds no document" in result.stderr
    command = re.search(r"`(forge stats [^`]+)`", result.stderr)[1]
    assert command == f"forge stats {work}"
    shown = forge(*command.split()[1:])
    assert "no token dataset yet" in shown.stdout
    assert "gopher_quality:too_few_words 1" in shown.stdout
    assert "tokenize: under way or failed" in shown.stdout
    stats = json.loads(forge("stats", str(work), "--json").stdout)
    assert stats["dataset"] is None
    assert [row["stage"] for row in stats["stages"]] == ["download", "extract", "filter",
                                                         "dedupe"]
    assert stats["stages"][2]["dropped"] == {"gopher_quality:too_few_words": 1}


def test_a_corrupt_zarr_json_is_named_with_the_command_that_rebuilds_it(tmp_path: Path) -> None:
    dataset = tmp_path / "work" / "tokenize" / "dataset.zarr"
    dataset.mkdir(parents=True)
    (dataset / "zarr.json").write_text("{zarr_format: 3,")
    for command in ("stats", "verify"):
        result = forge(command, str(tmp_path / "work"), check=False)
        assert result.returncode == 2
        assert f"{dataset / 'zarr.json'} is corrupt" in result.stderr
        assert "forge tokenize --config" in result.stderr and "--overwrite" in result.stderr


def test_zero_workers_is_rejected_naming_the_option(tmp_path: Path) -> None:
    result = forge("prepare", "--config", "configs/demo.yaml", "--workers", "0", check=False)
    assert result.returncode == 2
    assert "argument --workers: must be at least 1, got 0" in result.stderr


def test_the_dataset_artifact_gives_each_drop_reason_its_own_row(prepared: Path) -> None:
    from flows.artifacts import dataset_markdown
    from pipeline.stats import dataset_stats

    stats = dataset_stats(prepared / "tokenize" / "dataset.zarr")
    markdown = dataset_markdown(stats)
    reasons = [(row["stage"], reason, n) for row in stats["stages"]
               for reason, n in row["dropped"].items()]
    assert len(reasons) > 3
    for stage, reason, n in reasons:
        assert f"| {stage} | {reason} | {n:,} |" in markdown.splitlines()
    assert max(len(line) for line in markdown.splitlines() if line.startswith("|")) < 100

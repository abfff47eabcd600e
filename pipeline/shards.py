"""The token shard format: a zarr v3 group of raw little-endian uint16 arrays.

    dataset.zarr/
      zarr.json                 group attributes: format, tokenizer, counts, fingerprint
      train/000000/c/0          one chunk per shard: raw tokens, memory-mappable
      val/000000/c/0
      doc_ends/train/000000     uint64 end offset of every document in the shard

Each shard array carries its sha256 (over the token bytes) and the sha256 of its document
ends. The fingerprint hashes those in order, so it depends on content and order only.
Plain `zarr.open_group(path)` reads everything; `numpy.memmap` reads a shard with no copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.files import commit, read_json

FORMAT = "forge-token-shards"
FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype("<u2")
DOC_ENDS_DTYPE = np.dtype("<u8")
SPLITS = ("train", "val")


def _raw_array(store: Path, data: np.ndarray, attributes: dict) -> None:
    """One uncompressed chunk holding the whole array: its chunk file is the raw bytes."""
    import zarr
    from zarr.codecs import BytesCodec

    array = zarr.create_array(
        store=str(store),
        shape=data.shape,
        chunks=data.shape,
        dtype=data.dtype,
        serializer=BytesCodec(endian="little"),
        compressors=None,
        filters=None,
        fill_value=0,
        config={"write_empty_chunks": True},
        attributes=attributes,
    )
    array[:] = data


def chunk_file(array_dir: Path) -> Path:
    return array_dir / "c" / "0"


def write_shard(dataset: Path, staging: Path, split: str, name: str, tokens: np.ndarray,
                doc_ends: np.ndarray, attributes: dict) -> dict:
    """Write a shard and its document ends beside the group, then rename them into it."""
    tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
    doc_ends = np.ascontiguousarray(doc_ends, dtype=DOC_ENDS_DTYPE)
    info = {
        "split": split,
        "name": name,
        "tokens": int(tokens.size),
        "docs": int(doc_ends.size),
        "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
        "doc_ends_sha256": hashlib.sha256(doc_ends.tobytes()).hexdigest(),
        **attributes,
    }
    tag = f"{split}-{name}-{os.getpid()}"
    for data, final, attrs in (
        (doc_ends, dataset / "doc_ends" / split / name, {"sha256": info["doc_ends_sha256"]}),
        (tokens, dataset / split / name, info),
    ):
        tmp = staging / f"{tag}-{final.parent.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        _raw_array(tmp, data, attrs)
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)  # left by a run killed before its record
        commit(tmp, final)
    return info


def fingerprint(shards: list[dict]) -> str:
    """sha256 over the shards' checksums in split and name order."""
    ordered = sorted(shards, key=lambda s: (SPLITS.index(s["split"]), s["name"]))
    text = "".join(f"{s['split']}/{s['name']}:{s['sha256']}:{s['doc_ends_sha256']};"
                   for s in ordered)
    return hashlib.sha256(text.encode()).hexdigest()


def create_layout(dataset: Path) -> None:
    """The groups every shard lives in (zarr v3 has no implicit groups); idempotent."""
    import zarr

    root = zarr.open_group(str(dataset), mode="a")
    for split in SPLITS:
        root.require_group(split)
        root.require_group(f"doc_ends/{split}")


def write_group_attributes(dataset: Path, attributes: dict) -> None:
    """Written last: a dataset whose group has a fingerprint is complete."""
    import zarr

    group = zarr.open_group(str(dataset), mode="a")
    group.attrs.put(attributes)


@dataclass
class Shard:
    split: str
    name: str
    path: Path  # the array's folder
    info: dict

    def tokens(self) -> np.ndarray:
        """The shard's tokens, memory-mapped: no copy, no read until touched."""
        return np.memmap(chunk_file(self.path), dtype=TOKEN_DTYPE, mode="r")

    def doc_ends(self) -> np.ndarray:
        ends = self.path.parent.parent / "doc_ends" / self.split / self.name
        return np.memmap(chunk_file(ends), dtype=DOC_ENDS_DTYPE, mode="r")


class TokenDataset:
    """A finished dataset, read through the group attributes and memory maps."""

    def __init__(self, path: str | Path):
        import zarr

        self.path = Path(path)
        meta = self.path / "zarr.json"
        if not meta.exists():
            raise FileNotFoundError(
                f"{self.path} is not a zarr token dataset (no zarr.json); make one with `forge "
                "prepare --config YOUR_CONFIG`, or pass an existing dataset.zarr or work folder")
        try:
            read_json(meta)  # zarr's own JSON error would not name the file
            self.attrs = dict(zarr.open_group(str(self.path), mode="r").attrs)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{meta} is corrupt ({e}); rebuild the dataset with `forge tokenize "
                             "--config YOUR_CONFIG --overwrite`") from None
        if self.attrs.get("format") != FORMAT or "fingerprint" not in self.attrs:
            raise ValueError(f"{self.path} is not a complete forge token dataset "
                             "(no fingerprint in its attributes); rerun `forge tokenize`")

    def shards(self, split: str | None = None) -> list[Shard]:
        return [Shard(s["split"], s["name"], self.path / s["split"] / s["name"], s)
                for s in self.attrs["shards"] if split in (None, s["split"])]


def verify(path: str | Path) -> list[str]:
    """Recompute every checksum and the fingerprint; return the problems found."""
    dataset = TokenDataset(path)
    problems = []
    for shard in dataset.shards():
        label = f"{shard.split}/{shard.name}"
        try:
            tokens, ends = shard.tokens(), shard.doc_ends()
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"{label}: unreadable ({e})")
            continue
        if tokens.size != shard.info["tokens"]:
            problems.append(f"{label}: {tokens.size} tokens, expected {shard.info['tokens']}")
        if hashlib.sha256(tokens.tobytes()).hexdigest() != shard.info["sha256"]:
            problems.append(f"{label}: token checksum mismatch ({chunk_file(shard.path)})")
        if hashlib.sha256(ends.tobytes()).hexdigest() != shard.info["doc_ends_sha256"]:
            problems.append(f"{label}: document-ends checksum mismatch")
    if fingerprint(dataset.attrs["shards"]) != dataset.attrs["fingerprint"]:
        problems.append("dataset fingerprint does not match the shard checksums")
    return problems

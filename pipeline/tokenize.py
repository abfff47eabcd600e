"""tokenize: documents to GPT-2 token shards (see pipeline/shards.py for the format).

Two kinds of units. First each extracted part is tokenized in a worker (tiktoken, EOT
after every document) into a .npy of tokens and a table of its documents. Then the
documents are packed, in order, into shards that close at a document boundary once
they reach `shard_tokens`; each shard is a unit too. Which document goes to val depends
only on the seed and its id, so the result does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline.config import ForgeConfig, TokenizeConfig
from pipeline.contract import ProgressFn, Stage, StageError, Unit, UnitResult, run_stage
from pipeline.documents import read_part
from pipeline.encoding import EOT_ID, VOCAB_SIZE, get_encoding
from pipeline.files import WorkFolder, commit, config_hash, temp_path_for
from pipeline.registry import input_manifest
from pipeline.shards import (
    FORMAT,
    FORMAT_VERSION,
    SPLITS,
    create_layout,
    fingerprint,
    write_group_attributes,
)
from pipeline.shards import write_shard as write_shard_arrays

DOC_TABLE = np.dtype([("tokens", "<u4"), ("bytes", "<u8"), ("source", "<u2"), ("val", "u1"),
                      ("rank", "<f8")])
ENCODE_BATCH = 256


def split_rank(seed: int, doc_id: str) -> float:
    """A uniform number in [0, 1) from the seed and the document id alone."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def tokenize_unit(payload: dict) -> UnitResult:
    cfg = TokenizeConfig.model_validate(payload["tokenize"])
    encoding = get_encoding(cfg.vocab_dir)
    sources: list[str] = []
    table, pieces = [], []
    result = UnitResult()

    def flush(batch: list[dict]) -> None:
        # one thread: the stage's parallelism is its worker processes
        encoded = encoding.encode_ordinary_batch([d["text"] for d in batch], num_threads=1)
        for doc, ids in zip(batch, encoded, strict=True):
            ids.append(EOT_ID)
            pieces.append(np.asarray(ids, dtype=np.uint16))
            if doc["source"] not in sources:
                sources.append(doc["source"])
            rank = split_rank(cfg.seed, doc["id"])
            text_bytes = len(doc["text"].encode())
            table.append((len(ids), text_bytes, sources.index(doc["source"]),
                          rank < cfg.val_fraction, rank))
            result.keep()
            result.bytes_in += text_bytes

    batch: list[dict] = []
    for doc in read_part(payload["docs_file"]):
        batch.append(doc)
        if len(batch) == ENCODE_BATCH:
            flush(batch)
            batch = []
    flush(batch)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)
    docs = np.array(table, dtype=DOC_TABLE)
    for data, suffix in ((tokens, "tokens.npy"), (docs, "docs.npy")):
        final = Path(payload["dest_prefix"] + suffix)
        tmp = temp_path_for(final)
        with open(tmp, "wb") as out:
            np.save(out, data)
        commit(tmp, final)
    result.bytes_out = int(tokens.nbytes)
    result.outputs = {"tokens": int(tokens.size), "sources": sources,
                      "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
    return result


# ---------------------------------------------------------------- packing into shards


def plan_shards(units: list[tuple[str, np.ndarray, list[str]]], shard_tokens: int,
                want_val: bool) -> list[dict]:
    """Greedy packing in document order; each shard lists runs (unit, token start, end)."""
    val = {(u, int(i)) for u, (_, docs, _) in enumerate(units) for i in np.flatnonzero(docs["val"])}
    ranks = [(r, u, i) for u, (_, docs, _) in enumerate(units) for i, r in enumerate(docs["rank"])]
    if want_val and not val and len(ranks) > 1:
        _, u, i = min(ranks)  # keep a val split on a tiny corpus: the lowest-ranked document
        val = {(u, i)}
    plans: list[dict] = []
    for split in SPLITS:
        current: dict | None = None
        for u, (unit_id, docs, sources) in enumerate(units):
            starts = np.concatenate([[0], np.cumsum(docs["tokens"], dtype=np.int64)])
            for i, doc in enumerate(docs):
                if ((u, i) in val) != (split == "val"):
                    continue
                size = int(doc["tokens"])
                if current is None or (current["tokens"] and current["tokens"] + size >
                                       shard_tokens):
                    current = {"split": split, "name": f"{len(_of(plans, split)):06d}",
                               "runs": [], "tokens": 0, "doc_sizes": [], "text_bytes": 0,
                               "sources": {}}
                    plans.append(current)
                start = int(starts[i])
                runs = current["runs"]
                if runs and runs[-1][0] == unit_id and runs[-1][2] == start:
                    runs[-1][2] = start + size
                else:
                    runs.append([unit_id, start, start + size])
                current["tokens"] += size
                current["doc_sizes"].append(size)
                current["text_bytes"] += int(doc["bytes"])
                source = sources[doc["source"]]
                current["sources"][source] = current["sources"].get(source, 0) + 1
    return plans


def _of(plans: list[dict], split: str) -> list[dict]:
    return [p for p in plans if p["split"] == split]


def write_shard(payload: dict) -> UnitResult:
    plan = payload["plan"]
    units_dir = Path(payload["units_dir"])
    tokens = np.concatenate([
        np.load(units_dir / f"{unit_id}.tokens.npy", mmap_mode="r")[start:end]
        for unit_id, start, end in plan["runs"]
    ])
    doc_ends = np.cumsum(np.asarray(plan["doc_sizes"], dtype=np.uint64))
    info = write_shard_arrays(
        Path(payload["dataset"]), Path(payload["staging"]), plan["split"], plan["name"], tokens,
        doc_ends, {"text_bytes": plan["text_bytes"], "sources": plan["sources"]},
    )
    result = UnitResult(bytes_in=plan["text_bytes"], bytes_out=int(tokens.nbytes))
    result.keep(len(plan["doc_sizes"]))
    result.outputs = {"shard": info}
    return result


# ---------------------------------------------------------------- the stage


def tokenize_fingerprint(cfg: ForgeConfig) -> str:
    upstream = input_manifest(cfg, "tokenize")[1]
    return config_hash(cfg.data.tokenize, upstream["output_fingerprint"])


def run_tokenize(cfg: ForgeConfig, progress: ProgressFn | None = None,
                 overwrite: bool = False) -> dict:
    docs_dir, upstream = input_manifest(cfg, "tokenize")
    tcfg = cfg.data.tokenize
    work = WorkFolder(cfg.workdir)

    def tokenize(stage: Stage) -> dict:
        get_encoding(tcfg.vocab_dir)  # a missing vocabulary fails here, before any work
        units_dir = stage.folder / "tokens"
        units_dir.mkdir(exist_ok=True)
        units = [
            Unit(part["unit"], {
                "docs_file": str(docs_dir / part["file"]),
                "dest_prefix": str(units_dir / f"{part['unit']}."),
                "tokenize": tcfg.model_dump(mode="json"),
            })
            for part in upstream["parts"]
        ]
        records = stage.run_units(units, tokenize_unit, cfg.workers, progress,
                                  executor=cfg.executor)
        loaded = [(u.id, np.load(units_dir / f"{u.id}.docs.npy"),
                   records[u.id]["outputs"]["sources"]) for u in units]
        plans = plan_shards(loaded, tcfg.shard_tokens, tcfg.val_fraction > 0)
        if not plans:
            raise StageError(
                f"tokenize: the input ({docs_dir}) holds no document: every one was dropped "
                f"or none was found; see the drops by stage and reason with `forge stats "
                f"{work.root}`, then fix the sources or the filter rules")
        dataset, staging = work.dataset, stage.folder / "staging"
        staging.mkdir(exist_ok=True)
        create_layout(dataset)
        shard_stage = Stage("tokenize-shards", stage.folder / "shards", stage.config_hash)
        shard_records = shard_stage.run_units(
            [Unit(f"{p['split']}-{p['name']}", {"plan": p, "units_dir": str(units_dir),
                                                 "dataset": str(dataset),
                                                 "staging": str(staging)})
             for p in plans],
            # locally in this process: writing is memcpy and sha256, not worth another pool
            write_shard, 1, progress, executor=cfg.executor,
        )
        shards = [r["outputs"]["shard"] for r in shard_records.values()]
        attributes = dataset_attributes(shards, stage.config_hash)
        write_group_attributes(dataset, attributes)
        return stage.write_manifest(
            records,
            dataset=dataset.name,
            input_stage=docs_dir.name,
            input_fingerprint=upstream["output_fingerprint"],
            output_fingerprint=attributes["fingerprint"],
            splits=attributes["splits"],
        )

    return run_stage("tokenize", work.stage("tokenize"), tokenize_fingerprint(cfg), overwrite,
                     tokenize)


def dataset_attributes(shards: list[dict], cfg_hash: str) -> dict:
    splits, mix = {}, {}
    for split in SPLITS:
        mine = [s for s in shards if s["split"] == split]
        splits[split] = {"tokens": sum(s["tokens"] for s in mine),
                         "docs": sum(s["docs"] for s in mine), "shards": len(mine)}
    for shard in shards:
        for source, docs in shard["sources"].items():
            mix[source] = mix.get(source, 0) + docs
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": "gpt2",
        "vocab_size": VOCAB_SIZE,
        "eot_id": EOT_ID,
        "dtype": "uint16",
        "splits": splits,
        "source_docs": dict(sorted(mix.items())),
        "config_hash": cfg_hash,
        "shards": sorted(shards, key=lambda s: (SPLITS.index(s["split"]), s["name"])),
        "fingerprint": fingerprint(shards),
    }

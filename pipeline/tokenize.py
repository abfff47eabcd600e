"""tokenize: documents to GPT-2 token shards (see pipeline/shards.py for the format).

Two kinds of units. First each extracted part is tokenized (tiktoken, EOT after every
document) into a .npy of tokens and a table of its documents, in threads of this process:
tiktoken's encoder releases the GIL, so threads save the start-up of worker processes and
their copies of the encoder. Then the
documents are packed, in order, into shards that close at a document boundary once
they reach `shard_tokens`; each shard is a unit too. Which document goes to val depends
only on the seed and its id, so the result does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, ForgeConfig, TokenizeConfig
from pipeline.contract import ProgressFn, Stage, StageError, Unit, UnitResult, run_stage
from pipeline.documents import read_part
from pipeline.download import source_name
from pipeline.encoding import EOT_ID, VOCAB_SIZE, get_encoding
from pipeline.files import WorkFolder, commit_all, config_hash, temp_path_for
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
    eot = np.array([EOT_ID], dtype=np.uint16)
    for doc in read_part(payload["docs_file"]):
        # encode_ordinary's tokens (no special token is allowed, none refused), as a numpy
        # buffer rather than a list of Python ints, encoded with the GIL released
        ids = encoding.encode_to_numpy(doc["text"], disallowed_special=())
        pieces += [ids.astype(np.uint16), eot]
        if doc["source"] not in sources:
            sources.append(doc["source"])
        rank = split_rank(cfg.seed, doc["id"])
        text_bytes = len(doc["text"].encode())
        table.append((ids.size + 1, text_bytes, sources.index(doc["source"]),
                      rank < cfg.val_fraction, rank))
        result.keep()
        result.bytes_in += text_bytes
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)
    docs = np.array(table, dtype=DOC_TABLE)
    written = []
    for data, suffix in ((tokens, "tokens.npy"), (docs, "docs.npy")):
        final = Path(payload["dest_prefix"] + suffix)
        tmp = temp_path_for(final)
        with open(tmp, "wb") as out:
            np.save(out, data)
        written.append((tmp, final))
    commit_all(written)
    result.bytes_out = int(tokens.nbytes)
    result.outputs = {"tokens": int(tokens.size), "sources": sources,
                      "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
    return result


# ---------------------------------------------------------------- packing into shards


def mix_copies(weight: float, rank: float, val_fraction: float) -> int:
    """How many times a train document of a source of `weight` goes into the train split:
    the weight's whole part, plus one for a seeded share (its fractional part) of the
    documents. The share is drawn from the document's split rank, uniform over the train
    documents once rescaled, so it depends only on the seed and the id."""
    whole = int(weight)
    return whole + ((rank - val_fraction) / (1 - val_fraction) < weight - whole)


def plan_shards(units: list[tuple[str, np.ndarray, list[str]]], shard_tokens: int,
                want_val: bool, mix: dict[str, float] | None = None, val_fraction: float = 0.0,
                tally: dict[str, dict[str, int]] | None = None) -> list[dict]:
    """Greedy packing in document order; each shard lists runs (unit, token start, end).

    With a `mix`, the train split is packed in passes: the second pass holds the second
    copies of the sources weighing more than 1, and so on, so repeats are spread out.
    `tally` receives the train tokens per source before and after the mix.
    """
    mix = mix or {}
    tally = tally if tally is not None else {}
    before, after = tally.setdefault("before", {}), tally.setdefault("after", {})
    val = {(u, int(i)) for u, (_, docs, _) in enumerate(units) for i in np.flatnonzero(docs["val"])}
    ranks = [(r, u, i) for u, (_, docs, _) in enumerate(units) for i, r in enumerate(docs["rank"])]
    if want_val and not val and len(ranks) > 1:
        _, u, i = min(ranks)  # keep a val split on a tiny corpus: the lowest-ranked document
        val = {(u, i)}
    plans: list[dict] = []
    passes = math.ceil(max([1.0, *mix.values()]))
    current: dict | None = None
    for split, repeat in [("train", r) for r in range(passes)] + [("val", 0)]:
        if repeat == 0:
            current = None  # a split starts a shard
        for u, (unit_id, docs, sources) in enumerate(units):
            starts = np.concatenate([[0], np.cumsum(docs["tokens"], dtype=np.int64)])
            for i, doc in enumerate(docs):
                if ((u, i) in val) != (split == "val"):
                    continue
                size, source = int(doc["tokens"]), sources[doc["source"]]
                if split == "train" and repeat == 0:
                    before[source] = before.get(source, 0) + size
                weight = mix.get(source, 1.0)
                if split == "train" and mix_copies(weight, doc["rank"], val_fraction) <= repeat:
                    continue
                if split == "train":
                    after[source] = after.get(source, 0) + size
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
    check_tokenize(cfg)
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
                                  executor=cfg.executor, threads=True)
        loaded = [(u.id, np.load(units_dir / f"{u.id}.docs.npy"),
                   records[u.id]["outputs"]["sources"]) for u in units]
        check_mix(tcfg, {s for _, _, sources in loaded for s in sources})
        tally: dict[str, dict[str, int]] = {}
        plans = plan_shards(loaded, tcfg.shard_tokens, tcfg.val_fraction > 0, tcfg.mix,
                            tcfg.val_fraction, tally)
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
            # threads: sha256, file writes and fsyncs release the GIL
            write_shard, cfg.workers, progress, executor=cfg.executor, threads=True,
        )
        shards = [r["outputs"]["shard"] for r in shard_records.values()]
        attributes = dataset_attributes(shards, stage.config_hash, source_tokens={
            source: {"weight": tcfg.mix.get(source, 1.0), "before_mix": tokens,
                     "after_mix": tally["after"].get(source, 0)}
            for source, tokens in sorted(tally["before"].items())})
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


def check_tokenize(cfg: ForgeConfig) -> None:
    """Before any work: the mix names sources of the config (when it lists them)."""
    if cfg.data.sources:
        check_mix(cfg.data.tokenize, {source_name(s) for s in cfg.data.sources})


def check_mix(cfg: TokenizeConfig, sources: set[str]) -> None:
    """A mix naming a source that no document has is a typo: fail, naming it."""
    for name in cfg.mix:
        if name not in sources:
            raise ConfigError(f"data.tokenize.mix names source {name!r}, which no document has "
                              f"(sources: {', '.join(sorted(sources)) or 'none'}); fix the "
                              "name or remove it")


def dataset_attributes(shards: list[dict], cfg_hash: str,
                       source_tokens: dict[str, dict] | None = None) -> dict:
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
        "source_tokens": source_tokens or {},  # train tokens per source, before/after the mix
        "config_hash": cfg_hash,
        "shards": sorted(shards, key=lambda s: (SPLITS.index(s["split"]), s["name"])),
        "fingerprint": fingerprint(shards),
    }

"""dedupe: exact and near-duplicate documents removed across all sources, deterministically.

What counts as a duplicate (pipeline/minhash.py has the algorithm):
- exact: the same text once runs of whitespace are collapsed (line endings, indentation);
- near: word shingles (default 2-grams; FineWeb uses 5) with a MinHash signature of
  bands x rows values (default 42 x 3) whose LSH finds candidate pairs down to a Jaccard
  index of about 0.4; each candidate is verified with a bottom-k sketch (k = 512, exact for
  short documents) and kept when its Jaccard reaches `verify_threshold` (0.55), and the
  two documents are within 80% of each other's size. Measured on the real corpus
  (bench/dedup_quality.py): copies with 10% of words edited (and 10% of paragraphs moved)
  stay at Jaccard 0.66 or more, while the closest distinct documents (two Python
  documentation pages about the same class) reach 0.46;
- contained: a document of which `chunk_coverage` (80%) lies inside another, found chunk
  by chunk (content-defined chunks of about `chunk_words` words, so a book cut at other
  places is cut the same way inside a longer file), or a verified pair of very different
  sizes. The contained document is dropped, the container kept: a book inside an omnibus
  edition, an HTML edition inside a longer page.

Representatives: clusters are the connected groups of near-duplicate pairs (union-find).
The document kept for a cluster, or for an exact-duplicate group, is the first in this
order: (1) its source's place in `source_priority` (listed sources first, in that order),
(2) its format's place in `format_priority` (default: plain-text files before everything
else, because a book file is cleaner than an HTML edition of it run through an extractor),
(3) more words, (4) the earlier document in input order (upstream parts in manifest order,
then lines), as FineWeb keeps the first copy. A contained document's cluster hangs under
one container's cluster (the best-covering one); it never wins over its container.

The stage, in three kinds of units, each committed atomically (the stage contract):
1. `signatures/<part>.npz`, one per upstream part (the parallel, heavy part): per document
   its id, source, format, exact key, word count, MinHash signature and bottom-k sketch,
   and the same per chunk for long documents; malformed lines are kept as such, counted.
2. `clusters/decisions.json`, one unit reading every signature file: per part, the
   dropped lines `[line, id, reason, duplicate_of, score]` (score: 1 for exact, else the
   best verified Jaccard or coverage of that document), and a summary (pairs, clusters).
3. `docs/<part>.jsonl`, one per upstream part (`run_map_stage`, with the decision table's
   sha256 in the config hash): the documents in order without the dropped ones; every drop
   counted under `exact_duplicate`, `near_duplicate`, `contained_duplicate` or
   `malformed_document`, and its drop example names the document it duplicates.
Everything is decided from the sketches, so the output does not depend on the number of
workers or on a crash and rerun.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from pipeline.config import DedupeConfig, ForgeConfig
from pipeline.contract import ProgressFn, Stage, StageError, Unit, UnitResult, stage_lock
from pipeline.documents import PartWriter, map_stage_fingerprint, run_map_stage
from pipeline.files import (
    WorkFolder,
    atomic_write_json,
    commit,
    config_hash,
    read_json,
    sha256_file,
    temp_path_for,
)
from pipeline.minhash import (
    CONTAINED,
    SIMILAR,
    MinHasher,
    empty_table,
    exact_key,
    similar_pairs,
    stack_sketches,
)
from pipeline.registry import input_manifest

EXACT, NEAR, CONTAINED_REASON, MALFORMED = ("exact_duplicate", "near_duplicate",
                                            "contained_duplicate", "malformed_document")
SKETCH_FIELDS = ("shingle_words", "bands", "rows", "bottom_k", "chunk_words", "seed")


def hasher_for(cfg: DedupeConfig) -> MinHasher:
    return MinHasher(shingle_words=cfg.shingle_words, num_perm=cfg.bands * cfg.rows,
                     seed=cfg.seed, chunk_words=cfg.chunk_words, bottom_k=cfg.bottom_k)


# ---------------------------------------------------------------- choosing representatives


def preference_order(sources: list[str], formats: list[str], words: np.ndarray,
                     cfg: DedupeConfig) -> np.ndarray:
    """rank[i]: document i's place in the representative order (0 is kept first); documents
    are given in input order (upstream parts in order, lines in order)."""
    src = {name: i for i, name in enumerate(cfg.source_priority)}
    fmt = {name: i for i, name in enumerate(cfg.format_priority)}
    keys = sorted(range(len(sources)), key=lambda i: (src.get(sources[i], len(src)),
                                                   fmt.get(formats[i], len(fmt)),
                                                   -int(words[i]), i))
    rank = np.empty(len(sources), dtype=np.int64)
    rank[np.asarray(keys, dtype=np.int64)] = np.arange(len(sources))
    return rank


def _run_starts(values: np.ndarray) -> np.ndarray:
    """Whether each element of a sorted array starts a run of equal values."""
    starts = np.ones(values.size, dtype=bool)
    starts[1:] = values[1:] != values[:-1]
    return starts


class _UnionFind:
    """Union-find whose root is always the member with the smallest rank."""

    def __init__(self, rank: np.ndarray):
        self.parent = np.arange(rank.size)
        self.rank = rank

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if self.rank[rb] < self.rank[ra]:
                ra, rb = rb, ra
            self.parent[rb] = ra


def resolve(rank: np.ndarray, exact_groups: np.ndarray | None, edges: dict[str, np.ndarray]
            ) -> tuple[np.ndarray, list[str | None], np.ndarray]:
    """For every document: the kept document it duplicates (itself if kept), the reason
    (None if kept) and a score (1.0 exact; else its best verified similarity or coverage).

    `exact_groups[i]`: an integer naming document i's exact-text group (or None: no exact
    step); the edges must only join exact-group representatives.
    """
    n = rank.size
    reason: list[str | None] = [None] * n
    score = np.zeros(n)
    exact_rep = np.arange(n)
    if exact_groups is not None:
        order = np.lexsort((rank, exact_groups))
        first = _run_starts(exact_groups[order])
        group_rep = order[np.maximum.accumulate(np.where(first, np.arange(n), 0))]
        exact_rep[order] = group_rep
    near = _UnionFind(rank)
    kind, a, b = edges["kind"], edges["a"], edges["b"]
    for x, y in zip(a[kind == SIMILAR].tolist(), b[kind == SIMILAR].tolist(), strict=True):
        near.union(x, y)
    cluster = np.array([near.find(i) for i in range(n)], dtype=np.int64)
    # containment: the contained cluster's representative hangs under the container's
    above = np.arange(n)

    def top(x: int) -> int:
        while above[x] != x:
            x = above[x]
        return int(x)

    # each contained cluster hangs under one container: the best covering one, then the
    # container cluster's representative in rank order; a link that would close a loop is
    # skipped (the container is already inside the contained one)
    contained = np.flatnonzero(kind == CONTAINED)
    for e in contained[np.lexsort((b[contained], a[contained], rank[cluster[b[contained]]],
                                   -edges["score"][contained]))].tolist():
        x, y = int(cluster[a[e]]), int(cluster[b[e]])
        if above[x] == x and x != y and top(y) != x:
            above[x] = y
    np.maximum.at(score, a, edges["score"])
    np.maximum.at(score, b, edges["score"])
    kept = np.empty(n, dtype=np.int64)
    for i in range(n):
        kept[i] = top(int(cluster[exact_rep[i]]))
        if exact_rep[i] != i:
            reason[i], score[i] = EXACT, 1.0
        elif cluster[i] != i:
            reason[i] = NEAR
        elif kept[i] != i:
            reason[i] = CONTAINED_REASON
    return kept, reason, score


# ---------------------------------------------------------------- unit 1: signatures


def _parse(line: str) -> dict | None:
    try:
        doc = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        return None
    return doc


def signature_unit(payload: dict) -> UnitResult:
    cfg = DedupeConfig.model_validate(payload["config"])
    hasher = hasher_for(cfg)
    result = UnitResult()
    ids, sources, formats, keys, sketches, valid = [], [], [], [], [], []
    with open(payload["docs_file"], encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f):
            doc = _parse(line)
            if doc is None:
                ids.append(f"{payload['unit']}#{number}")
                sources.append(""), formats.append(""), valid.append(False)
                keys.append(bytes(16))
                sketches.append(hasher.sketch(""))
                result.drop(MALFORMED)
                continue
            text = doc["text"]
            result.keep()
            result.bytes_in += len(text.encode("utf-8", errors="replace"))
            ids.append(str(doc.get("id", f"{payload['unit']}#{number}")))
            sources.append(str(doc.get("source", "")))
            meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
            formats.append(str(meta.get("format", "")))
            keys.append(exact_key(text))
            sketches.append(hasher.sketch(text))
            valid.append(True)
    table = (stack_sketches(sketches) if sketches
             else empty_table(hasher.num_perm, hasher.bottom_k))
    arrays = {
        **table,
        "id": np.array(ids, dtype=str),
        "source": np.array(sources, dtype=str),
        "format": np.array(formats, dtype=str),
        "exact": np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 16),
        "valid": np.array(valid, dtype=bool),
    }
    final = Path(payload["dest"])
    tmp = temp_path_for(final)
    with open(tmp, "wb") as out:
        np.savez(out, **arrays)
    commit(tmp, final)
    result.bytes_out = final.stat().st_size
    result.outputs = {"file": final.name, "sha256": sha256_file(final),
                      "chunks": int(table["chunk_doc"].size)}
    return result


# ---------------------------------------------------------------- unit 2: clusters


def load_tables(files: list[str], cfg: DedupeConfig) -> dict[str, np.ndarray]:
    """The signature files of all parts as one table; `part` and `line` locate each doc."""
    none = np.zeros(0, dtype=np.int64)
    tables = [{**empty_table(cfg.bands * cfg.rows, cfg.bottom_k), "id": np.zeros(0, dtype=str),
               "source": np.zeros(0, dtype=str), "format": np.zeros(0, dtype=str),
               "exact": np.zeros((0, 16), dtype=np.uint8), "valid": np.zeros(0, dtype=bool),
               "part": none, "line": none}]
    offset = 0
    for number, path in enumerate(files):
        with np.load(path) as data:
            t = {key: data[key] for key in data.files}
        t["chunk_doc"] = t["chunk_doc"] + offset
        t["part"] = np.full(t["id"].size, number, dtype=np.int64)
        t["line"] = np.arange(t["id"].size, dtype=np.int64)
        offset += t["id"].size
        tables.append(t)
    return {key: np.concatenate([t[key] for t in tables]) for key in tables[0]}


def find_duplicates(table: dict[str, np.ndarray], cfg: DedupeConfig) -> dict:
    """Decide every document of a table: kept, or which kept document it duplicates."""
    valid = table["valid"]
    rank = preference_order(table["source"].tolist(), table["format"].tolist(),
                            table["words"], cfg)
    groups = None
    if cfg.exact:
        _, groups = np.unique(table["exact"], axis=0, return_inverse=True)
        groups = groups.ravel()
        groups = np.where(valid, groups, groups.max(initial=0) + 1 + np.arange(valid.size))
    active = valid.copy()
    if groups is not None:  # only one document of each exact group goes on to near dedupe
        order = np.lexsort((rank, groups))
        first = _run_starts(groups[order])
        active[order[~first]] = False
    stats: dict = {}
    if cfg.near:
        edges = similar_pairs(table, active, cfg.bands, cfg.rows, cfg.verify_threshold,
                              cfg.chunk_threshold, cfg.chunk_coverage, stats)
    else:
        edges = {k: np.zeros(0, dtype=d) for k, d in
                 (("a", np.int64), ("b", np.int64), ("kind", np.int8), ("score", np.float64))}
    kept, reason, score = resolve(rank, groups, edges)
    for i in np.flatnonzero(~valid).tolist():
        reason[i], kept[i] = MALFORMED, i
    return {"kept": kept, "reason": reason, "score": score, "edges": edges, "stats": stats}


def cluster_unit(payload: dict) -> UnitResult:
    cfg = DedupeConfig.model_validate(payload["config"])
    parts = payload["parts"]
    table = load_tables([path for _, path in parts], cfg)
    found = find_duplicates(table, cfg)
    ids, kept, reason, score = table["id"], found["kept"], found["reason"], found["score"]
    decisions: dict[str, list] = {unit: [] for unit, _ in parts}
    result = UnitResult()
    for i in range(ids.size):
        if reason[i] is None:
            result.keep()
            continue
        result.drop(reason[i])
        unit = parts[int(table["part"][i])][0]
        duplicate_of = None if reason[i] == MALFORMED else str(ids[kept[i]])
        decisions[unit].append([int(table["line"][i]), str(ids[i]), reason[i], duplicate_of,
                                round(float(score[i]), 4)])
    edges = found["edges"]
    summary = {
        "documents": int(ids.size),
        "kept": result.docs_out,
        "similar_pairs": int((edges["kind"] == SIMILAR).sum()),
        "contained_pairs": int((edges["kind"] == CONTAINED).sum()),
        "clusters_with_duplicates": int(np.unique(kept[[r is not None and r != MALFORMED
                                                        for r in reason]]).size),
        **found["stats"],
    }
    final = Path(payload["dest"])
    atomic_write_json(final, {"columns": ["line", "id", "reason", "duplicate_of", "score"],
                              "parts": decisions, "summary": summary})
    result.outputs = {"decisions": final.name, "sha256": sha256_file(final),
                      "summary": summary}
    return result


# ---------------------------------------------------------------- unit 3: the documents


def dedupe_unit(payload: dict) -> UnitResult:
    decisions = read_json(Path(payload["decisions"]))["parts"].get(payload["unit"], [])
    drops = {line: (doc_id, why, of, score) for line, doc_id, why, of, score in decisions}
    writer = PartWriter(Path(payload["dest"]))
    with open(payload["docs_file"], encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f):
            doc = _parse(line)
            writer.result.bytes_in += len(doc["text"].encode()) if doc else len(line.encode())
            if number in drops:
                doc_id, why, of, score = drops[number]
                writer.drop(doc_id, why, f"duplicate of {of} (score {score})" if of else "")
                continue
            if doc is None:  # the signature unit saw it too: a bug if this ever happens
                raise StageError(f"{payload['docs_file']} line {number + 1} changed since "
                                 "its signature was computed")
            writer.keep(doc)
    return writer.close()


# ---------------------------------------------------------------- the stage


class _SketchSettings(BaseModel):
    """What decides the signature files (a config change elsewhere keeps them)."""

    shingle_words: int
    bands: int
    rows: int
    bottom_k: int
    chunk_words: int
    seed: int


def dedupe_fingerprint(cfg: ForgeConfig) -> str:
    """The dedupe section and its input decide the clusters, and so the output."""
    return map_stage_fingerprint(cfg, "dedupe", cfg.data.dedupe)


def run_dedupe(cfg: ForgeConfig, progress: ProgressFn | None = None,
               overwrite: bool = False) -> dict:
    """Run the dedupe stage (signatures, clusters, documents); return its manifest."""
    with stage_lock("dedupe", WorkFolder(cfg.workdir).stage("dedupe")):
        return _run_dedupe(cfg, progress, overwrite)


def _run_dedupe(cfg: ForgeConfig, progress: ProgressFn | None, overwrite: bool) -> dict:
    dcfg = cfg.data.dedupe
    if not dcfg.enabled:
        raise StageError("dedupe is disabled in this config (data.dedupe.enabled: false); "
                         "set it to true to run the stage")
    upstream_dir, upstream = input_manifest(cfg, "dedupe")
    folder = WorkFolder(cfg.workdir).stage("dedupe")
    sketch = _SketchSettings(**{k: getattr(dcfg, k) for k in SKETCH_FIELDS})
    sig_hash = config_hash(sketch, upstream["output_fingerprint"])
    if overwrite and folder.exists():
        _clear(folder, keep_signatures=sig_hash)
    parts = upstream["parts"]
    total = 2 * len(parts) + 1

    def stepped(offset: int) -> ProgressFn | None:
        if progress is None:
            return None
        return lambda done, _: progress(offset + done, total)

    sig_stage = Stage("dedupe-signatures", folder / "signatures", sig_hash)
    sig_stage.claim()
    units = [Unit(part["unit"], {
        "unit": part["unit"],
        "docs_file": str(upstream_dir / part["file"]),
        "dest": str(sig_stage.folder / f"{part['unit']}.npz"),
        "config": dcfg.model_dump(mode="json"),
    }) for part in parts]
    records = sig_stage.run_units(units, signature_unit, cfg.workers, stepped(0),
                                  executor=cfg.executor)
    if not sig_stage.finished_manifest():
        sig_stage.write_manifest(records, input_fingerprint=upstream["output_fingerprint"])
    clusters = Stage("dedupe-clusters", folder / "clusters",
                     config_hash(dcfg, upstream["output_fingerprint"]))
    clusters.claim()
    record = clusters.run_units([Unit("clusters", {
        "config": dcfg.model_dump(mode="json"),
        "parts": [[u.id, u.payload["dest"]] for u in units],
        "dest": str(clusters.folder / "decisions.json"),
    })], cluster_unit, 1, stepped(len(parts)))
    if not clusters.finished_manifest():
        clusters.write_manifest(record, summary=record["clusters"]["outputs"]["summary"])
    decisions = record["clusters"]["outputs"]
    return run_map_stage(
        cfg, "dedupe", dcfg, dedupe_fingerprint(cfg), _dedupe_map_unit, stepped(len(parts) + 1),
        overwrite=False, payload={"decisions": str(clusters.folder / decisions["decisions"])},
    )


def _clear(folder: Path, keep_signatures: str) -> None:
    """--overwrite: remove the stage's outputs, but keep signatures made with the same sketch
    settings and input (changing, say, the source priority does not recompute them)."""
    state = folder / "signatures" / "stage.json"
    keep = state.exists() and read_json(state).get("config_hash") == keep_signatures
    for child in sorted(folder.iterdir()):
        if child.name == "signatures" and keep:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def _dedupe_map_unit(payload: dict) -> UnitResult:
    return dedupe_unit({**payload, "unit": Path(payload["dest"]).name.removesuffix(".jsonl")})


def decision_table(workdir: str | Path) -> dict:
    """The decisions of a finished dedupe stage: {dropped id: (reason, duplicate_of)}."""
    path = WorkFolder(workdir).stage("dedupe") / "clusters" / "decisions.json"
    table = read_json(path)
    return {row[1]: (row[2], row[3]) for rows in table["parts"].values() for row in rows}



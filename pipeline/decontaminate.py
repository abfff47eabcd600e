"""decontaminate: no training document may share a long n-gram with an evaluation set.

Following GPT-3 (Brown et al. 2020, appendix C), text is lowercased and split into words
of letters and digits, and any 13-gram shared with HellaSwag, WikiText or the held-out
instruction split marks a document. It is dropped (counted per evaluation set) or, in
`cut` mode, the matching spans are removed and the rest is kept.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np

from pipeline.config import DecontaminateConfig, EvalSetConfig, ForgeConfig
from pipeline.contract import ProgressFn, StageError, UnitResult
from pipeline.documents import PartWriter, map_stage_fingerprint, read_part, run_map_stage
from pipeline.files import WorkFolder, atomic_write_bytes
from pipeline.instructions import load_records, split_records

log = logging.getLogger(__name__)

INDEX_ARRAYS = ("table", "labels")  # each written atomically; both there: the index is whole
WORD = re.compile(r"[A-Za-z0-9]+")  # ASCII words: spans stay valid in the original text
_MULTIPLIER = np.uint64(0x100000001B3)  # FNV prime: mixes word hashes into n-gram hashes


def _word_hashes(words: list[str]) -> np.ndarray:
    """Deterministic 64-bit word hashes (Python's hash() is salted per process)."""
    vocabulary = dict.fromkeys(words)  # hash each distinct word once: text is Zipfian
    digests = b"".join(hashlib.blake2b(w.lower().encode(), digest_size=8).digest()
                       for w in vocabulary)
    table = dict(zip(vocabulary, np.frombuffer(digests, dtype="<u8").tolist(), strict=True))
    return np.fromiter((table[w] for w in words), dtype=np.uint64, count=len(words))


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """Hashes of every word n-gram of `text`, in order."""
    words = WORD.findall(text)
    if len(words) < n:
        return np.zeros(0, dtype=np.uint64)
    hashes = _word_hashes(words)
    count = len(words) - n + 1
    with np.errstate(over="ignore"):
        acc = np.zeros(count, dtype=np.uint64)
        for k in range(n):
            acc = acc * _MULTIPLIER + hashes[k:k + count]
    return acc


def eval_texts(spec: EvalSetConfig) -> list[str]:
    path = Path(spec.path)
    if not path.exists():
        raise StageError(f"decontaminate.eval_sets '{spec.name}': {path} does not exist")
    if spec.format == "instructions":
        records, _ = load_records(path)
        test = split_records(records, spec.seed, spec.val_fraction, spec.test_fraction)["test"]
        return [" ".join((r["instruction"], r["input"], r["output"])) for r in test]
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    if spec.format == "text":
        return ["\n".join(lines)]
    items = []
    for start in range(0, len(lines) - 5, 6):  # context, label, four endings
        context, endings = lines[start], lines[start + 2:start + 6]
        items.extend(f"{context} {ending}" for ending in endings)
    return items


def build_index(cfg: DecontaminateConfig) -> tuple[np.ndarray, np.ndarray]:
    """All evaluation n-gram hashes, sorted and unique, with the index of the set of each."""
    hashes, labels = [], []
    for number, spec in enumerate(cfg.eval_sets):
        found = np.unique(np.concatenate(
            [ngram_hashes(text, cfg.ngram) for text in eval_texts(spec)] or [np.zeros(0, "<u8")]))
        hashes.append(found)
        labels.append(np.full(found.size, number, dtype=np.uint16))
    table, first = np.unique(np.concatenate(hashes), return_index=True)
    return table, np.concatenate(labels)[first]


class NgramIndex:
    """Membership of n-gram hashes in the evaluation table.

    A bitmap over the top hash bits answers almost every query with one memory access;
    only the few bitmap hits are looked up in the sorted table.
    """

    BITS = 26

    def __init__(self, table: np.ndarray, labels: np.ndarray):
        self.table, self.labels = table, labels
        self.bitmap = np.zeros(1 << (self.BITS - 3), dtype=np.uint8)
        keys = table >> np.uint64(64 - self.BITS)
        np.bitwise_or.at(self.bitmap, keys >> np.uint64(3),
                         (1 << (keys & np.uint64(7))).astype(np.uint8))

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """Per hash: the evaluation set number it belongs to, or -1."""
        result = np.full(hashes.size, -1, dtype=np.int32)
        if not hashes.size or not self.table.size:
            return result
        keys = hashes >> np.uint64(64 - self.BITS)
        maybe = np.flatnonzero((self.bitmap[keys >> np.uint64(3)] >> (keys & np.uint64(7))) & 1)
        if maybe.size:
            positions = np.searchsorted(self.table, hashes[maybe]).clip(max=self.table.size - 1)
            found = self.table[positions] == hashes[maybe]
            result[maybe[found]] = self.labels[positions[found]]
        return result


def decontaminate_unit(payload: dict) -> UnitResult:
    cfg = DecontaminateConfig.model_validate(payload["config"])
    folder = Path(payload["index_dir"])
    index = NgramIndex(np.load(folder / "table.npy"), np.load(folder / "labels.npy"))
    names = [spec.name for spec in cfg.eval_sets]
    writer = PartWriter(Path(payload["dest"]))
    for doc in read_part(payload["docs_file"]):
        writer.result.bytes_in += len(doc["text"].encode())
        found = index.lookup(ngram_hashes(doc["text"], cfg.ngram))
        hits = np.flatnonzero(found >= 0)
        if not hits.size:
            writer.keep(doc)
            continue
        first = names[found[hits[0]]]
        matches = list(WORD.finditer(doc["text"]))  # character spans, needed only on a hit
        if cfg.mode == "drop":
            span = doc["text"][matches[hits[0]].start():matches[hits[0] + cfg.ngram - 1].end()]
            writer.drop(doc["id"], f"contaminated:{first}", span[:120])
            continue
        text = _cut(doc["text"], matches, hits, cfg.ngram, cfg.cut_margin_chars)
        for number in np.unique(found[hits]):
            writer.result.repaired[f"cut:{names[number]}"] += 1
        if text:
            writer.keep({**doc, "text": text})
        else:
            writer.drop(doc["id"], f"contaminated:{first}", "nothing left after cutting")
    return writer.close()


def _cut(text: str, matches: list[re.Match], hits: np.ndarray, n: int, margin: int) -> str:
    """Remove each matching n-gram's characters plus `margin` either side."""
    spans: list[list[int]] = []
    for position in hits:
        start = max(0, matches[position].start() - margin)
        end = min(len(text), matches[position + n - 1].end() + margin)
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    pieces, last = [], 0
    for start, end in spans:
        pieces.append(text[last:start])
        last = end
    pieces.append(text[last:])
    return "\n".join(p.strip() for p in pieces if p.strip())


def eval_files_digest(section: DecontaminateConfig) -> str:
    """sha256 over each evaluation set's name and file contents; fails naming a missing one."""
    if not section.eval_sets:
        raise StageError("decontaminate is enabled but data.decontaminate.eval_sets is empty; "
                         "list the evaluation sets or set enabled: false")
    digest = hashlib.sha256()
    for spec in section.eval_sets:
        path = Path(spec.path)
        if not path.is_file():
            raise StageError(f"decontaminate.eval_sets '{spec.name}': {path} does not exist")
        digest.update(spec.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def index_key(section: DecontaminateConfig, eval_digest: str) -> str:
    """What decides the index: the n-gram length, each set's settings but its path, and the
    files' contents. One index per key, built once and reused by every rerun."""
    settings = [spec.model_dump(mode="json", exclude={"path"}) for spec in section.eval_sets]
    payload = json.dumps([section.ngram, settings], sort_keys=True) + eval_digest
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def decontaminate_fingerprint(cfg: ForgeConfig) -> str:
    """The section, its input and the evaluation files' contents (they decide the index)."""
    section = cfg.data.decontaminate
    return map_stage_fingerprint(cfg, "decontaminate", section, eval_files_digest(section))


def run_decontaminate(cfg: ForgeConfig, progress: ProgressFn | None = None,
                      overwrite: bool = False) -> dict:
    section = cfg.data.decontaminate
    fingerprint = decontaminate_fingerprint(cfg)  # fails early, naming what is missing
    index_dir = (WorkFolder(cfg.workdir).stage("decontaminate") / "index"
                 / index_key(section, eval_files_digest(section)))
    eval_ngrams: dict[str, dict] = {}

    def build() -> None:  # only when the stage has work to do
        if all((index_dir / f"{name}.npy").is_file() for name in INDEX_ARRAYS):
            log.info("decontaminate: reusing the evaluation %d-gram index %s", section.ngram,
                     index_dir)
            labels = np.load(index_dir / "labels.npy")
        else:
            table, labels = build_index(section)
            _save_index(index_dir, {"table": table, "labels": labels})  # labels last
        counts = np.bincount(labels, minlength=len(section.eval_sets))
        eval_ngrams["eval_ngrams"] = {s.name: int(c) for s, c in
                                      zip(section.eval_sets, counts, strict=True)}

    return run_map_stage(
        cfg, "decontaminate", section, fingerprint, decontaminate_unit, progress, overwrite,
        payload={"index_dir": str(index_dir)}, before_units=build, manifest_extra=eval_ngrams,
    )


def _save_index(folder: Path, index: dict[str, np.ndarray]) -> None:
    import io

    for name, table in index.items():
        buffer = io.BytesIO()
        np.save(buffer, table)
        atomic_write_bytes(folder / f"{name}.npy", buffer.getvalue())

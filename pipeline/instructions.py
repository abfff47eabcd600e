"""Alpaca-format instruction records and their seeded train/val/test split.

Both fine-tuning and decontamination use this split, so the held-out test records are
exactly the ones removed from the pretraining corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from pathlib import Path

FIELDS = ("instruction", "input", "output")


def load_records(path: str | Path) -> tuple[list[dict], Counter]:
    """Valid {instruction, input, output} records of a JSON list or JSONL(.gz) file.

    Bad records are counted by reason, never fatal. Records with a `status` field keep only
    status "ok" (the alpaca-libre convention).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        raw = f.read()
    dropped: Counter = Counter()
    if raw.lstrip().startswith("["):
        candidates = json.loads(raw)
    else:
        candidates = []
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                candidates.append(json.loads(line))
            except json.JSONDecodeError:
                dropped["malformed_json"] += 1
    records = []
    for record in candidates:
        reason = _problem(record)
        if reason:
            dropped[reason] += 1
        else:
            records.append({k: record.get(k) or "" for k in FIELDS})
    return records, dropped


def _problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return "not_an_object"
    if record.get("status", "ok") != "ok":
        return "status_not_ok"
    for field in ("instruction", "output"):
        if field not in record or record[field] is None:
            return f"missing_{field}"
    for field in FIELDS:
        if field in record and record[field] is not None and not isinstance(record[field], str):
            return f"non_string_{field}"
    try:
        "".join(record.get(field) or "" for field in FIELDS).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escaped into the JSON
        return "invalid_unicode"
    if not record["output"].strip():
        return "empty_output"
    if not record["instruction"].strip():
        return "empty_instruction"
    return None


def record_key(record: dict) -> str:
    return "\x1f".join(record[k] for k in FIELDS)


def split_records(records: list[dict], seed: int, val_fraction: float,
                  test_fraction: float) -> dict[str, list[dict]]:
    """Seeded split with exact sizes; a record's split depends on its content, not its index."""
    def rank(record: dict) -> bytes:
        return hashlib.sha256(f"{seed}\x1e{record_key(record)}".encode()).digest()

    ordered = sorted(records, key=rank)
    n_test = round(len(ordered) * test_fraction)
    n_val = round(len(ordered) * val_fraction)
    return {
        "test": ordered[:n_test],
        "val": ordered[n_test:n_test + n_val],
        "train": ordered[n_test + n_val:],
    }

"""Document parts: what the document stages (extract, filter, dedupe, decontaminate) exchange.

A part is a JSONL file of documents `{id, text, source, url, meta}`, written atomically by
one unit. A stage's manifest lists its parts in order with their sha256; the next stage
reads them in that order, so document order never depends on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel

from pipeline.config import ForgeConfig, config_hash
from pipeline.stage import (
    ProgressFn,
    Stage,
    StageError,
    Unit,
    UnitResult,
    commit,
    read_json,
    sha256_file,
    temp_path_for,
)

DROP_EXAMPLES_PER_REASON = 3

# The document stages in pipeline order; `enabled_stages` says which a config runs.
DOCUMENT_STAGES = ("extract", "filter", "dedupe", "decontaminate")


def enabled_stages(cfg: ForgeConfig) -> list[str]:
    return [name for name in DOCUMENT_STAGES
            if name == "extract" or getattr(getattr(cfg.data, name, None), "enabled", False)]


def input_stage(cfg: ForgeConfig, stage: str) -> Path:
    """The folder of the enabled document stage that feeds `stage`; it must be finished."""
    workdir = Path(cfg.workdir)
    order = enabled_stages(cfg)
    before = order if stage not in order else order[: order.index(stage)]
    if not before:
        raise StageError(f"{stage} has no document stage before it")
    folder = workdir / before[-1]
    if not (folder / "manifest.json").exists():
        raise StageError(f"{stage} needs the {before[-1]} stage's output ({folder} has no "
                         f"manifest); run `forge {before[-1]}` first, or `forge prepare`")
    return folder


class PartWriter:
    """Writes one part atomically and keeps its document accounting and drop examples."""

    def __init__(self, dest: Path, bytes_in: int = 0):
        self.dest = dest
        self.tmp = temp_path_for(dest)
        self.file = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.result = UnitResult(bytes_in=bytes_in)
        self.examples: dict[str, list[str]] = {}

    def keep(self, doc: dict) -> None:
        self.file.write(json.dumps(doc, ensure_ascii=False) + "\n")
        self.result.keep()
        self.result.bytes_out += len(doc["text"].encode())

    def drop(self, name: str, reason: str, detail: str = "") -> None:
        self.result.drop(reason)
        samples = self.examples.setdefault(reason, [])
        if len(samples) < DROP_EXAMPLES_PER_REASON:
            samples.append(f"{name}: {detail}" if detail else name)

    def close(self) -> UnitResult:
        self.file.close()
        commit(self.tmp, self.dest)
        self.result.outputs = {"docs_file": self.dest.name, "sha256": sha256_file(self.dest),
                               "drop_examples": self.examples}
        return self.result


def read_part(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def iter_documents(stage_dir: Path) -> Iterator[dict]:
    """Every document a finished stage wrote, in order."""
    manifest = read_json(stage_dir / "manifest.json")
    for part in manifest["parts"]:
        yield from read_part(stage_dir / part["file"])


def finish_document_stage(stage: Stage, records: dict[str, dict], input_fingerprint: str,
                          started: float, **extra) -> dict:
    parts = [{"unit": uid, "file": f"docs/{r['outputs']['docs_file']}",
              "sha256": r["outputs"]["sha256"], "docs": r["docs_out"]}
             for uid, r in records.items()]
    examples: dict[str, list[str]] = {}
    for record in records.values():
        for reason, samples in record["outputs"]["drop_examples"].items():
            examples.setdefault(reason, []).extend(samples)
    fingerprint = hashlib.sha256("".join(f"{p['unit']}:{p['sha256']};" for p in parts).encode())
    return stage.write_manifest(
        records,
        parts=parts,
        drop_examples={k: v[:10] for k, v in sorted(examples.items())},
        input_fingerprint=input_fingerprint,
        output_fingerprint=fingerprint.hexdigest(),
        wall_seconds=round(time.perf_counter() - started, 3),
        **extra,
    )


def run_map_stage(cfg: ForgeConfig, name: str, section: BaseModel,
                  unit_fn: Callable[[dict], UnitResult], progress: ProgressFn | None = None,
                  overwrite: bool = False, payload: dict | None = None,
                  extra_hash: str = "", before_units: Callable[[], None] | None = None,
                  manifest_extra: dict | None = None) -> dict:
    """A stage that maps every upstream part to one output part (filter, decontaminate).

    `unit_fn` gets {docs_file, dest, config, **payload}; `extra_hash` folds in inputs that
    are not in the config (a dedupe decision table, an evaluation-set index), which
    `before_units` can write into the stage folder once it is claimed.
    """
    upstream_dir = input_stage(cfg, name)
    upstream = read_json(upstream_dir / "manifest.json")
    folder = Path(cfg.workdir) / name
    stage = Stage(name, folder, config_hash(section, upstream["output_fingerprint"], extra_hash))
    if manifest := stage.finished_manifest():
        return manifest
    stage.claim(overwrite)
    started = time.perf_counter()
    (folder / "docs").mkdir(parents=True, exist_ok=True)
    if before_units:
        before_units()
    units = [
        Unit(part["unit"], {
            "docs_file": str(upstream_dir / part["file"]),
            "dest": str(folder / "docs" / f"{part['unit']}.jsonl"),
            "config": section.model_dump(mode="json"),
            **(payload or {}),
        })
        for part in upstream["parts"]
    ]
    records = stage.run_units(units, unit_fn, cfg.workers, progress,
                                 executor=cfg.executor)
    return finish_document_stage(stage, records, upstream["output_fingerprint"], started,
                                 **(manifest_extra or {}))

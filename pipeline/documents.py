"""Document parts: what the document stages (extract, filter, dedupe, decontaminate) exchange.

A part is a JSONL file of documents `{id, text, source, url, meta}`, written atomically by
one unit. A stage's manifest lists its parts in order with their sha256; the next stage
reads them in that order, so document order never depends on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from pipeline.config import ForgeConfig
from pipeline.contract import ProgressFn, Stage, Unit, UnitResult, run_stage
from pipeline.files import (
    MANIFEST,
    WorkFolder,
    commit,
    config_hash,
    read_json,
    sha256_file,
    temp_path_for,
)
from pipeline.registry import input_manifest

DROP_EXAMPLES_PER_REASON = 3


@dataclass(frozen=True)
class Drop:
    """Why a document left the pipeline: `reason` is the key counted in the stage manifest,
    `detail` the measured value shown in the drop examples, `name` the document (when known)."""

    reason: str
    detail: str = ""
    name: str = ""


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
    manifest = read_json(stage_dir / MANIFEST)
    for part in manifest["parts"]:
        yield from read_part(stage_dir / part["file"])


def finish_document_stage(stage: Stage, records: dict[str, dict], input_fingerprint: str,
                          **extra) -> dict:
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
        **extra,
    )


def map_stage_fingerprint(cfg: ForgeConfig, name: str, section: BaseModel,
                          extra_hash: str = "") -> str:
    """The config hash of a map stage: its section, its input's fingerprint, `extra_hash`."""
    upstream = input_manifest(cfg, name)[1]
    return config_hash(section, upstream["output_fingerprint"], extra_hash)


def run_map_stage(cfg: ForgeConfig, name: str, section: BaseModel, stage_hash: str,
                  unit_fn: Callable[[dict], UnitResult], progress: ProgressFn | None = None,
                  overwrite: bool = False, payload: dict | None = None,
                  before_units: Callable[[], None] | None = None,
                  manifest_extra: dict | None = None,
                  summarize: Callable[[dict[str, dict]], dict] | None = None) -> dict:
    """A stage that maps every upstream part to one output part (filter, dedupe,
    decontaminate), under `stage_hash` (the value of the stage's fingerprint function).

    `unit_fn` gets {docs_file, dest, config, **payload}; `before_units` can write inputs that
    are not in the config (an evaluation-set index) into the stage folder once it is claimed.
    """
    upstream_dir, upstream = input_manifest(cfg, name)

    def work(stage: Stage) -> dict:
        (stage.folder / "docs").mkdir(parents=True, exist_ok=True)
        if before_units:
            before_units()
        units = [
            Unit(part["unit"], {
                "docs_file": str(upstream_dir / part["file"]),
                "dest": str(stage.folder / "docs" / f"{part['unit']}.jsonl"),
                "config": section.model_dump(mode="json"),
                **(payload or {}),
            })
            for part in upstream["parts"]
        ]
        records = stage.run_units(units, unit_fn, cfg.workers, progress, executor=cfg.executor)
        return finish_document_stage(stage, records, upstream["output_fingerprint"],
                                     **(manifest_extra or {}),
                                     **(summarize(records) if summarize else {}))

    return run_stage(name, WorkFolder(cfg.workdir).stage(name), stage_hash, overwrite, work)

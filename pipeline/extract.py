"""extract: downloaded files to documents of one schema (id, text, source, url, meta).

HTML and WARC responses go through trafilatura, Gutenberg licence boilerplate is cut,
text is NFC with Unix line endings. One unit is one file, or a slice of an archive's
members so that a large archive spreads over the workers.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from pipeline.config import ExtractConfig, ForgeConfig
from pipeline.contract import ProgressFn, Stage, Unit, UnitResult, run_stage
from pipeline.documents import PartWriter, finish_document_stage
from pipeline.files import WorkFolder, config_hash, safe_name
from pipeline.readers import Doc, Drop, file_format, list_members, normalize_text, read_file
from pipeline.registry import input_manifest

_GUTENBERG_START = re.compile(
    r"^\ufeff?\*{3}\s*START OF (?:THE |THIS )?PROJECT GUTENBERG E-?BOOK.*$", re.I | re.M)
# New style "*** END OF THE PROJECT GUTENBERG EBOOK ...", and the old style's plain line
# "End of the Project Gutenberg EBook of Opticks, ..." / "End of Project Gutenberg's ...".
_GUTENBERG_END = re.compile(
    r"^\ufeff?(?:\*{3}\s*END OF (?:THE |THIS )?PROJECT GUTENBERG E-?BOOK"
    r"|[ \t]*End of (?:the |this )?Project Gutenberg(?:'s)?\b)", re.I | re.M)
# Producer credits ("Produced by ...", "E-text prepared by ...") opening the book: a
# paragraph of at most a few lines, up to the first blank line.
_PRODUCER_CREDITS = re.compile(
    r"\A\ufeff?\s*(?:Produced by|E-?text prepared by|This e-?(?:text|book) was produced by)"
    r"\b(?:.*\n){0,5}?.*?(?:\n[ \t\r]*\n|\Z)", re.I)


def strip_gutenberg(text: str) -> str:
    """Keep the book: what lies between the START and END markers (either may be missing),
    without the producer credits that open it."""
    if start := _GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    while credits := _PRODUCER_CREDITS.match(text):
        text = text[credits.end():]
    return text


def extract_unit(payload: dict) -> UnitResult:
    cfg = ExtractConfig.model_validate(payload["extract"])
    members = tuple(payload["members"]) if payload["members"] else None
    writer = PartWriter(Path(payload["dest"]), bytes_in=payload["bytes_in"])
    for item in read_file(payload["path"], int(cfg.max_doc_mb * 1e6), payload["text_field"],
                          members):
        if isinstance(item, Doc):
            text = normalize_text(item.text)
            if cfg.strip_gutenberg:
                text = normalize_text(strip_gutenberg(text))
            if not text:
                item = Drop("empty", name=item.name)
        if isinstance(item, Drop):
            writer.drop(item.name, item.reason, item.detail)
            continue
        writer.result.repaired.update(item.repairs)
        writer.keep({
            "id": f"{payload['source']}/{PurePosixPath(payload['rel']).parent / item.name}",
            "text": text,
            "source": payload["source"],
            "url": item.url,
            "meta": {"format": payload["format"], **item.meta},
        })
    return writer.close()


def plan_units(cfg: ForgeConfig, files: list[dict], download_dir: Path,
               out_dir: Path) -> list[Unit]:
    per_unit = cfg.data.extract.archive_members_per_unit
    units = []
    for entry in files:
        path = download_dir / "files" / entry["path"]
        fmt, _ = file_format(entry["path"])
        slices: list[tuple[int, int] | None] = [None]
        if fmt in ("zip", "tar"):
            members = list_members(str(path))
            if members:  # an unreadable archive stays one unit and is counted as a drop there
                slices = [(i, i + per_unit) for i in range(0, len(members), per_unit)]
        for members in slices:
            unit_id = safe_name(entry["path"].replace("/", "__"), limit=150)
            if members:
                unit_id += f"@{members[0]:06d}"
            units.append(Unit(unit_id, {
                "path": str(path),
                "rel": entry["path"].split("/", 1)[-1],
                "source": entry["source"],
                "text_field": entry.get("text_field", "text"),
                "format": fmt,
                "members": members,
                "bytes_in": entry["bytes"] if members in (None, slices[0]) else 0,
                "dest": str(out_dir / "docs" / f"{unit_id}.jsonl"),
                "extract": cfg.data.extract.model_dump(mode="json"),
            }))
    return units


def extract_fingerprint(cfg: ForgeConfig) -> str:
    return config_hash(cfg.data.extract, input_manifest(cfg, "extract")[1]["output_fingerprint"])


def run_extract(cfg: ForgeConfig, progress: ProgressFn | None = None,
                overwrite: bool = False) -> dict:
    download_dir, download = input_manifest(cfg, "extract")

    def work(stage: Stage) -> dict:
        (stage.folder / "docs").mkdir(parents=True, exist_ok=True)
        units = plan_units(cfg, download["files"], download_dir, stage.folder)
        records = stage.run_units(units, extract_unit, cfg.workers, progress,
                                  executor=cfg.executor)
        return finish_document_stage(stage, records, download["output_fingerprint"])

    return run_stage("extract", WorkFolder(cfg.workdir).stage("extract"),
                     extract_fingerprint(cfg), overwrite, work)

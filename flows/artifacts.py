"""Stage results as Prefect artifacts: a table per stage, the shard statistics and a summary of
the tokenized dataset, and a progress artifact fed by a stage's `progress` callback.

Keys are `<artifact_prefix(workdir)>-<what>`, so each table of one work folder keeps its
history on the Artifacts page. Progress artifacts have no key: they belong to one run.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows.common import artifact_prefix
from pipeline.files import FINETUNE, PRETRAIN, WorkFolder, read_json

PROGRESS_EVERY_S = 2.0  # each update is an API call: a few per second at most


def _mb(n: int) -> float:
    return round(n / 1e6, 2)


def stage_rows(summary: dict) -> list[dict]:
    """The stage's numbers as (measure, value) rows: docs in and out, each drop reason, MB, s."""
    unit = summary.get("count_unit", "docs")
    rows = [{"measure": f"{unit} in", "value": summary["docs_in"]},
            {"measure": f"{unit} out", "value": summary["docs_out"]}]
    dropped = summary.get("dropped", {})
    rows.append({"measure": f"{unit} dropped", "value": sum(dropped.values())})
    rows += [{"measure": f"  dropped: {reason}", "value": n} for reason, n in dropped.items()]
    rows += [{"measure": f"  repaired: {reason}", "value": n}
             for reason, n in summary.get("repaired", {}).items()]
    rows += [
        {"measure": "MB in", "value": _mb(summary["bytes_in"])},
        {"measure": "MB out", "value": _mb(summary["bytes_out"])},
        {"measure": "units", "value": summary["units"]},
        {"measure": "seconds (wall)", "value": summary.get("wall_seconds")},
        {"measure": "seconds (sum over units)", "value": summary.get("unit_seconds")},
    ]
    return rows


def summary_line(name: str, summary: dict, workdir: str, cached: bool) -> str:
    """The stage's numbers in one log line: what `forge prepare` prints as a table."""
    unit = summary.get("count_unit", "docs")
    dropped = summary.get("dropped", {})
    reasons = ", ".join(f"{k}: {v}" for k, v in dropped.items())
    repaired = ", ".join(f"{k}: {v}" for k, v in summary.get("repaired", {}).items())
    return (f"{name}{' (cached)' if cached else ''}: {summary['docs_in']} {unit} in, "
            f"{summary['docs_out']} out, {sum(dropped.values())} dropped"
            f"{f' ({reasons})' if reasons else ''}{f'; repaired {repaired}' if repaired else ''}"
            f"; {_mb(summary['bytes_in'])} MB in, {_mb(summary['bytes_out'])} MB out; "
            f"{summary['units']} units, {summary.get('wall_seconds')} s; output "
            f"{WorkFolder(workdir).stage(name)}")


def publish_stage_table(name: str, summary: dict, workdir: str, cached: bool) -> None:
    how = "skipped, the cached result of an identical earlier run" if cached else "ran"
    create_table_artifact(
        key=f"{artifact_prefix(workdir)}-{name}",
        table=stage_rows(summary),
        description=f"**{name}** ({how}) in `{WorkFolder(workdir).stage(name)}`; output "
        f"fingerprint `{summary.get('output_fingerprint', '-')}`",
    )


def shard_rows(stats: dict) -> list[dict]:
    """One row per shard and per split total: the numbers of `forge stats`."""
    rows = []
    for split, info in stats["splits"].items():
        for row, label in [*((s, f"{split}/{s['name']}") for s in info["shards"]),
                           (info, f"{split} total")]:
            lengths = row["doc_tokens"]
            rows.append({
                "shard": label, "tokens": row["tokens"], "docs": row["docs"],
                "mean": round(lengths["mean"]), "median": round(lengths["median"]),
                "p99": round(lengths["p99"]), "max": lengths["max"],
                "bytes/token": row["bytes_per_token"],
            })
    return rows


def dataset_markdown(stats: dict) -> str:
    splits = stats["splits"]
    lines = [
        f"# Token dataset `{stats['dataset']}`",
        "",
        f"- fingerprint: `{stats['fingerprint']}`",
        f"- tokenizer: {stats['tokenizer']}",
        *(f"- {split}: {info['tokens']:,} tokens, {info['docs']:,} documents in "
          f"{len(info['shards'])} shard(s), {info['bytes_per_token']} bytes/token"
          for split, info in splits.items()),
        "",
        "## Source mix (documents; train tokens before and after `tokenize.mix`)",
        "",
        "| source | docs | weight | tokens before | tokens after |",
        "|---|---:|---:|---:|---:|",
        *(f"| {source} | {docs:,} | " + (
            f"{t['weight']:g} | {t['before_mix']:,} | {t['after_mix']:,} |"
            if (t := stats["source_tokens"].get(source)) else "- | - | - |")
          for source, docs in stats["source_docs"].items()),
        "",
        "## Stages",
        "",
        "| stage | in | out | dropped | MB out | s |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {row['stage']} | {row['in']:,} {row['unit']} | {row['out']:,} | "
          f"{sum(row['dropped'].values()):,} | {row['mb_out']} | {row['seconds']} |"
          for row in stats["stages"]),
        "",
        "## Dropped and repaired, by reason",
        "",
        "| stage | reason | count |",  # one row per reason: a long list never runs off the page
        "|---|---|---:|",
    ]
    for row in stats["stages"]:
        lines += [f"| {row['stage']} | {k} | {v:,} |" for k, v in row["dropped"].items()]
        lines += [f"| {row['stage']} | repaired: {k} | {v:,} |" for k, v in row["repaired"].items()]
    lines += ["", f"Inspect it with `forge stats {stats['dataset']}` and "
              f"`forge verify {stats['dataset']}`."]
    return "\n".join(lines)


def publish_dataset(workdir: str) -> dict:
    """The shard table and the markdown summary of `<workdir>/tokenize/dataset.zarr`."""
    from pipeline.stats import dataset_stats

    stats = dataset_stats(WorkFolder(workdir).dataset)
    prefix = artifact_prefix(workdir)
    create_table_artifact(key=f"{prefix}-shards", table=shard_rows(stats),
                          description=f"Shards of `{stats['dataset']}` (document lengths in "
                          "tokens), as `forge stats` shows them")
    create_markdown_artifact(key=f"{prefix}-dataset", markdown=dataset_markdown(stats),
                             description=f"Token dataset {stats['fingerprint'][:12]}")
    return stats


@contextmanager
def progress_artifact(label: str) -> Iterator[Callable[[int, int], None]]:
    """A `progress(done, total)` callback that keeps a progress artifact up to date.

    The artifact is made at the first call and updated at most every PROGRESS_EVERY_S
    seconds, and whenever a pass completes (`done == total`; tokenize makes two passes).
    """
    state: dict = {"id": None, "last": 0.0}

    def update(done: int, total: int) -> None:
        percent = 100.0 * done / total if total else 100.0
        description = f"{label}: {done} of {total} units"
        now = time.monotonic()
        if state["id"] is None:
            state["id"] = create_progress_artifact(progress=percent, description=description)
        elif done >= total or now - state["last"] >= PROGRESS_EVERY_S:
            update_progress_artifact(state["id"], progress=percent, description=description)
        else:
            return
        state["last"] = now

    yield update


# ---------------------------------------------------------------- training


def _tail_records(log: Path, max_bytes: int = 16384) -> list[dict]:
    """The JSON records in the last `max_bytes` of a log.jsonl (a cut first line is skipped)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - max_bytes))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class TrainingProgress:
    """A progress artifact that follows the trainer's log.jsonl (step of max_steps, loss).

    `on_line` is called for every line the trainer prints; it looks at the log at most every
    PROGRESS_EVERY_S seconds.
    """

    def __init__(self, log: Path, max_steps: int) -> None:
        self.log, self.max_steps = log, max_steps
        self.artifact_id = None
        self.last = 0.0

    def on_line(self, line: str) -> None:
        now = time.monotonic()
        if self.artifact_id is not None and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        train = [r for r in _tail_records(self.log) if r.get("kind") == "train"]
        step = train[-1]["step"] if train else 0
        loss = f", loss {train[-1]['loss']:.4f}" if train else ""
        self._set(100.0 * step / self.max_steps, f"pretrain: step {step} of {self.max_steps}{loss}")

    def finish(self) -> None:
        self._set(100.0, f"pretrain: {self.max_steps} steps done")

    def _set(self, percent: float, description: str) -> None:
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress=percent, description=description)
        else:
            update_progress_artifact(self.artifact_id, progress=percent, description=description)


def _image_markdown(png: Path, limit_bytes: int = 300_000) -> str:
    """The loss curve inline (a data URI) when small enough, and its path either way."""
    if not png.is_file():
        return "(no loss curve: matplotlib could not draw one)"
    text = f"Loss curve: `{png}`"
    data = png.read_bytes()
    if len(data) <= limit_bytes:
        text = f"![loss curve](data:image/png;base64,{base64.b64encode(data).decode()})\n\n{text}"
    return text


def stopped_training_summary(workdir: str, stage: str) -> dict:
    """The summary of a trainer stopped before its end (cancelled), for its report: the last
    records of its log (the manifest is written only at the end) and its checkpoints' folder."""
    work = WorkFolder(workdir)
    records = _tail_records(work.training_log(stage), 65536)
    last = {r.get("kind"): r for r in records}  # the last record of each kind
    started = last.get("resume") or last.get("start") or {}
    return {"steps": last.get("train", {}).get("step"),
            "train_loss": last.get("train", {}).get("loss"),
            "val_loss": last.get("val", {}).get("val_loss"),
            "params": started.get("params"), "world_size": started.get("world_size"),
            "checkpoint": str(work.checkpoints(stage)), "stopped_by": "cancellation"}


def publish_training_report(workdir: str, summary: dict) -> None:
    """Markdown at the end of pretraining (or when it was cancelled): loss curve, final
    metrics, the last samples."""
    work = WorkFolder(workdir)
    out = work.stage(PRETRAIN)
    metrics = [("steps", summary.get("steps")), ("train loss", summary.get("train_loss")),
               ("val loss", summary.get("val_loss")), ("tokens", summary.get("tokens")),
               ("tokens/s", summary.get("tokens_per_s")), ("parameters", summary.get("params")),
               ("processes", summary.get("world_size")), ("seconds", summary.get("seconds")),
               ("checkpoint", summary.get("checkpoint"))]
    samples = [r for r in _tail_records(work.training_log(PRETRAIN), 65536)
               if r.get("kind") == "sample"]
    lines = [f"# Pretraining in `{out}`", "", *_stopped_lines(summary),
             _image_markdown(work.loss_plot(PRETRAIN)), "",
             "| metric | value |", "|---|---|",
             *(f"| {name} | {_fmt(value)} |" for name, value in metrics), "",
             "## Samples", ""]
    for record in samples[-3:] or []:
        text = (record.get("prompt", "") + record.get("text", "")).replace("```", "'''")
        lines += [f"Step {record.get('step')}:", "", "```", text, "```", ""]
    if not samples:
        lines.append("(no sample in the log)")
    create_markdown_artifact(key=f"{artifact_prefix(workdir)}-pretrain",
                             markdown="\n".join(lines),
                             description=f"Pretraining: val loss {_fmt(summary.get('val_loss'))}")


def _stopped_lines(summary: dict) -> list[str]:
    if not summary.get("stopped_by"):
        return []
    return [f"**Stopped by {summary['stopped_by']} after step {_fmt(summary.get('steps'))}**: "
            "rerun the flow to continue from its newest checkpoint.", ""]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def publish_finetune_report(workdir: str, summary: dict) -> None:
    """Markdown after fine-tuning: metrics and the model's answers to held-out instructions."""
    work = WorkFolder(workdir)
    path = work.test_responses
    answers = read_json(path) if path.exists() else {"scores": {}, "responses": []}
    lines = [f"# Fine-tuning in `{work.stage(FINETUNE)}`", "", *_stopped_lines(summary),
             _image_markdown(work.loss_plot(FINETUNE)), "",
             "| metric | value |", "|---|---|",
             *(f"| {k} | {_fmt(v)} |" for k, v in summary.items()
               if not isinstance(v, (dict, list))),
             *(f"| test {k} | {_fmt(v)} |" for k, v in answers["scores"].items()
               if not isinstance(v, (dict, list))),
             "", "## Answers to held-out instructions", ""]
    for row in answers["responses"][:3]:
        lines += [f"**Instruction:** {row['instruction']} {row.get('input', '')}", "",
                  f"**Reference:** {row['output']}", "", f"**Model:** {row['model_response']}", ""]
    create_markdown_artifact(key=f"{artifact_prefix(workdir)}-finetune",
                             markdown="\n".join(lines),
                             description=f"Fine-tuning: val loss {_fmt(summary.get('val_loss'))}")

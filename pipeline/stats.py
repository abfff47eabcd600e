"""Statistics of a token dataset and of the stages that made it (`forge stats`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline.files import WorkFolder, read_json
from pipeline.registry import STAGE_NAMES
from pipeline.shards import SPLITS, TokenDataset


def length_summary(lengths: np.ndarray) -> dict:
    if lengths.size == 0:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0, "max": 0}
    return {
        "mean": round(float(lengths.mean()), 1),
        "median": float(np.median(lengths)),
        "p99": round(float(np.percentile(lengths, 99)), 1),
        "max": int(lengths.max()),
    }


def _doc_lengths(shard) -> np.ndarray:
    ends = np.asarray(shard.doc_ends(), dtype=np.int64)
    return np.diff(ends, prepend=0)


def dataset_stats(path: Path) -> dict:
    dataset = TokenDataset(path)
    splits = {}
    for split in SPLITS:
        shards, all_lengths, tokens, text_bytes = [], [], 0, 0
        for shard in dataset.shards(split):
            lengths = _doc_lengths(shard)
            all_lengths.append(lengths)
            tokens += shard.info["tokens"]
            text_bytes += shard.info["text_bytes"]
            shards.append({
                "name": shard.name,
                "tokens": shard.info["tokens"],
                "docs": shard.info["docs"],
                "doc_tokens": length_summary(lengths),
                "bytes_per_token": round(shard.info["text_bytes"] / max(1, shard.info["tokens"]),
                                         3),
                "sources": shard.info["sources"],
            })
        lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, dtype=np.int64)
        splits[split] = {
            "tokens": tokens,
            "docs": int(lengths.size),
            "doc_tokens": length_summary(lengths),
            "bytes_per_token": round(text_bytes / max(1, tokens), 3),
            "shards": shards,
        }
    return {
        "dataset": str(dataset.path),
        "fingerprint": dataset.attrs["fingerprint"],
        "tokenizer": dataset.attrs["tokenizer"],
        "source_docs": dataset.attrs["source_docs"],
        "splits": splits,
        "stages": stage_stats(dataset.path.parent.parent),
    }


def stage_stats(workdir: Path) -> list[dict]:
    """Per stage: documents in, out, dropped by reason, time; from the stage manifests."""
    rows = []
    for name in STAGE_NAMES:
        manifest_path = WorkFolder(workdir).manifest(name)
        if not manifest_path.exists():
            continue
        manifest = read_json(manifest_path)
        rows.append({
            "stage": name,
            "unit": manifest.get("count_unit", "docs"),
            "in": manifest["docs_in"],
            "out": manifest["docs_out"],
            "dropped": manifest["dropped"],
            "repaired": manifest.get("repaired", {}),
            "mb_in": round(manifest["bytes_in"] / 1e6, 2),
            "mb_out": round(manifest["bytes_out"] / 1e6, 2),
            "seconds": manifest.get("wall_seconds"),
        })
    return rows


def partial_stats(workdir: Path) -> dict:
    """A work folder without a finished dataset: the stages done (with their drops by
    reason) and the stages under way (units committed), so a failed run can be diagnosed."""
    folder = WorkFolder(workdir)
    under_way = {name: len(list((folder.stage(name) / "units").glob("*.json")))
                 for name in STAGE_NAMES
                 if folder.stage(name).is_dir() and not folder.manifest(name).exists()}
    return {"dataset": None, "missing": str(folder.dataset), "stages": stage_stats(workdir),
            "under_way": under_way}


def plot_doc_lengths(path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = TokenDataset(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for split in SPLITS:
        lengths = [_doc_lengths(s) for s in dataset.shards(split)]
        if lengths:
            values = np.concatenate(lengths)
            bins = np.logspace(0, np.log10(max(2, values.max())), 40)
            ax.hist(values, bins=bins, alpha=0.6, label=f"{split} ({values.size} docs)")
    ax.set_xscale("log")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.set_title(f"Document lengths: {path.name}")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def render_stats(stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)  # pipes get whole tables
    console.print(f"[bold]{stats['dataset']}[/]\nfingerprint {stats['fingerprint']}, "
                  f"tokenizer {stats['tokenizer']}")
    shards = Table(title="shards (document lengths in tokens)", title_justify="left")
    for column in ("shard", "tokens", "docs", "mean", "median", "p99", "max", "B/token"):
        shards.add_column(column, justify="left" if column == "shard" else "right", no_wrap=True)
    for split, info in stats["splits"].items():
        rows = [(f"{split}/{s['name']}", s) for s in info["shards"]] + [(f"{split} total", info)]
        for label, row in rows:
            d = row["doc_tokens"]
            shards.add_row(label, f"{row['tokens']:,}", f"{row['docs']:,}", f"{d['mean']:,.0f}",
                           f"{d['median']:,.0f}", f"{d['p99']:,.0f}", f"{d['max']:,}",
                           f"{row['bytes_per_token']:.2f}", end_section=label.endswith("total"))
    console.print(shards)
    mix = Table(title="source mix (documents)", title_justify="left")
    mix.add_column("source")
    mix.add_column("docs", justify="right")
    for source, docs in stats["source_docs"].items():
        mix.add_row(source, f"{docs:,}")
    console.print(mix)
    console.print(_stages_table(stats["stages"]))
    console.print(f"document-length histogram: {stats['plot']}")


def render_partial_stats(stats: dict) -> None:
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(f"[bold]no token dataset yet[/] ({stats['missing']} does not exist)")
    if stats["stages"]:
        console.print(_stages_table(stats["stages"], title="stages done"))
    for name, units in stats["under_way"].items():
        console.print(f"{name}: under way or failed, {units} units committed")
    console.print("to finish it: `forge prepare --config YOUR_CONFIG` (it resumes); if a stage "
                  "dropped every document, first change the sources or the rules its drops name")


def _stages_table(rows: list[dict], title: str = "stages"):
    from rich.table import Table

    stages = Table(title=title, title_justify="left")
    for column in ("stage", "in", "out", "dropped or repaired, by reason", "MB out", "s"):
        stages.add_column(column, justify="left" if column[0] in "sd" else "right")
    for row in rows:
        reasons = [f"{k} {v}" for k, v in row["dropped"].items()]
        reasons += [f"repaired {k} {v}" for k, v in row["repaired"].items()]
        stages.add_row(row["stage"], f"{row['in']:,} {row['unit']}", f"{row['out']:,}",
                       ", ".join(reasons) or "-", str(row["mb_out"]), str(row["seconds"]))
    return stages

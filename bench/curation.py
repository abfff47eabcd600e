"""What curation buys: the demo model pretrained on the demo corpus with and without the
learned quality classifier in the filter, the same tokens seen, evaluated on held-out books
and held-out Python docs pages.

    held out   three books (drawn with a fixed seed among those without a Gutenberg HTML
               twin in the corpus) and 30 pages of the Python docs: no arm trains on them
               and the classifier never sees them; evaluated in fp32 on fixed windows
               (GPT-2 tokens, an end-of-text after each document).
    corpus     configs/demo.yaml's sources without the held-out files (the other books are
               linked into <workdir>/inputs/books, the docs archive is rewritten without the
               held-out pages), run through every data stage of the demo.
    classifier train_classifier (forge train-classifier's defaults): the instruction data and
               the training books positive, the web pages and WARC captures negative.
    unfiltered the demo's filter stage as it is.
    filtered   the same plus `classifier: {model, top_fraction}`, scoring only --scored
               sources (default the web ones: web-html, warc, webdocs; the demo treats books,
               speeches, Gutenberg HTML and the docs as curated, with their own presets).
               top_fraction is per source, DCLM kept its top 10%.

Each seed trains both arms from the same initialization, the demo's `pretrain:` section run
by forge's own runtime, interleaved step by step (bench/pretrain_vs_nanogpt.py), the same
steps and so the same tokens. The data stages and the classifier are reused from the work
folder when their inputs are unchanged.

    python bench/curation.py [--seeds 1337 1338 1339] [--steps 380] [--threads 1]
                             [--top-fraction 0.1] [--small]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import statistics
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
import zstandard
from common import DATA, REPO, RESULTS, VOCAB_DIR, machine_info, print_table, write_json
from pretrain_vs_nanogpt import ForgeSide, held_out_loss, read_gzip_text, train_interleaved

from configs.run import load_training_section
from pipeline.classifier import TrainSettings, read_documents, train_classifier
from pipeline.config import load_config
from pipeline.encoding import EOT_ID, get_encoding
from pipeline.extract import strip_gutenberg
from pipeline.files import WorkFolder, read_json
from pipeline.registry import prepare_stages, stage_function
from pipeline.shards import TokenDataset

SPLIT_SEED = 1337
DEMO = REPO / "configs" / "demo.yaml"
DOCS = DATA / "html" / "python3.11-doc-html.tar.zst"
POSITIVE = [str(DATA / "instruct" / "rasbt-instruction-data.json")]  # + the training books
NEGATIVE = [str(DATA / "webdocs" / "*"), str(DATA / "warc" / "dolma-sample-*.warc.gz")]
WEB = "web-html,warc,webdocs"
SMALL = {"books": 4, "docs": 40}  # --small: training books and docs pages kept

# ---------------------------------------------------------------- held out, and the corpus


def split_inputs(work: Path, held_books: int, held_docs: int, small: bool) -> dict:
    """Link the training books into inputs/books, write the docs archive without the
    held-out pages (inputs/python-docs.tar.zst) and one with only them (inputs/eval-docs.tar.zst);
    reused while the split is the same, else the work folder starts over."""
    books = sorted(p.name for p in (DATA / "books").glob("pg*.txt.gz"))
    # a book the gutenberg-html source also has (pg84-h.htm.gz) is never held out
    twins = {p.name.split("-")[0] for p in (DATA / "html").glob("pg*-h.htm.gz")}
    rng = random.Random(SPLIT_SEED)
    held = sorted(rng.sample([b for b in books if b.split(".")[0] not in twins], held_books))
    train_books = [b for b in books if b not in held]
    members = docs_members()
    held_pages = sorted(rng.sample(sorted(members), held_docs))
    train_pages = [m for m in sorted(members) if m not in held_pages]
    if small:
        train_books, train_pages = train_books[: SMALL["books"]], train_pages[: SMALL["docs"]]
    split = {"held_out_books": held, "held_out_docs": held_pages, "train_books": train_books,
             "train_docs_pages": len(train_pages)}
    inputs = work / "inputs"
    record = inputs / "split.json"
    if record.exists() and read_json(record) == split:
        return split
    shutil.rmtree(work, ignore_errors=True)
    (inputs / "books").mkdir(parents=True)
    for name in train_books:
        (inputs / "books" / name).symlink_to(DATA / "books" / name)
    write_docs_archive(inputs / "python-docs.tar.zst", {m: members[m] for m in train_pages})
    write_docs_archive(inputs / "eval-docs.tar.zst", {m: members[m] for m in held_pages})
    record.write_text(json.dumps(split, indent=1))
    return split


def docs_members() -> dict[str, bytes]:
    """Every HTML page of the Python docs archive, by member name."""
    with DOCS.open("rb") as f, tarfile.open(
        fileobj=zstandard.ZstdDecompressor().stream_reader(f), mode="r|"
    ) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar
                if m.isfile() and m.name.endswith(".html")}


def write_docs_archive(path: Path, members: dict[str, bytes]) -> None:
    with path.open("wb") as f, zstandard.ZstdCompressor().stream_writer(f) as zst, \
            tarfile.open(fileobj=zst, mode="w|") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def eval_tokens(inputs: Path, split: dict) -> dict[str, np.ndarray]:
    """The held-out books (boilerplate cut) and docs pages (read as the extract stage reads
    them) as GPT-2 tokens, an end-of-text after each document."""
    enc = get_encoding(str(VOCAB_DIR))
    texts = {
        "books": [strip_gutenberg(read_gzip_text(DATA / "books" / b))
                  for b in split["held_out_books"]],
        "docs": [text for _, text in read_documents(str(inputs / "eval-docs.tar.zst"))],
    }
    return {name: np.concatenate([np.array([*d, EOT_ID], dtype=np.uint16)
                                  for d in enc.encode_ordinary_batch(docs, num_threads=1)])
            for name, docs in texts.items()}


def corpus_config(work: Path, inputs: Path) -> Path:
    """configs/demo.yaml with the held-out files taken out of its sources."""
    config = {k: v for k, v in yaml.safe_load(DEMO.read_text()).items()
              if k not in ("pretrain", "finetune")}  # the data stages' part
    replaced = {"books": str(inputs / "books" / "*.txt.gz"),
                "python-docs": str(inputs / "python-docs.tar.zst")}
    sources = []
    for source in config["data"]["sources"]:
        if source["name"] in replaced:
            source = {**source, "uri": replaced.pop(source["name"])}
        elif source["uri"].startswith("../"):
            source = {**source, "uri": str((REPO / source["uri"]).resolve())}
        sources.append(source)
    config["data"]["sources"] = sources
    for item in config["data"]["decontaminate"]["eval_sets"]:
        item["path"] = str((REPO / item["path"]).resolve())
    config["data"]["tokenize"]["vocab_dir"] = str(VOCAB_DIR)
    path = work / "corpus.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def prepare(config: Path, overrides: dict, copy_extract_from: Path | None = None) -> dict:
    """Run every data stage the config enables (finished ones are left as they are); the
    dataset's path and what it kept per source."""
    cfg = load_config(config, overrides)
    work = WorkFolder(cfg.workdir)
    if copy_extract_from and (not work.manifest("extract").exists() or read_json(
            work.manifest("extract")) != read_json(copy_extract_from / "manifest.json")):
        shutil.rmtree(work.stage("extract"), ignore_errors=True)
        shutil.copytree(copy_extract_from, work.stage("extract"))
    for name in prepare_stages(cfg):
        if name in ("download", "extract") and copy_extract_from:
            continue
        t0 = time.perf_counter()
        stage_function(name)(cfg)
        print(f"  {work.root.name}: {name} {time.perf_counter() - t0:.0f} s", flush=True)
    filtered = read_json(work.manifest("filter"))
    attrs = TokenDataset(work.dataset).attrs
    return {
        "dataset": str(work.dataset),
        "filter": {k: filtered.get(k) for k in ("docs_in", "docs_out", "dropped")}
        | {"scores": {s: {k: v for k, v in row.items() if k in ("docs", "kept", "cutoff", "mean")}
                      for s, row in (filtered.get("scores") or {}).items()}},
        "splits": attrs["splits"],
        "source_docs": attrs["source_docs"],
        "source_tokens": attrs["source_tokens"],
    }


def classifier(work: Path, inputs: Path) -> tuple[Path, dict]:
    """The quality classifier (reused while its examples are the same)."""
    out = work / "classifier" / "quality.bin"
    positive = [*POSITIVE, str(inputs / "books" / "*.txt.gz")]
    report_path = out.with_name(out.name + ".json")
    if out.exists() and report_path.exists():
        report = read_json(report_path)
        if report["positive"] == positive and report["negative"] == NEGATIVE:
            return out, report
    return out, train_classifier(positive, NEGATIVE, out, TrainSettings())


# ---------------------------------------------------------------- the arms


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339],
                        help="init and data order; both arms of a pair share it")
    parser.add_argument("--steps", type=int, default=0, help="default: the demo's max_steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top-fraction", type=float, default=0.1,
                        help="of each scored source's documents, the filtered arm keeps this")
    parser.add_argument("--scored", default=WEB,
                        help="comma-separated sources the classifier scores (the others opt out)")
    parser.add_argument("--held-out-books", type=int, default=3)
    parser.add_argument("--held-out-docs", type=int, default=30, help="Python docs pages")
    parser.add_argument("--eval-windows", type=int, default=128, help="per held-out set")
    parser.add_argument("--small", action="store_true",
                        help=f"a quick check: {SMALL['books']} training books and "
                        f"{SMALL['docs']} docs pages in the corpus")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-curation"))
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", default=str(RESULTS / "curation.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    work = Path(args.workdir) / ("small" if args.small else "full")
    inputs = work / "inputs"
    t0 = time.perf_counter()
    split = split_inputs(work, args.held_out_books, args.held_out_docs, args.small)
    evals = eval_tokens(inputs, split)
    print(f"held out: {', '.join(split['held_out_books'])} ({evals['books'].size:,} tokens); "
          f"{len(split['held_out_docs'])} docs pages ({evals['docs'].size:,} tokens)")
    model, report = classifier(work, inputs)
    print(f"classifier: precision {report['precision']:.3f} recall {report['recall']:.3f} "
          f"on {report['test_passages']} held-out passages")
    config = corpus_config(work, inputs)
    scored = [s for s in args.scored.split(",") if s]
    names = {s["name"] for s in yaml.safe_load(config.read_text())["data"]["sources"]}
    unknown = sorted(set(scored) - names)
    if unknown:
        parser.error(f"--scored names {unknown[0]!r}, not a source of {DEMO.name}: "
                     f"choose from {', '.join(sorted(names))}")
    unfiltered = prepare(config, {"workdir": str(work / "unfiltered")})
    opt_out = {f"data.filter.per_source.{s}.classifier": None for s in sorted(names - set(scored))}
    filtered = prepare(config, {"workdir": str(work / "filtered"), **opt_out,
                                "data.filter.classifier": {"model": str(model),
                                                           "top_fraction": args.top_fraction}},
                       copy_extract_from=work / "unfiltered" / "extract")
    datasets = {"unfiltered": unfiltered, "filtered": filtered}
    prepare_s = time.perf_counter() - t0
    for arm, d in datasets.items():
        tokens = {s: t["after_mix"] for s, t in d["source_tokens"].items()}
        in_scored = sum(tokens.get(s, 0) for s in scored)
        print(f"{arm}: {d['splits']['train']['tokens']:,} train tokens, {in_scored:,} "
              f"({in_scored / sum(tokens.values()):.2%}) of them in the scored sources; "
              f"docs per source {d['source_docs']}")

    _, demo = load_training_section(str(DEMO), "pretrain")
    steps = args.steps or demo.max_steps
    figures: dict[str, list[dict]] = {"unfiltered": [], "filtered": []}
    rows = []
    for seed in args.seeds:
        sides = []
        for i, arm in enumerate(datasets):
            cfg = demo.model_copy(update={
                "dataset": datasets[arm]["dataset"], "max_steps": steps, "eval_every": 0,
                "sample_every": 0, "checkpoint_every": 0, "num_threads": args.threads,
                "seed": seed})
            sides.append(ForgeSide(arm, cfg, work / f"train{i}"))
        result = train_interleaved(sides, args.log_every)
        for side in sides:
            seconds = result["seconds"][side.name]
            done = len(result["train_losses"][side.name])
            loss = {name: held_out_loss(side.model, tokens, args.eval_windows,
                                        side.model.config.block_size)
                    for name, tokens in evals.items()}
            figures[side.name].append({
                "seed": seed, "steps": done, "tokens": done * side.tokens_per_step,
                "train_seconds": round(seconds, 2), "s_per_step": round(seconds / done, 4),
                "val_loss_books": round(loss["books"], 4), "val_loss_docs": round(loss["docs"], 4),
                "train_losses": [round(x, 4) for x in result["train_losses"][side.name]],
            })
            rows.append([side.name, seed, done, f"{done * side.tokens_per_step:,}",
                         f"{seconds:.0f}", f"{loss['books']:.3f}", f"{loss['docs']:.3f}"])
    print_table(f"held-out val loss ({args.eval_windows} fixed windows per set, fp32)",
                ["arm", "seed", "steps", "tokens", "train s", "books", "python docs"], rows)

    difference = {}
    for name in ("books", "docs"):
        diffs = [f[f"val_loss_{name}"] - u[f"val_loss_{name}"]
                 for f, u in zip(figures["filtered"], figures["unfiltered"], strict=True)]
        difference[name] = {"per_seed": [round(d, 4) for d in diffs],
                            "mean": round(statistics.mean(diffs), 4),
                            "stdev": round(spread(diffs), 4)}
    print_table("filtered - unfiltered, over seeds (negative: curation helps)",
                ["eval set", "mean", "stdev", "per seed"],
                [[n, f"{d['mean']:+.4f}", f"{d['stdev']:.4f}",
                  " ".join(f"{x:+.4f}" for x in d["per_seed"])] for n, d in difference.items()])
    write_json(Path(args.out), {
        "benchmark": "curation",
        "machine": machine_info(["torch", "numpy", "fasttext-numpy2"]),
        "inputs": {"seeds": args.seeds, "steps": steps, "threads": args.threads,
                   "top_fraction": args.top_fraction, "scored_sources": scored,
                   "eval_windows": args.eval_windows, "small": args.small,
                   "eval_tokens": {n: int(t.size) for n, t in evals.items()},
                   "split": split, "classifier_positive": report["positive"],
                   "classifier_negative": report["negative"],
                   "pretrain": demo.model_dump(mode="json", exclude_unset=True)},
        "classifier": {k: report.get(k) for k in
                       ("precision", "recall", "test_passages", "train_passages")},
        "datasets": datasets, "prepare_seconds": round(prepare_s, 1),
        "arms": figures, "filtered_minus_unfiltered": difference,
    })


if __name__ == "__main__":
    main()

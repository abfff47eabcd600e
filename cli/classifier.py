"""`forge train-classifier`: a fastText quality classifier from example documents."""

from __future__ import annotations

import argparse
import json
import sys


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sub = commands.add_parser(
        "train-classifier", parents=[common],
        help="train a fastText quality classifier (DCLM's hq/cc labels) from example documents")
    sub.add_argument("out", help="the model file to write (.bin); its report goes to OUT.json")
    sub.add_argument("--positive", nargs="+", required=True, metavar="SOURCE",
                     help="files or globs of good documents (text, jsonl, html, warc, archives, "
                     "Alpaca instruction JSON)")
    sub.add_argument("--negative", nargs="+", required=True, metavar="SOURCE",
                     help="files or globs of documents to score low (e.g. web pages)")
    sub.add_argument("--test-fraction", type=float, default=0.2,
                     help="share of each source's documents held out for the test")
    sub.add_argument("--seed", type=int, default=1337)
    sub.add_argument("--epoch", type=int, default=25)
    sub.add_argument("--threads", type=int, default=1,
                     help="training threads (1: the same seed gives the same model)")
    sub.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.set_defaults(handler=train_classifier)


def train_classifier(args: argparse.Namespace) -> int:
    from pipeline.classifier import TrainSettings
    from pipeline.classifier import train_classifier as train

    if not 0 < args.test_fraction < 1:
        raise ValueError("--test-fraction must be between 0 and 1 (exclusive), e.g. 0.2")
    settings = TrainSettings(test_fraction=args.test_fraction, seed=args.seed, epoch=args.epoch,
                             threads=args.threads)
    report = train(args.positive, args.negative, args.out, settings)
    if args.json:
        print(json.dumps(report, indent=1))
    elif not args.quiet:
        render_report(report)
    return 0


def render_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(f"model {report['model']} ({report['train_passages']:,} training passages, "
                  f"{report['test_passages']:,} held out)\nat score >= {report['threshold']}: "
                  f"precision {report['precision']:.3f}, recall {report['recall']:.3f}, "
                  f"specificity {report['specificity']:.3f}")
    table = Table(title="held-out score distribution per source", title_justify="left")
    for column in ("source", "label", "passages", "mean", "p10", "median", "p90", ">= thr"):
        table.add_column(column, justify="left" if column in ("source", "label") else "right")
    for source, row in report["sources"].items():
        table.add_row(source, row["label"], f"{row['docs']:,}", f"{row['mean']:.3f}",
                      f"{row['p10']:.3f}", f"{row['median']:.3f}", f"{row['p90']:.3f}",
                      f"{row['above_threshold']:.0%}")
    console.print(table)

"""Training-batch throughput of model.data.ShardLoader from memory-mapped shards, on one core.

Each repetition draws batches of random windows (the seeded per-epoch permutation) from the
train split of the books dataset (bench/pretrain_vs_nanogpt.py builds it: 55 books, about
9.2M GPT-2 tokens) and times them; nanoGPT's get_batch (random offsets, torch.stack of numpy
slices) reads the same memmap beside it in the same run. The page cache is warm (the dataset
is read once first), as it is from the second epoch of a run. The process is pinned to one CPU
and torch to one thread.

Goal: over 50M tokens/s on one core, far above what an 8-GPU run consumes (8 H100s training
GPT-2 124M take about 3.7M tokens/s).

    python bench/loader_throughput.py [--batches 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, RESULTS, machine_info, median, print_table, rotated, write_json
from pretrain_vs_nanogpt import build_books_dataset, nanogpt_get_batch, split_tokens

from model.data import ShardLoader

SHAPES = [(8, 256), (16, 1024), (64, 1024)]  # (batch, block): the demo, a GPU micro-batch, big


def time_batches(next_batch, batches: int) -> float:
    t0 = time.perf_counter()
    for _ in range(batches):
        next_batch()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=2000, help="batches per repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-books"))
    parser.add_argument("--out", default=str(RESULTS / "loader_throughput.json"))
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    dataset, _ = build_books_dataset(Path(args.workdir) / "books")
    train = split_tokens(dataset, "train")
    int(np.asarray(train).sum())  # warm the page cache

    rows, figures = [], []
    for batch, block in SHAPES:
        tokens_per_batch = batch * block
        loader = ShardLoader(dataset, "train", batch, block, seed=0)
        gen = torch.Generator().manual_seed(0)
        sides = {
            "forge": loader.next_batch,
            "nanogpt": lambda b=batch, t=block, g=gen: nanogpt_get_batch(train, b, t, g),
        }
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        for rep in range(args.repeats):
            for name in rotated(list(sides), rep):
                seconds[name].append(time_batches(sides[name], args.batches))
        result = {"batch": batch, "block": block}
        for name, runs in seconds.items():
            per_s = args.batches / median(runs)
            result[name] = {
                "seconds": [round(s, 4) for s in runs],
                "batches_per_s": round(per_s, 1),
                "windows_per_s": round(per_s * batch, 1),
                "tokens_per_s": round(per_s * tokens_per_batch),
            }
        result["forge_vs_nanogpt"] = round(
            result["forge"]["tokens_per_s"] / result["nanogpt"]["tokens_per_s"], 2
        )
        figures.append(result)
        rows.append(
            [
                f"{batch} x {block}",
                f"{result['forge']['windows_per_s']:,.0f}",
                f"{result['forge']['tokens_per_s'] / 1e6:.1f}M",
                f"{result['nanogpt']['tokens_per_s'] / 1e6:.1f}M",
                f"{result['forge_vs_nanogpt']:.2f}x",
            ]
        )
    print_table(
        f"ShardLoader.next_batch on one core, median of {args.repeats} x {args.batches} batches",
        ["batch x block", "windows/s", "tokens/s", "nanoGPT get_batch", "ratio"],
        rows,
    )
    write_json(
        Path(args.out),
        {
            "benchmark": "loader_throughput",
            "machine": machine_info(["torch", "numpy", "zarr"]),
            "inputs": {
                "dataset": str(dataset),
                "train_tokens": int(train.size),
                "batches": args.batches,
                "repeats": args.repeats,
                "cpus": 1,
                "page_cache": "warm",
            },
            "results": figures,
            "goal_tokens_per_s": 50_000_000,
        },
    )


if __name__ == "__main__":
    main()

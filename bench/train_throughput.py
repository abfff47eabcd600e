"""CPU training tokens/s of forge's loop against a minimal plain-PyTorch loop, same model.

    forge   model.train.run_pretrain() on the books dataset with the demo recipe
            (configs/demo.yaml's pretrain section): shard loader, gradient accumulation,
            schedule, clipping, autocast, a JSONL record and a terminal line every step
            (log_every=1, the most it can log), as `forge pretrain` runs it. Its own
            tokens/s is used: steps after the first, evaluations and checkpoints excluded.
    plain   the same GPT config, optimizer, autocast and clipping over one fixed batch of
            the same shape: forward, backward, clip, step, zero_grad, nothing else.

Each repetition trains both for --steps steps (a fresh model each time), in rotated order
so drifting load hits both; the medians are compared. Goal: forge/plain at least 1.0x (the
loop's extras cost nothing).

    python bench/train_throughput.py [--steps 20] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from common import REPO, RESULTS, machine_info, median, print_table, rotated, write_json
from pretrain_vs_nanogpt import build_books_dataset

from configs.run import load_training_section
from model.config import PretrainConfig
from model.gpt import GPT
from model.optim import build_optimizer
from model.runtime import resolve_dtype
from model.train import run_pretrain
from pipeline.encoding import VOCAB_SIZE


def forge_tokens_per_s(cfg: PretrainConfig, workdir: Path) -> float:
    return run_pretrain(cfg, workdir, overwrite=True)["tokens_per_s"]


def plain_tokens_per_s(cfg: PretrainConfig, vocab_size: int, steps: int) -> float:
    """The minimal loop; the first step is warm-up and not timed, as in forge's figure."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.gpt_config(vocab_size))
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    dtype = resolve_dtype(cfg.dtype, torch.device("cpu"))
    autocast = (
        torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )
    accum = cfg.total_batch_tokens // (cfg.micro_batch_size * model.config.block_size)
    shape = (cfg.micro_batch_size, model.config.block_size)
    x = torch.randint(0, vocab_size, shape)
    y = torch.randint(0, vocab_size, shape)
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    t0 = 0.0
    for step in range(steps + 1):
        if step == 1:
            t0 = time.perf_counter()
        for _ in range(accum):
            with autocast:
                _, loss = model(x, y)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * cfg.total_batch_tokens / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-books"))
    parser.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    torch.set_num_threads(args.threads)
    dataset, _ = build_books_dataset(Path(args.workdir) / "books")
    _, recipe = load_training_section(args.config, "pretrain")
    cfg = recipe.model_copy(
        update={
            "dataset": str(dataset),
            "max_steps": args.steps + 1,
            "log_every": 1,
            "eval_every": 0,
            "sample_every": 0,
            "checkpoint_every": 0,
            "num_threads": args.threads,
        }
    )
    vocab = cfg.vocab_size or VOCAB_SIZE
    sides = {
        "forge": lambda: forge_tokens_per_s(cfg, Path(args.workdir) / "throughput"),
        "plain": lambda: plain_tokens_per_s(cfg, vocab, args.steps),
    }
    runs: dict[str, list[float]] = {name: [] for name in sides}
    for rep in range(args.repeats):
        for name in rotated(list(sides), rep):
            runs[name].append(sides[name]())
            print(f"repeat {rep}: {name} {runs[name][-1]:.0f} tokens/s", flush=True)
    medians = {name: median(values) for name, values in runs.items()}
    ratio = medians["forge"] / medians["plain"]
    print_table(
        f"training tokens/s, {cfg.preset} preset, {args.threads} threads, median of "
        f"{args.repeats} x {args.steps} steps",
        ["loop", "tokens/s", "runs"],
        [[name, f"{medians[name]:.0f}", " ".join(f"{v:.0f}" for v in runs[name])] for name in runs],
    )
    print(f"\nforge / plain: {ratio:.3f}x (goal: at least 1.0x)")
    write_json(
        Path(args.out),
        {
            "benchmark": "train_throughput",
            "machine": machine_info(["torch", "numpy"]),
            "inputs": {
                "config": args.config,
                "recipe": cfg.model_dump(mode="json", exclude_unset=True),
                "steps": args.steps,
                "repeats": args.repeats,
                "threads": args.threads,
                "dataset": str(dataset),
            },
            "tokens_per_s": {name: [round(v, 1) for v in values] for name, values in runs.items()},
            "median_tokens_per_s": {name: round(v, 1) for name, v in medians.items()},
            "forge_over_plain": round(ratio, 3),
        },
    )


if __name__ == "__main__":
    main()

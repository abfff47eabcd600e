"""forge's demo pretraining recipe against nanoGPT's train.py, in the same wall time, on books.

The corpus is the 60 Project Gutenberg books in ../shared/data/books (boilerplate stripped,
GPT-2 tokens, an end-of-text after each book), written as forge shards; five books, drawn
with a fixed seed, are held out as the validation split and neither side trains on them.

    nanogpt  nanoGPT's train.py as the reference run used it: 4 layers, 4 heads, width 256,
             context 256, batch 8, no gradient accumulation, fp32, vocabulary padded to
             50304, no biases, AdamW (0.9, 0.95), weight decay 0.1 on 2-D weights, lr 1e-3
             with 20 warmup steps and cosine decay to 1e-4 at step 200, clip 1.0; batches
             are random offsets drawn with replacement (its get_batch). 200 steps.
    forge    the `pretrain:` section of configs/demo.yaml, run by forge's own runtime (its
             loader, schedule, accumulation, clipping and autocast), dataset swapped for the
             books.

Both train in this one process, one step at a time, always stepping the side that has spent
less training time so far, so load on the shared machine hits both alike. Each side's time
is the sum of its step times (evaluations and checkpoints excluded on both sides). At the
end both are evaluated in fp32 on the same fixed windows of the held-out books. forge wins
when its loss is lower and its time is not longer.

    python bench/pretrain_vs_nanogpt.py [--config configs/demo.yaml] [--recipe modern]
                                        [--eval-windows 256] [--seed 1337]
"""

from __future__ import annotations

import argparse
import gzip
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    DATA,
    REPO,
    RESULTS,
    VOCAB_DIR,
    machine_info,
    print_table,
    write_json,
)

from configs.run import load_training_section
from model.config import GPT2_ONLY, MODERN_ONLY, PretrainConfig
from model.evaluate import val_loss
from model.gpt import GPT, GPTConfig
from model.runtime import compute_init
from model.train import Pretraining
from pipeline.encoding import EOT_ID, VOCAB_SIZE, get_encoding
from pipeline.extract import strip_gutenberg
from pipeline.shards import TokenDataset, create_layout, write_group_attributes, write_shard
from pipeline.tokenize import dataset_attributes

HELD_OUT_BOOKS = 5
SPLIT_SEED = 1337

# ---------------------------------------------------------------- the books as forge shards


def build_books_dataset(dest: Path) -> tuple[Path, dict]:
    """Tokenize the books into dest/dataset.zarr (reused when complete); returns the split."""
    books = sorted((DATA / "books").glob("pg*.txt.gz"))
    held_out = sorted(random.Random(SPLIT_SEED).sample([b.name for b in books], HELD_OUT_BOOKS))
    split = {"val": held_out, "train": [b.name for b in books if b.name not in held_out]}
    dataset = dest / "dataset.zarr"
    try:
        if TokenDataset(dataset).attrs.get("books") == split:
            return dataset, split
    except (FileNotFoundError, ValueError):
        pass
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    enc = get_encoding(str(VOCAB_DIR))
    create_layout(dataset)
    shards = []
    for name, files in split.items():
        texts = [strip_gutenberg(read_gzip_text(DATA / "books" / f)) for f in files]
        docs = enc.encode_ordinary_batch(texts, num_threads=2)
        tokens = np.concatenate([np.array([*d, EOT_ID], dtype=np.uint16) for d in docs])
        doc_ends = np.cumsum([len(d) + 1 for d in docs])
        sources = {"sources": {"books": len(docs)}}
        shards.append(write_shard(dataset, dest, name, "000000", tokens, doc_ends, sources))
    attributes = dataset_attributes(shards, cfg_hash="bench-books")
    write_group_attributes(dataset, {**attributes, "books": split})
    return dataset, split


def read_gzip_text(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def split_tokens(dataset: Path, split: str) -> np.ndarray:
    """A split's tokens, its shards one after another (the demo's dataset has several)."""
    shards = TokenDataset(dataset).shards(split)
    return shards[0].tokens() if len(shards) == 1 else np.concatenate([s.tokens() for s in shards])


def unigram_baselines(train: np.ndarray, val: np.ndarray) -> dict:
    """Entropy of all the books' tokens, and the val tokens' cross-entropy under the train
    unigram (add-one smoothed): what a model that ignores context scores."""
    train_counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64)
    val_counts = np.bincount(val, minlength=VOCAB_SIZE).astype(np.float64)
    both = train_counts + val_counts
    p_all = both[both > 0] / both.sum()
    q = (train_counts + 1) / (train_counts.sum() + train_counts.size)
    return {
        "entropy_all_books_nats": float(-(p_all * np.log(p_all)).sum()),
        "val_cross_entropy_under_train_unigram_nats": float(
            -(val_counts * np.log(q)).sum() / val_counts.sum()
        ),
    }


# ---------------------------------------------------------------- the two sides


def nanogpt_get_batch(
    data: np.ndarray, batch: int, block: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: random offsets drawn with replacement, rows stacked from numpy."""
    ix = torch.randint(len(data) - block, (batch,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix])
    return x, y


class NanoGPTSide:
    """nanoGPT's train.py loop (get_batch, get_lr, AdamW, clip), over forge's GPT module,
    which is nanoGPT's model.py with GPT-2's defaults."""

    name = "nanogpt"
    lr, min_lr, warmup, max_steps, batch, block = 1e-3, 1e-4, 20, 200, 8, 256

    def __init__(self, train: np.ndarray, seed: int) -> None:
        torch.manual_seed(seed)
        config = GPTConfig(
            n_layer=4, n_head=4, n_embd=256, block_size=self.block, vocab_size=50304, bias=False
        )
        self.model = GPT(config)
        # nanoGPT fuses AdamW on CUDA only.
        self.optimizer = self.model.configure_optimizer(
            0.1, self.lr, (0.9, 0.95), "cpu", fused=False
        )
        self.train = train
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.tokens_per_step = self.batch * self.block

    def get_lr(self, it: int) -> float:
        if it < self.warmup:
            return self.lr * (it + 1) / (self.warmup + 1)
        if it > self.max_steps:
            return self.min_lr
        ratio = (it - self.warmup) / (self.max_steps - self.warmup)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.lr - self.min_lr)

    @property
    def done(self) -> bool:
        return self.step_count >= self.max_steps

    def step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(self.step_count)
        x, y = nanogpt_get_batch(self.train, self.batch, self.block, self.generator)
        _, loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return loss.item()


class ForgeSide:
    """forge's Pretraining run with a config's recipe; each step is its train_step, as in fit()."""

    def __init__(self, name: str, cfg: PretrainConfig, workdir: Path) -> None:
        self.name = name
        compute = compute_init(cfg.device, cfg.dtype, cfg.num_threads, "pretrain")
        self.trainer = Pretraining(cfg, workdir, compute, overwrite=True)
        self.trainer.wrap()
        self.trainer.model.train()
        self.model = self.trainer.raw
        self.max_steps = cfg.max_steps
        self.tokens_per_step = cfg.total_batch_tokens

    @property
    def done(self) -> bool:
        return self.trainer.step >= self.max_steps

    def step(self) -> float:
        loss, _, _, _ = self.trainer.train_step()
        return float(loss)


def parse_settings(text: str) -> dict[str, float]:
    """"key=value,..." as pretrain fields (numbers)."""
    pairs = (item.partition("=") for item in filter(None, text.split(",")))
    return {key: float(value) for key, _, value in pairs}


def with_recipe(cfg: PretrainConfig, spec: str) -> PretrainConfig:
    """cfg trained by another recipe, "modern" or "modern:key=value,...": the fields only the
    other recipe reads are dropped, the given ones set."""
    recipe, _, settings = spec.partition(":")
    drop = GPT2_ONLY if recipe == "modern" else MODERN_ONLY
    fields = {k: v for k, v in cfg.model_dump(exclude_unset=True).items() if k not in drop}
    return PretrainConfig(**fields | {"recipe": recipe} | parse_settings(settings))


# ---------------------------------------------------------------- evaluation


def fixed_windows(val: np.ndarray, count: int, block: int, batch: int,
                  device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` windows of block + 1 tokens spread evenly over the val split, in batches."""
    starts = np.linspace(0, len(val) - block - 1, count).astype(np.int64)
    rows = torch.from_numpy(np.stack([val[s : s + block + 1].astype(np.int64) for s in starts]))
    rows = rows.to(device)
    return [(r[:, :-1], r[:, 1:]) for r in rows.split(batch)]


def held_out_loss(model: GPT, val: np.ndarray, windows: int, block: int = 256) -> float:
    """Mean fp32 loss over `windows` windows spread evenly over the held-out books."""
    return val_loss(model, fixed_windows(val, windows, block, 8), torch.device("cpu"))


def train_interleaved(sides: list, log_every: int) -> dict:
    """Step whichever unfinished side has used less training time, until both are done."""
    spent = {s.name: 0.0 for s in sides}
    losses: dict[str, list[float]] = {s.name: [] for s in sides}
    while not all(s.done for s in sides):
        side = min((s for s in sides if not s.done), key=lambda s: spent[s.name])
        t0 = time.perf_counter()
        losses[side.name].append(side.step())
        spent[side.name] += time.perf_counter() - t0
        n = len(losses[side.name])
        if n % log_every == 0:
            print(
                f"{side.name:8s} step {n:4d} loss {losses[side.name][-1]:.3f} "
                f"{spent[side.name]:6.1f} s ({n * side.tokens_per_step / spent[side.name]:.0f} "
                "tok/s)",
                flush=True,
            )
    return {"seconds": spent, "train_losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        action="append",
        help="run config whose pretrain: recipe trains a forge side; repeatable "
        "(default configs/demo.yaml)",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        help="also train the first config's pretrain: with this recipe, e.g. modern or "
        "modern:embedding_lr=0.1,head_lr=0.02; repeatable",
    )
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1337, help="init and data order, both sides")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-books"))
    parser.add_argument("--steps", type=int, default=0,
                        help="a quick check: stop every side after this many steps")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--out", default=str(RESULTS / "pretrain_vs_nanogpt.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    t0 = time.perf_counter()
    dataset, books = build_books_dataset(workdir / "books")
    prepare_s = time.perf_counter() - t0
    train, val = split_tokens(dataset, "train"), split_tokens(dataset, "val")
    baselines = unigram_baselines(np.asarray(train), np.asarray(val))
    print(
        f"books: {len(books['train'])} train ({train.size:,} tokens), {len(books['val'])} "
        f"held out ({val.size:,} tokens), prepared in {prepare_s:.0f} s; unigram entropy "
        f"{baselines['entropy_all_books_nats']:.3f} nats, val under the train unigram "
        f"{baselines['val_cross_entropy_under_train_unigram_nats']:.3f}"
    )

    nanogpt = NanoGPTSide(train, args.seed)
    sides: list = [nanogpt]
    recipes = {}
    for config in args.config or [str(REPO / "configs" / "demo.yaml")]:
        name = "forge:" + Path(config).stem
        _, run_config = load_training_section(config, "pretrain")
        recipes[name] = run_config.model_copy(
            update={
                "dataset": str(dataset),
                "eval_every": 0,
                "sample_every": 0,
                "checkpoint_every": 0,
                "num_threads": args.threads,
                "seed": args.seed,
            }
        )
    first = next(iter(recipes.values()))
    for spec in args.recipe:
        recipes[f"forge:{spec}"] = with_recipe(first, spec)
    for i, (name, cfg) in enumerate(recipes.items()):
        sides.append(ForgeSide(name, cfg, workdir / f"forge{i}"))
        print(f"{name}: {cfg.model_dump(exclude_unset=True)}")
    if args.steps:
        for side in sides:
            side.max_steps = min(side.max_steps, args.steps)
    before = {s.name: held_out_loss(s.model, val, args.eval_windows) for s in sides}
    result = train_interleaved(sides, args.log_every)
    after = {s.name: held_out_loss(s.model, val, args.eval_windows) for s in sides}

    rows, figures = [], {}
    for s in sides:
        seconds = result["seconds"][s.name]
        steps = len(result["train_losses"][s.name])
        tokens = steps * s.tokens_per_step
        figures[s.name] = {
            "steps": steps,
            "tokens": tokens,
            "train_seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
            "val_loss_before": round(before[s.name], 4),
            "val_loss": round(after[s.name], 4),
            "params": s.model.num_params(),
            "train_losses": [round(x, 4) for x in result["train_losses"][s.name]],
        }
        if s is not nanogpt:
            figures[s.name]["time_ratio"] = round(seconds / result["seconds"]["nanogpt"], 3)
            figures[s.name]["wins"] = (
                after[s.name] < after["nanogpt"] and seconds <= result["seconds"]["nanogpt"]
            )
        rows.append(
            [
                s.name,
                steps,
                f"{tokens:,}",
                f"{seconds:.0f}",
                f"{tokens / seconds:.0f}",
                f"{after[s.name]:.3f}",
                {True: "yes", False: "NO"}.get(figures[s.name].get("wins"), "-"),
            ]
        )
    print_table(
        "held-out books: the same fixed windows, fp32 evaluation",
        ["side", "steps", "tokens", "train s", "tokens/s", "val loss", "beats nanoGPT"],
        rows,
    )
    print(
        f"\nunigram baselines: {baselines['entropy_all_books_nats']:.3f} nats (entropy of all "
        f"books), {baselines['val_cross_entropy_under_train_unigram_nats']:.3f} (val under the "
        "train unigram); forge wins when its val loss is lower in no more training time"
    )
    write_json(
        Path(args.out),
        {
            "benchmark": "pretrain_vs_nanogpt",
            "machine": machine_info(["torch", "numpy", "tiktoken"]),
            "inputs": {
                "books": books,
                "train_tokens": int(train.size),
                "val_tokens": int(val.size),
                "eval_windows": args.eval_windows,
                "threads": args.threads,
                "seed": args.seed,
                "forge_recipes": {
                    name: cfg.model_dump(mode="json", exclude_unset=True)
                    for name, cfg in recipes.items()
                },
                "nanogpt_recipe": {
                    k: getattr(NanoGPTSide, k)
                    for k in ("lr", "min_lr", "warmup", "max_steps", "batch", "block")
                },
            },
            "unigram": baselines,
            "sides": figures,
            "prepare_seconds": round(prepare_s, 1),
        },
    )


if __name__ == "__main__":
    main()

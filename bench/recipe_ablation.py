"""The modern recipe against the gpt2 one on the held-out books: ablation, learning rates, speed.

Every arm is forge's own Pretraining run (pretrain: of configs/demo.yaml, dataset swapped for
the books of bench/pretrain_vs_nanogpt.py) with the same steps and tokens, and differs only in
what the arm says:

    gpt2       recipe gpt2 (GPT-2's architecture, AdamW, cosine), the demo's learning rate
    optimizer  GPT-2's architecture trained by the modern optimizer (Muon + AdamW groups, WSD)
    arch       the modern architecture trained by the gpt2 recipe's AdamW and cosine
    modern     both

An arm is NAME or NAME:key=value,... (e.g. modern:embedding_lr=0.1,head_lr=0.02) with any
pretrain field. The arms train interleaved (the one that has spent the least time steps next),
so load on the shared machine hits all alike; each is then evaluated in fp32 on the same fixed
windows of the held-out books. --shape LxW trains another width and depth (e.g. 8x512, shaped
like GPT-2 124M: most parameters in the blocks).

    python bench/recipe_ablation.py --steps 100 --arms gpt2 optimizer arch modern
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from common import REPO, RESULTS, machine_info, print_table, write_json
from pretrain_vs_nanogpt import (
    ForgeSide,
    build_books_dataset,
    held_out_loss,
    parse_settings,
    split_tokens,
    train_interleaved,
)

from configs.run import load_training_section
from model.config import GPT2_ONLY, MODERN_ONLY, PretrainConfig
from model.gpt_config import ARCHITECTURES, GPTConfig

# what each arm takes from the modern recipe: (optimizer, architecture)
ARMS = {"gpt2": (False, False), "optimizer": (True, False), "arch": (False, True),
        "modern": (True, True)}


class AblationConfig(PretrainConfig):
    """A pretrain config whose architecture may be the other recipe's (the ablation's arms)."""

    architecture: str = "gpt2"

    def gpt_config(self, vocab_size: int | None = None) -> GPTConfig:
        config = super().gpt_config(vocab_size)
        return dataclasses.replace(config, **ARCHITECTURES[self.architecture])


def arm_config(spec: str, base: dict, steps: int, shape: tuple[int, int] | None) -> AblationConfig:
    """The config of an arm "NAME[:key=value,...]" on the base pretrain section."""
    name, _, settings = spec.partition(":")
    modern_optimizer, modern_arch = ARMS[name]
    recipe = "modern" if modern_optimizer else "gpt2"
    fields = {k: v for k, v in base.items() if k not in (GPT2_ONLY if modern_optimizer
                                                          else MODERN_ONLY)}
    fields.update(recipe=recipe, architecture="modern" if modern_arch else "gpt2",
                  max_steps=steps)
    if shape:
        fields.update(n_layer=shape[0], n_embd=shape[1], n_head=shape[1] // 64)
    return AblationConfig(**fields | parse_settings(settings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--shape", help="LAYERSxWIDTH, e.g. 8x512 (heads of 64)")
    parser.add_argument("--set", default="", help="key=value,... for every arm (before its own)")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-books"))
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--out", default=str(RESULTS / "recipe_ablation.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    dataset, books = build_books_dataset(workdir / "books")
    val = split_tokens(dataset, "val")
    _, demo = load_training_section(args.config, "pretrain")
    base = demo.model_dump(exclude_unset=True) | {
        "dataset": str(dataset), "eval_every": 0, "sample_every": 0, "checkpoint_every": 0,
        "num_threads": args.threads, "seed": args.seed,
    }
    shape = tuple(int(n) for n in args.shape.split("x")) if args.shape else None
    base.update(parse_settings(args.set))
    configs = {spec: arm_config(spec, base, args.steps, shape) for spec in args.arms}
    sides = [ForgeSide(spec, cfg, workdir / f"arm{i}") for i, (spec, cfg) in
             enumerate(configs.items())]
    t0 = time.perf_counter()
    result = train_interleaved(sides, args.log_every)
    wall = time.perf_counter() - t0
    after = {s.name: held_out_loss(s.model, val, args.eval_windows, s.model.config.block_size)
             for s in sides}

    reference = after[sides[0].name]
    rows, figures = [], {}
    for s in sides:
        seconds = result["seconds"][s.name]
        tokens = len(result["train_losses"][s.name]) * s.tokens_per_step
        figures[s.name] = {
            "config": configs[s.name].model_dump(mode="json", exclude_unset=True),
            "params": s.model.num_params(), "tokens": tokens,
            "train_seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "val_loss": round(after[s.name], 4),
            "val_loss_vs_first_arm": round(after[s.name] - reference, 4),
            "train_losses": [round(x, 4) for x in result["train_losses"][s.name]],
        }
        rows.append([s.name, f"{s.model.num_params() / 1e6:.1f}M", f"{tokens:,}",
                     f"{seconds:.0f}", f"{tokens / seconds:.0f}", f"{after[s.name]:.3f}",
                     f"{after[s.name] - reference:+.3f}"])
    print_table(
        f"held-out books after {args.steps} steps ({args.eval_windows} fixed windows, fp32)",
        ["arm", "params", "tokens", "train s", "tokens/s", "val loss", "vs first"], rows,
    )
    write_json(Path(args.out), {
        "benchmark": "recipe_ablation",
        "machine": machine_info(["torch", "numpy"]),
        "inputs": {"books": books, "steps": args.steps, "shape": args.shape,
                   "eval_windows": args.eval_windows, "threads": args.threads,
                   "seed": args.seed, "arms": args.arms, "config": args.config},
        "arms": figures, "wall_seconds": round(wall, 1),
    })


if __name__ == "__main__":
    main()

"""Fine-tuning against pretraining throughput on the same model, on the CPU.

Every side runs the same optimizer step (AdamW, forward and backward of micro-batches of 8,
gradient clipping) on the same model; only the batches differ:
  pretrain      full windows of block_size tokens (every position is a real token)
  finetune      the 1,100 instruction records, padded to the longest record of each batch
                (what model/finetune.py does), prompt masked
  finetune_ctx  the same records padded to the whole context (the naive way): the cost of
                padding made plain
  lora          as finetune, with LoRA r=16 on every block Linear (frozen base)
tokens/s counts real tokens only; positions/s counts padding too. The sides are interleaved
and repeated; medians are reported.

Run: .venv/bin/python bench/finetune_throughput.py  ->  bench/results/finetune_throughput.json
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from common import DATA, RESULTS, VOCAB_DIR, machine_info, median, print_table, rotated, write_json

SIDES = ("pretrain", "finetune", "finetune_ctx", "lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="model.gpt preset (default small)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(DATA / "instruct" / "rasbt-instruction-data.json"))
    parser.add_argument("--out", default=str(RESULTS / "finetune_throughput.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from model.finetune import InstructionLoader, load_instruction_data
    from model.gpt import GPT, GPTConfig
    from model.lora import apply_lora
    from pipeline.encoding import get_encoding

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTConfig.from_preset(args.preset)
    T = config.block_size
    enc = get_encoding(str(VOCAB_DIR))
    data = load_instruction_data([args.data], enc, T + 1, 1337, 0.05, 0.10)
    examples = data.examples["train"]

    base = GPT(config)
    lora_model = copy.deepcopy(base)
    apply_lora(lora_model, r=16, alpha=16)
    models = {"pretrain": base, "finetune": base, "finetune_ctx": base, "lora": lora_model}
    optimizers = {
        id(m): m.configure_optimizer(0.1, 1e-4, (0.9, 0.999), "cpu") for m in (base, lora_model)
    }
    pad_to_ctx = InstructionLoader(examples, args.batch, seed=1)
    loaders = {
        "finetune": InstructionLoader(examples, args.batch, seed=1),
        "lora": InstructionLoader(examples, args.batch, seed=1),
    }
    windows = torch.Generator().manual_seed(2)

    def batch(side: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(x, y, real tokens) of the side's next batch."""
        if side == "pretrain":
            seq = torch.randint(0, config.vocab_size, (args.batch, T + 1), generator=windows)
            return seq[:, :-1], seq[:, 1:], args.batch * T
        if side == "finetune_ctx":
            b = pad_to_ctx.next_batch()
            x = torch.full((args.batch, T), 50256)
            y = torch.full((args.batch, T), -100)
            x[: b.x.size(0), : b.x.size(1)], y[: b.y.size(0), : b.y.size(1)] = b.x, b.y
            return x, y, b.tokens
        b = loaders[side].next_batch()
        return b.x, b.y, b.tokens

    def measure(side: str) -> dict:
        model = models[side]
        optimizer = optimizers[id(model)]
        model.train()
        tokens = positions = 0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            x, y, real = batch(side)
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens, positions = tokens + real, positions + x.numel()
        seconds = time.perf_counter() - t0
        return {
            "tokens_per_s": round(tokens / seconds, 1),
            "positions_per_s": round(positions / seconds, 1),
            "padding": round(1 - tokens / positions, 4),
            "ms_per_step": round(1000 * seconds / args.steps, 1),
        }

    for side in SIDES:  # warm-up
        measure(side)
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for rep in range(args.repeats):
        for side in rotated(SIDES, rep):
            runs[side].append(measure(side))
            print(f"rep {rep} {side}: {runs[side][-1]}", flush=True)
    summary = {s: {k: median(r[k] for r in runs[s]) for k in runs[s][0]} for s in SIDES}
    ref = summary["pretrain"]["tokens_per_s"]
    print_table(
        f"{args.preset} ({base.num_params() / 1e6:.1f}M params), batch {args.batch}, "
        f"{args.threads} threads; {len(examples)} train records, mean length "
        f"{sum(len(e) for e in examples) / len(examples):.0f} tokens",
        ["side", "tokens/s", "positions/s", "padding", "ms/step", "tokens/s vs pretrain"],
        [
            [
                s,
                summary[s]["tokens_per_s"],
                summary[s]["positions_per_s"],
                f"{summary[s]['padding']:.0%}",
                summary[s]["ms_per_step"],
                f"{summary[s]['tokens_per_s'] / ref:.2f}x",
            ]
            for s in SIDES
        ],
    )
    write_json(
        Path(args.out),
        {
            "benchmark": "finetune_throughput",
            "machine": machine_info(["torch"]),
            "inputs": {
                **vars(args),
                "params": base.num_params(),
                "block_size": T,
                "train_records": len(examples),
            },
            "runs": runs,
            "median": summary,
            "finetune_vs_pretrain": round(summary["finetune"]["tokens_per_s"] / ref, 3),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

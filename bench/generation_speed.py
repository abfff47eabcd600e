"""Generation speed on the CPU: GPT.stream with and without the KV cache, and time to first token.

One model (random weights: speed does not depend on them), one prompt, `--new-tokens` greedy
tokens with no end-of-text stop, so both sides do exactly the same work and must produce the
same tokens. Sides are interleaved and repeated; medians are reported. Without the cache
every token re-runs the whole sequence (O(T^2) work); with it each token is one position.
Time to first token is the prefill of the prompt plus the first sampling step.

With the "small" preset (width 256) the 50257 x 256 output projection, a memory-bound read of
51 MB per token, dominates a cached step, so the cache gains less than on GPT-2 124M
(`--preset gpt2`), where the blocks dominate.

Run: .venv/bin/python bench/generation_speed.py [--preset gpt2 --repeats 1]
     ->  bench/results/generation_speed_<preset>.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import RESULTS, machine_info, median, print_table, rotated, write_json

GOAL = 5.0  # the cache at least this many times faster at --new-tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="model.gpt preset (default small)")
    parser.add_argument("--block-size", type=int, default=512, help="context (default 512)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1: a shared 2-core machine")
    parser.add_argument("--out", help="default: bench/results/generation_speed_<preset>.json")
    return parser.parse_args(argv)


def run_once(model, prompt, new_tokens: int, use_cache: bool) -> dict:  # noqa: ANN001
    import torch

    t0 = time.perf_counter()
    first = None
    tokens = []
    with torch.no_grad():
        for tok in model.stream(prompt, new_tokens, temperature=0.0, use_cache=use_cache):
            if first is None:
                first = time.perf_counter() - t0
            tokens.append(tok)
    total = time.perf_counter() - t0
    return {
        "seconds": round(total, 4),
        "ttft_s": round(first, 4),
        "tokens_per_s": round(len(tokens) / total, 2),
        "decode_tokens_per_s": round((len(tokens) - 1) / (total - first), 2),
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from model.gpt import GPT, GPTConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTConfig.from_preset(args.preset, block_size=args.block_size)
    if args.prompt_tokens + args.new_tokens > config.block_size:
        raise SystemExit("prompt + new tokens exceed the context: raise --block-size")
    model = GPT(config).eval()
    prompt = torch.randint(0, config.vocab_size, (args.prompt_tokens,))
    run_once(model, prompt, 8, True)  # warm-up
    sides = ("kv_cache", "no_cache")
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(args.repeats):
        for side in rotated(sides, rep):
            result = run_once(model, prompt, args.new_tokens, side == "kv_cache")
            runs[side].append(result)
            print(
                f"rep {rep} {side}: {result['tokens_per_s']} tok/s, "
                f"ttft {result['ttft_s'] * 1000:.1f} ms",
                flush=True,
            )
    same = all(r["tokens"] == runs["kv_cache"][0]["tokens"] for s in sides for r in runs[s])
    summary = {}
    for side in sides:
        summary[side] = {
            key: median(r[key] for r in runs[side])
            for key in ("tokens_per_s", "decode_tokens_per_s", "ttft_s", "seconds")
        }
        for r in runs[side]:
            del r["tokens"]
    speedup = summary["kv_cache"]["tokens_per_s"] / summary["no_cache"]["tokens_per_s"]
    print_table(
        f"{args.preset} (block {config.block_size}, {model.num_params() / 1e6:.1f}M params), "
        f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
        f"{args.threads} threads",
        ["side", "tokens/s", "decode tokens/s", "time to first token (ms)", "total (s)"],
        [
            [
                s,
                summary[s]["tokens_per_s"],
                summary[s]["decode_tokens_per_s"],
                round(summary[s]["ttft_s"] * 1000, 1),
                summary[s]["seconds"],
            ]
            for s in sides
        ],
    )
    print(f"\nKV cache speed-up: {speedup:.1f}x (goal >= {GOAL}x); identical tokens: {same}")
    write_json(
        Path(args.out or RESULTS / f"generation_speed_{args.preset}.json"),
        {
            "benchmark": "generation_speed",
            "machine": machine_info(["torch"]),
            "inputs": {**vars(args), "params": model.num_params(), "greedy": True},
            "runs": runs,
            "median": summary,
            "speedup": round(speedup, 2),
            "goal_speedup": GOAL,
            "meets_goal": speedup >= GOAL,
            "identical_tokens": same,
        },
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

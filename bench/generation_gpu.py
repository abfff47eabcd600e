"""Generation speed on a GPU: tokens/s at batch 1 and 16, the CUDA-graph decode step against
the plain one.

The model is GPT-2 124M (`--preset gpt2`, random weights: speed does not depend on them; or
`--checkpoint`). Each side answers `--batches` rows of a 32-token prompt with `--new-tokens`
greedy tokens, no stop, so both sides do the same work; in float32 they must give the same
tokens (exit status 1 if not; in bfloat16 rounding may change a greedy pick, so a difference
is only reported). "static" is `Engine(..., static=True)`: on CUDA its decode step is
compiled once per batch size with torch.compile(mode="reduce-overhead") (CUDA graphs: one
replay per token); the compile time is reported apart, out of the timing. "plain" is
`static=False`, Python per layer. Goal: batch 1 at least 1,500 new tokens/s on an H100/H200.
Under 5 minutes on a GPU; `--device cpu --preset tiny --new-tokens 8` checks it on a CPU.

Run: .venv/bin/python bench/generation_gpu.py -> bench/results/generation_gpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import RESULTS, VOCAB_DIR, machine_info, median, print_table, write_json

GOAL = 1500.0  # new tokens/s at batch 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--checkpoint", help="a forge CHECKPOINT instead of random weights")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--batches", default="1,16", help="batch sizes (default 1,16)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "generation_gpu.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from model.generate import Engine, Request, SamplingParams
    from model.gpt import GPT, GPTConfig
    from model.inference import load_model
    from pipeline.encoding import get_encoding

    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.checkpoint:
        model = load_model(args.checkpoint, device=device)[0]
    else:
        model = GPT(GPTConfig.from_preset(args.preset, block_size=512)).to(device)
    model = model.to(getattr(torch, args.dtype)).eval()
    enc = get_encoding(str(VOCAB_DIR) if VOCAB_DIR.is_dir() else None)
    prompt = torch.randint(0, 50257, (32,)).tolist()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, frequency_penalty=0.0)
    engines = {"static": Engine(model, enc, device, static=True),
               "plain": Engine(model, enc, device, static=False)}

    def run(side: str, batch: int) -> tuple[float, list[list[int]]]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engines[side].generate([Request(prompt, params)] * batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, [c.tokens for c in out]

    results, table, same = {}, [], True
    for batch in (int(b) for b in args.batches.split(",")):
        for side in engines:
            warm, _ = run(side, batch)  # compiles and captures the static side's graph
            times, tokens = [], None
            for _ in range(args.repeats):
                seconds, tokens = run(side, batch)
                times.append(round(seconds, 4))
            new = sum(len(t) for t in tokens)
            rate = round(new / median(times), 1)
            results[f"{side}_batch{batch}"] = {"batch": batch, "warmup_s": round(warm, 2),
                                               "runs_s": times, "new_tokens": new,
                                               "tokens_per_s": rate, "tokens": tokens[0][:16]}
            table.append([side, batch, rate, round(warm, 2)])
            print(f"{side} batch {batch}: {rate} tokens/s (first call {warm:.1f} s)", flush=True)
        same &= (results[f"static_batch{batch}"]["tokens"]
                 == results[f"plain_batch{batch}"]["tokens"])
    print_table(f"{args.preset if not args.checkpoint else args.checkpoint} on {device} "
                f"({args.dtype}), 32-token prompt, {args.new_tokens} greedy new tokens per row",
                ["side", "batch", "new tokens/s", "first call s (compile)"], table)
    batch1 = results.get("static_batch1", {}).get("tokens_per_s")
    if batch1 is not None:
        print(f"\nbatch 1, static: {batch1} tokens/s (goal >= {GOAL:.0f}); same tokens: {same}")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    write_json(Path(args.out), {"benchmark": "generation_gpu", "gpu": gpu,
                                "machine": machine_info(["torch"]), "inputs": vars(args),
                                "params": model.num_params(), "results": results, "goal": GOAL,
                                "meets_goal": batch1 is not None and batch1 >= GOAL,
                                "identical_tokens": same})
    return 0 if same or args.dtype != "float32" else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Generation on the CPU: the KV cache, batched answering, and sampling that does not loop.

Three measurements in one run (timed sides interleaved and repeated, medians reported):

- cache: one 32-token prompt, 256 new greedy tokens from `Engine.generate` against a loop of
  full forwards without a cache (what every token cost before the cache: O(T^2) work), on a
  model of `--preset` with random weights (speed does not depend on them). Goal >= 5x; both
  sides must produce the same tokens. With the "small" preset (width 256) the 50257 x 256
  output projection dominates a cached step, so the cache gains less than on GPT-2 124M.
- batch: the first 20 test-split instructions of the demo's instruction data answered
  greedily (64 new tokens at most, the demo's test_max_new_tokens) by one `Engine.generate`
  call against 20 calls, one at a time. Goal >= 3x; both sides must give the same answers.
- distinct: distinct-2 (distinct word bigrams / all word bigrams, over all the answers) and
  ROUGE-L F1 against the references, of those 20 answers under each decoding: the old one
  (greedy, no penalty) and the new defaults. The model: `--checkpoint` (e.g. runs/demo after
  `make demo`) or, without one, a 2-layer, 128-wide GPT trained here from random weights on
  the instruction data's train split for `--train-seconds` (a quick stand-in for the demo's
  under-trained fine-tuned model, which loops the same way; a shared 2-core machine cannot
  afford more).

Run: .venv/bin/python bench/generation.py [--checkpoint runs/demo] -> bench/results/generation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from common import DATA, RESULTS, VOCAB_DIR, machine_info, median, print_table, rotated, write_json

CACHE_GOAL = 5.0
BATCH_GOAL = 3.0
INSTRUCTIONS = DATA / "instruct" / "rasbt-instruction-data.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="cache: model.gpt preset (small)")
    parser.add_argument("--new-tokens", type=int, default=256, help="cache: new tokens (256)")
    parser.add_argument("--questions", type=int, default=20, help="batch, distinct: (20)")
    parser.add_argument("--answer-tokens", type=int, default=64, help="batch, distinct: (64)")
    parser.add_argument("--checkpoint", help="distinct, batch: a fine-tuned model (CHECKPOINT)")
    parser.add_argument("--train-seconds", type=float, default=240, help="without --checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1: a shared 2-core machine")
    parser.add_argument("--parts", default="cache,batch,distinct")
    parser.add_argument("--out", default=str(RESULTS / "generation.json"))
    return parser.parse_args(argv)


def no_cache_greedy(model, prompt: list[int], n: int, eot: int) -> list[int]:  # noqa: ANN001
    """Greedy tokens from a full forward over the whole sequence per token (no cache)."""
    import torch

    from pipeline.encoding import VOCAB_SIZE

    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]), last_only=True)
            token = int(logits[0, -1, :VOCAB_SIZE].argmax())
            if token == eot:
                break
            seq.append(token)
    return seq[len(prompt) :]


def timed(fn) -> tuple[float, object]:  # noqa: ANN001
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def bench_cache(args: argparse.Namespace, enc) -> dict:  # noqa: ANN001
    import torch

    from model.generate import Engine, Request, SamplingParams
    from model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig.from_preset(args.preset, block_size=512)
    model = GPT(config).eval()
    prompt = torch.randint(0, 50257, (32,)).tolist()
    engine = Engine(model, enc, "cpu")
    greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, frequency_penalty=0.0)
    sides = {
        "kv_cache": lambda: engine.generate([Request(prompt, greedy)])[0].tokens,
        "no_cache": lambda: no_cache_greedy(model, prompt, args.new_tokens, enc.eot_token),
    }
    sides["kv_cache"]()  # warm-up
    runs: dict[str, list[float]] = {s: [] for s in sides}
    outputs = {}
    for rep in range(args.repeats):
        for side in rotated(list(sides), rep):
            seconds, outputs[side] = timed(sides[side])
            runs[side].append(round(seconds, 4))
            print(f"cache rep {rep} {side}: {seconds:.2f} s", flush=True)
    tokens = len(outputs["kv_cache"])
    summary = {s: {"seconds": median(runs[s]), "tokens_per_s": round(tokens / median(runs[s]), 2)}
               for s in sides}
    speedup = summary["no_cache"]["seconds"] / summary["kv_cache"]["seconds"]
    print_table(
        f"KV cache: {args.preset} ({model.num_params() / 1e6:.1f}M params), 32-token prompt, "
        f"{tokens} new tokens, {args.threads} thread(s)",
        ["side", "seconds", "tokens/s"],
        [[s, summary[s]["seconds"], summary[s]["tokens_per_s"]] for s in sides],
    )
    print(f"KV cache speed-up: {speedup:.1f}x (goal >= {CACHE_GOAL}x)\n")
    return {"preset": args.preset, "params": model.num_params(), "prompt_tokens": 32,
            "new_tokens": tokens, "runs": runs, "median": summary, "speedup": round(speedup, 2),
            "goal": CACHE_GOAL, "meets_goal": speedup >= CACHE_GOAL,
            "identical_tokens": outputs["kv_cache"] == outputs["no_cache"]}


def instruction_data(enc):  # noqa: ANN001, ANN201
    """The demo's instruction data split as fine-tuning splits it (records and examples)."""
    from model.finetune import load_instruction_data
    from model.finetune_config import FinetuneConfig

    fields = FinetuneConfig.model_fields
    data = load_instruction_data([str(INSTRUCTIONS)], enc, 10**6, fields["split_seed"].default,
                                 fields["val_fraction"].default, fields["test_fraction"].default)
    return data


def quick_model(args: argparse.Namespace, data, enc):  # noqa: ANN001, ANN201
    """A small GPT trained on the train split (prompt tokens masked) for --train-seconds."""
    import torch

    from model.finetune import InstructionLoader
    from model.gpt import GPT, GPTConfig

    torch.manual_seed(1337)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=128, block_size=256)
    model = GPT(config)
    examples = [e for e in data.examples["train"] if len(e) <= 256]
    loader = InstructionLoader(examples, batch_size=8, seed=0, mask_prompt=True)
    opt = model.configure_optimizer(0.1, 2e-3, (0.9, 0.95), "cpu")
    model.train()
    t0 = time.perf_counter()
    step = 0
    while time.perf_counter() - t0 < args.train_seconds:
        batch = loader.next_batch()
        _, loss = model(batch.x, batch.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0:
            print(f"train step {step}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return model.eval(), {"trained_here": True, "config": dataclasses.asdict(config),
                          "steps": step, "batch_size": 8, "lr": 2e-3,
                          "final_loss": round(loss.item(), 4),
                          "seconds": round(time.perf_counter() - t0, 1)}


def distinct_2(answers: list[str]) -> float:
    """Distinct word bigrams over all bigrams of the answers (Li et al. 2016): 1 = no repeats."""
    bigrams = [tuple(w[i : i + 2]) for a in answers for w in [a.lower().split()]
               for i in range(len(w) - 1)]
    return round(len(set(bigrams)) / len(bigrams), 4) if bigrams else 0.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from model.finetune import rouge_l
    from model.generate import Engine, Request, SamplingParams
    from model.inference import load_model
    from pipeline.encoding import get_encoding

    torch.set_num_threads(args.threads)
    enc = get_encoding(str(VOCAB_DIR))
    parts = set(args.parts.split(","))
    result: dict = {"benchmark": "generation", "machine": machine_info(["torch"]),
                    "inputs": vars(args)}
    if "cache" in parts:
        result["cache"] = bench_cache(args, enc)
    if parts & {"batch", "distinct"}:
        data = instruction_data(enc)
        records = data.records["test"][: args.questions]
        prompts = [e.prompt for e in data.examples["test"][: args.questions]]
        if args.checkpoint:
            model, state = load_model(args.checkpoint)
            result["model"] = {"checkpoint": state["path"], "params": model.num_params()}
        else:
            model, result["model"] = quick_model(args, data, enc)
        block = model.config.block_size
        prompts = [p[-(block - args.answer_tokens) :] for p in prompts]  # leave room to answer
        engine = Engine(model, enc, "cpu")
    if "batch" in parts:
        greedy = SamplingParams(max_tokens=args.answer_tokens, temperature=0.0)
        sides = {
            "batched": lambda: [c.tokens for c in
                                engine.generate([Request(p, greedy) for p in prompts])],
            "one_at_a_time": lambda: [engine.generate([Request(p, greedy)])[0].tokens
                                      for p in prompts],
        }
        runs: dict[str, list[float]] = {s: [] for s in sides}
        outputs = {}
        for rep in range(args.repeats):
            for side in rotated(list(sides), rep):
                seconds, outputs[side] = timed(sides[side])
                runs[side].append(round(seconds, 4))
                print(f"batch rep {rep} {side}: {seconds:.2f} s", flush=True)
        tokens = sum(len(t) for t in outputs["batched"])
        summary = {s: {"seconds": median(runs[s]),
                       "tokens_per_s": round(tokens / median(runs[s]), 2)} for s in sides}
        speedup = summary["one_at_a_time"]["seconds"] / summary["batched"]["seconds"]
        print_table(f"{len(prompts)} test instructions, greedy, <= {args.answer_tokens} tokens "
                    f"each ({tokens} in all), {args.threads} thread(s)",
                    ["side", "seconds", "tokens/s"],
                    [[s, summary[s]["seconds"], summary[s]["tokens_per_s"]] for s in sides])
        print(f"batched speed-up: {speedup:.1f}x (goal >= {BATCH_GOAL}x)\n")
        result["batch"] = {"questions": len(prompts), "new_tokens": tokens, "runs": runs,
                           "median": summary, "speedup": round(speedup, 2), "goal": BATCH_GOAL,
                           "meets_goal": speedup >= BATCH_GOAL,
                           "identical_answers": outputs["batched"] == outputs["one_at_a_time"]}
    if "distinct" in parts:
        default = SamplingParams(max_tokens=args.answer_tokens)
        decodings = {
            "old: greedy, no penalty": SamplingParams(
                max_tokens=args.answer_tokens, temperature=0.0, frequency_penalty=0.0),
            "new test answers: greedy + default penalty": dataclasses.replace(
                default, temperature=0.0),
            "old chat: T 0.7, top-k 50, top-p 0.95, no penalty": SamplingParams(
                max_tokens=args.answer_tokens, temperature=0.7, top_k=50, top_p=0.95,
                frequency_penalty=0.0),
            "new chat defaults (SamplingParams())": default,
        }
        rows, table = {}, []
        for name, params in decodings.items():
            requests = [Request(p, dataclasses.replace(params, seed=i if params.temperature
                                                       else None))
                        for i, p in enumerate(prompts)]
            answers = [c.text.strip() for c in engine.generate(requests)]
            rouge = sum(rouge_l(a, r["output"]) for a, r in zip(answers, records, strict=True))
            rows[name] = {"params": dataclasses.asdict(params), "distinct_2": distinct_2(answers),
                          "rouge_l_f1": round(100 * rouge / len(answers), 2),
                          "answers": answers}
            table.append([name, rows[name]["distinct_2"], rows[name]["rouge_l_f1"]])
        print_table(f"{len(prompts)} test-split answers (model: "
                    f"{result['model'].get('checkpoint', 'trained here')})",
                    ["decoding", "distinct-2", "ROUGE-L F1"], table)
        result["distinct"] = rows
    write_json(Path(args.out), result)
    ok = [result.get("cache", {}).get("identical_tokens", True),
          result.get("batch", {}).get("identical_answers", True)]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())

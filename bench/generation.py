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

from common import (
    DATA,
    RESULTS,
    VOCAB_DIR,
    machine_info,
    measure,
    median,
    print_table,
    rotated,
    write_json,
)

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
    parser.add_argument("--retrain", action="store_true", help="train the stand-in model anew")
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


def compare(name: str, sides: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Each side run `repeats` times, interleaved: every timing, the medians, the outputs.

    Wall and CPU seconds are both kept; on a loaded machine the CPU seconds are the steadier
    figure (a one-thread side's CPU time is not inflated by waiting for a core)."""
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    outputs = {}
    for rep in range(repeats):
        for side in rotated(list(sides), rep):
            timing, outputs[side] = measure(sides[side])
            runs[side].append(dataclasses.asdict(timing))
            print(f"{name} rep {rep} {side}: {timing.wall_s:.2f} s wall, {timing.cpu_s:.2f} s CPU",
                  flush=True)
    medians = {s: {k: round(median(r[k] for r in runs[s]), 4) for k in ("wall_s", "cpu_s")}
               for s in sides}
    return runs, medians, outputs


def report(title: str, medians: dict, tokens: int, fast: str, slow: str, goal: float) -> dict:
    """Print the table and the speed-up of `fast` over `slow`, by wall and by CPU seconds."""
    speedup = {k: round(medians[slow][k] / medians[fast][k], 2) for k in ("wall_s", "cpu_s")}
    print_table(title, ["side", "wall s", "CPU s", "tokens/s (wall)"],
                [[s, m["wall_s"], m["cpu_s"], round(tokens / m["wall_s"], 2)]
                 for s, m in medians.items()])
    print(f"speed-up: {speedup['wall_s']}x wall, {speedup['cpu_s']}x CPU (goal >= {goal}x)\n")
    return {"median": medians, "speedup_wall": speedup["wall_s"], "speedup_cpu": speedup["cpu_s"],
            "goal": goal, "meets_goal_cpu": speedup["cpu_s"] >= goal,
            "meets_goal_wall": speedup["wall_s"] >= goal}


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
    runs, medians, outputs = compare("cache", sides, args.repeats)
    tokens = len(outputs["kv_cache"])
    title = (f"KV cache: {args.preset} ({model.num_params() / 1e6:.1f}M params), 32-token prompt, "
             f"{tokens} new tokens, {args.threads} thread(s)")
    return {"preset": args.preset, "params": model.num_params(), "prompt_tokens": 32,
            "new_tokens": tokens, "runs": runs,
            **report(title, medians, tokens, "kv_cache", "no_cache", CACHE_GOAL),
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


def stand_in_model(args: argparse.Namespace, data, enc):  # noqa: ANN001, ANN201
    """quick_model's, kept under runs/bench-generation/ and reused (--retrain trains anew)."""
    import json

    import torch

    from model.gpt import GPT, GPTConfig

    folder = Path(__file__).resolve().parents[1] / "runs" / "bench-generation"
    weights, info_path = folder / "model.pt", folder / "model.json"
    if weights.is_file() and info_path.is_file() and not args.retrain:
        info = json.loads(info_path.read_text())
        model = GPT(GPTConfig(**info["config"]))
        model.load_state_dict(torch.load(weights, weights_only=True))
        return model.eval(), {**info, "reused": str(weights)}
    model, info = quick_model(args, data, enc)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    info_path.write_text(json.dumps(info))
    return model, info


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
            model, result["model"] = stand_in_model(args, data, enc)
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
        runs, medians, outputs = compare("batch", sides, args.repeats)
        tokens = sum(len(t) for t in outputs["batched"])
        title = (f"{len(prompts)} test instructions, greedy, <= {args.answer_tokens} tokens each "
                 f"({tokens} in all), {args.threads} thread(s)")
        result["batch"] = {"questions": len(prompts), "new_tokens": tokens, "runs": runs,
                           **report(title, medians, tokens, "batched", "one_at_a_time",
                                    BATCH_GOAL),
                           "identical_answers": outputs["batched"] == outputs["one_at_a_time"]}
    if "distinct" in parts:
        n = args.answer_tokens
        decodings = {
            "old test answers: greedy, no penalty": SamplingParams(
                max_tokens=n, temperature=0.0, frequency_penalty=0.0),
            "old chat: T 0.7, top-k 50, top-p 0.95, no penalty": SamplingParams(
                max_tokens=n, temperature=0.7, top_k=50, top_p=0.95, frequency_penalty=0.0),
            **{f"greedy, frequency penalty {f}": SamplingParams(
                max_tokens=n, temperature=0.0, frequency_penalty=f) for f in (0.3, 0.5, 1.0)},
            **{f"T 0.7, top-p 0.9, frequency penalty {f}": SamplingParams(
                max_tokens=n, temperature=0.7, top_p=0.9, frequency_penalty=f)
               for f in (0.0, 0.3, 0.5, 1.0)},
            "new test answers (greedy, default penalty)": SamplingParams(
                max_tokens=n, temperature=0.0),
            "new defaults (SamplingParams())": SamplingParams(max_tokens=n),
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

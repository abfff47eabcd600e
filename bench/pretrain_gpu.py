"""GPT-2 124M pretraining on one GPU: nanoGPT's train.py, forge's gpt2 recipe and its modern
recipe on the same tokens: tokens/s, MFU, and the training time each needs to reach one val loss.

    nanogpt  nanoGPT's train.py at 124M: GPT-2's architecture without biases, vocabulary 50304,
             AdamW (0.9, 0.95) fused on CUDA, weight decay 0.1 on 2-D weights, lr 6e-4 with
             linear warmup and cosine decay to 6e-5 at the last step, clip 1.0, bf16 autocast,
             torch.compile, random offsets (its get_batch, the next batch fetched during the
             forward); the loop over forge's GPT module, which is nanoGPT's model.py.
    gpt2     forge's own runtime (model/train.Pretraining) running configs/gpt2-124m.yaml's
             pretrain: section
    modern   the same with configs/modern-124m.yaml's (Muon, rotary, QK-norm, untied head, ...)

Every side takes the same total batch (--total-batch tokens a step, micro-batches of
--micro-batch rows) for the same steps: the token budget (--tokens, default the train split's
one epoch) over the total batch, so no side sees a token twice. The configs keep their recipe;
the bench sets only the dataset, steps, batch, device, dtype, compile and seed, turns their
evaluations, checkpoints and samples off, and scales the warmup to the short run: each recipe
keeps its config's fraction of the steps (gpt2-124m: 715 of 19,073, which nanogpt takes too;
modern: none, and its cooldown is a fraction already).

Each side first runs --compile-steps steps, which compile and warm up, and is then put back as
it was (weights, optimizer, data position): those seconds are reported apart, and the training
time is the sum of the steps after that, the device synchronized after each. At step 0, every
--eval-every steps and at the end, the eager model is evaluated (bf16 autocast on CUDA) on the
same fixed windows of the val split for every side, outside the training time. The target
(--target-loss; default the first side's final val loss, nanogpt's) gives each side's training
time to reach it, interpolated linearly between the evaluations around it. At the end of each
forge side its own trainer.evaluate() (the config's eval_batches) is timed once beside one
training step: after compiled training it must cost about a step (it once recompiled: 25 s).

Goal (issue 12): MFU at least 50%; modern at least 2x faster to the target than gpt2 and
nanogpt. About 6 minutes on one H100 (3 x (compile ~1 min + ~13M tokens at ~0.5M tokens/s));
bench/device_pretrain_gpu.sh runs it there. A CPU check (about a minute):

    python bench/pretrain_gpu.py --device cpu --dtype float32 --no-compile --preset tiny \
        --tokens 20000 --total-batch 1024 --micro-batch 8 --compile-steps 1 --eval-batches 2
    python bench/pretrain_gpu.py --dataset runs/demo/tokenize/dataset.zarr     # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch._dynamo
from common import REPO, RESULTS, machine_info, print_table, write_json
from pretrain_vs_nanogpt import (
    ForgeSide,
    NanoGPTSide,
    build_books_dataset,
    fixed_windows,
    nanogpt_get_batch,
    split_tokens,
)

from configs.run import load_training_section
from model.config import PretrainConfig
from model.data import ShardLoader
from model.evaluate import val_loss
from model.gpt import GPT, GPTConfig
from model.runtime import Compute, compute_init, peak_flops

CONFIGS = {"gpt2": REPO / "configs" / "gpt2-124m.yaml",
           "modern": REPO / "configs" / "modern-124m.yaml"}
SIDES = ["nanogpt", *CONFIGS]
GOAL_MFU, GOAL_SPEEDUP = 0.5, 2.0


def snapshot(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """The weights and optimizer state to put back after the compile warm-up."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights, copy.deepcopy(optimizer.state_dict())


def restore(model: torch.nn.Module, optimizer, saved: tuple[dict, dict]) -> None:
    model.load_state_dict(saved[0])  # in place: the compiled graph keeps its parameters
    optimizer.load_state_dict(copy.deepcopy(saved[1]))


class NanoGPT(NanoGPTSide):
    """nanoGPT's train.py loop on a device, with gradient accumulation (get_lr and done are
    NanoGPTSide's, over the attributes set here)."""

    lr, min_lr = 6e-4, 6e-5

    def __init__(self, train: np.ndarray, args: argparse.Namespace, max_steps: int,
                 warmup: int, compute: Compute) -> None:
        torch.manual_seed(args.seed)
        config = GPTConfig.from_preset(args.preset, vocab_size=50304, bias=False, dropout=0.0)
        self.device, self.autocast = compute.device, compute.autocast
        self.model = GPT(config).to(self.device)
        # nanoGPT fuses AdamW on CUDA only
        self.optimizer = self.model.configure_optimizer(
            0.1, self.lr, (0.9, 0.95), self.device.type, fused=self.device.type == "cuda")
        self.compiled = torch.compile(self.model) if args.compile else self.model
        self.train, self.seed = train, args.seed
        self.batch, self.block = args.micro_batch, config.block_size
        self.accum = args.total_batch // (self.batch * self.block)
        self.tokens_per_step = args.total_batch
        self.max_steps, self.warmup = max_steps, warmup
        self.start = snapshot(self.model, self.optimizer)
        self.reset()

    def reset(self) -> None:
        restore(self.model, self.optimizer, self.start)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.step_count = 0
        self.x, self.y = self.get_batch()

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = nanogpt_get_batch(self.train, self.batch, self.block, self.generator)
        if self.device.type == "cuda":  # pinned, copied while the GPU computes
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x, y

    def step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(self.step_count)
        for _ in range(self.accum):
            with self.autocast:
                _, loss = self.compiled(self.x, self.y)
                loss = loss / self.accum
            self.x, self.y = self.get_batch()  # the next batch, during the forward
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return loss.item() * self.accum


class Forge(ForgeSide):
    """A forge recipe stepped by its own runtime, put back to step 0 after the warm-up."""

    def __init__(self, name: str, cfg: PretrainConfig, workdir: Path) -> None:
        super().__init__(name, cfg, workdir)
        self.start = snapshot(self.model, self.trainer.optimizer)
        self.loader_start = self.trainer.train_loader.state_dict()

    def reset(self) -> None:
        restore(self.model, self.trainer.optimizer, self.start)
        self.trainer.train_loader.load_state_dict(self.loader_start)
        self.trainer.step = 0


def forge_config(name: str, args: argparse.Namespace, dataset: Path, steps: int) -> PretrainConfig:
    """The config's pretrain: section with the bench's data, batch, steps and warmup (validated)."""
    _, cfg = load_training_section(CONFIGS[name], "pretrain")
    return PretrainConfig(**cfg.model_dump(exclude_unset=True) | {
        "dataset": str(dataset), "preset": args.preset, "max_steps": steps,
        "warmup_steps": scaled_warmup(cfg, steps), "total_batch_tokens": args.total_batch,
        "micro_batch_size": args.micro_batch, "device": args.device, "dtype": args.dtype,
        "compile": args.compile, "seed": args.seed, "eval_every": 0, "checkpoint_every": 0,
        "sample_every": 0, "eval_batches": args.eval_batches or cfg.eval_batches,
    })


def scaled_warmup(cfg: PretrainConfig, steps: int) -> int:
    """The config's warmup as the same fraction of a run of `steps` steps."""
    return round(steps * cfg.warmup_steps / cfg.max_steps)


def time_to_target(curve: list[dict], target: float) -> float | None:
    """Training seconds at which the val loss first reaches target, linear between evaluations;
    None if it never does."""
    if curve[0]["val_loss"] <= target:
        return 0.0
    for before, after in zip(curve, curve[1:], strict=False):
        if after["val_loss"] <= target:
            share = (before["val_loss"] - target) / (before["val_loss"] - after["val_loss"])
            return before["train_s"] + share * (after["train_s"] - before["train_s"])
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_side(side, windows: list, args: argparse.Namespace, compute: Compute) -> dict:
    """Warm up and put back, then train to max_steps timing each step, evaluating on schedule."""
    device = compute.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(min(args.compile_steps, side.max_steps)):
        side.step()
    synchronize(device)
    compile_s = time.perf_counter() - t0
    side.reset()

    curve, step_s, eval_s = [], [], 0.0

    def evaluate() -> None:
        nonlocal eval_s
        t = time.perf_counter()
        loss = val_loss(side.model, windows, device, compute.autocast)
        eval_s += time.perf_counter() - t
        curve.append({"step": len(step_s), "tokens": len(step_s) * side.tokens_per_step,
                      "train_s": round(sum(step_s), 3), "val_loss": round(loss, 4)})

    evaluate()
    while not side.done:
        t = time.perf_counter()
        loss = side.step()
        synchronize(device)
        step_s.append(time.perf_counter() - t)
        n = len(step_s)
        if n % args.eval_every == 0 or side.done:
            evaluate()
        if n % args.log_every == 0 or side.done:
            val = curve[-1]["val_loss"] if curve[-1]["step"] == n else None
            print(f"{side.name:8s} step {n:4d}/{side.max_steps} loss {loss:.3f} "
                  f"{step_s[-1] * 1000:7.1f} ms {n * side.tokens_per_step / sum(step_s):9.0f} tok/s"
                  + (f" val {val:.3f}" if val is not None else ""), flush=True)
    train_s = sum(step_s)
    tokens = len(step_s) * side.tokens_per_step
    peak = peak_flops(device)
    figures = {
        "params": side.model.num_params(), "steps": len(step_s), "tokens": tokens,
        "compile_steps": min(args.compile_steps, side.max_steps),
        "compile_s": round(compile_s, 2), "train_s": round(train_s, 2),
        "tokens_per_s": round(tokens / train_s, 1),
        "mfu": round(side.model.mfu(tokens / train_s, peak), 4) if peak else None,
        "step_s_median": round(statistics.median(step_s), 4), "eval_s": round(eval_s, 2),
        "val_loss": curve[-1]["val_loss"], "curve": curve,
        "step_s": [round(s, 4) for s in step_s],
        "peak_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                            if device.type == "cuda" else None),
    }
    if isinstance(side, Forge):
        figures["forge_evaluate"] = time_forge_evaluate(side, figures["step_s_median"], device)
    return figures


def time_forge_evaluate(side: Forge, step_s: float, device: torch.device) -> dict:
    """forge's own end-of-run evaluation (the runtime's, cfg.eval_batches batches), timed once."""
    from torch._dynamo.utils import counters  # graphs compiled so far, to catch a recompile

    graphs = counters["stats"]["unique_graphs"]
    synchronize(device)
    t0 = time.perf_counter()
    loss = side.trainer.evaluate()
    synchronize(device)
    seconds = time.perf_counter() - t0
    trainer = side.trainer
    return {"seconds": round(seconds, 3), "val_loss": round(loss, 4),
            "batches": trainer.eval_batches,
            "tokens": trainer.eval_batches * trainer.cfg.micro_batch_size * trainer.block,
            "step_s": step_s, "vs_step": round(seconds / step_s, 2),
            "graphs_compiled": counters["stats"]["unique_graphs"] - graphs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", help="a forge token dataset (dataset.zarr); default the "
                        "books of bench/pretrain_vs_nanogpt.py, built under runs/bench-books")
    parser.add_argument("--sides", default=",".join(SIDES),
                        help="comma-separated; the first one's final val loss is the default "
                        f"target (default {','.join(SIDES)})")
    parser.add_argument("--tokens", type=int, help="token budget of each side (default: one "
                        "epoch of the train split; never more)")
    parser.add_argument("--total-batch", type=int, default=65536, help="tokens per step")
    parser.add_argument("--micro-batch", type=int, default=16, help="rows per forward")
    parser.add_argument("--preset", default="gpt2", help="model shape (tiny for a CPU check)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-windows", type=int, default=128,
                        help="fixed val windows of each evaluation")
    parser.add_argument("--eval-batches", type=int,
                        help="batches of forge's own evaluate() (default: the config's)")
    parser.add_argument("--target-loss", type=float,
                        help="val loss to reach (default: the first side's final val loss)")
    parser.add_argument("--compile-steps", type=int, default=5,
                        help="warm-up steps run and undone before the timing")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--out", default=str(RESULTS / "pretrain_gpu.json"))
    args = parser.parse_args(argv)
    args.sides = args.sides.split(",")
    if unknown := sorted(set(args.sides) - set(SIDES)):
        parser.error(f"--sides: unknown {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA GPU is visible; on a CPU add --device cpu "
                     "--dtype float32 --no-compile --preset tiny")
    block = GPTConfig.from_preset(args.preset).block_size
    if args.total_batch % (args.micro_batch * block):
        parser.error(f"--total-batch {args.total_batch} must be a multiple of --micro-batch "
                     f"{args.micro_batch} x the {args.preset} preset's block_size {block}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dataset = Path(args.dataset) if args.dataset else build_books_dataset(
        REPO / "runs" / "bench-books" / "books")[0]
    compute = compute_init(args.device, args.dtype, None, "bench")
    block = GPTConfig.from_preset(args.preset).block_size
    train, val = split_tokens(dataset, "train"), split_tokens(dataset, "val")
    # the steps of one epoch, as forge's loader cuts the train split into windows
    windows_per_epoch = ShardLoader(dataset, "train", 1, block).num_windows
    epoch_steps = windows_per_epoch // (args.total_batch // block)
    steps = min(epoch_steps, (args.tokens or train.size) // args.total_batch)
    if steps < 1:
        raise SystemExit(f"--tokens {args.tokens} or the train split of {dataset} "
                         f"({train.size:,} tokens) is less than one step of {args.total_batch:,}")
    if args.tokens and args.tokens // args.total_batch > epoch_steps:
        print(f"--tokens {args.tokens:,} is more than one epoch: capped at {steps} steps")
    gpu = torch.cuda.get_device_name(compute.device) if compute.device.type == "cuda" else None
    print(f"{dataset}: {train.size:,} train and {val.size:,} val tokens; {steps} steps of "
          f"{args.total_batch:,} tokens per side on {gpu or 'the CPU'} ({args.dtype}, "
          f"compile {args.compile})", flush=True)
    if val.size <= block:
        raise SystemExit(f"the val split of {dataset} has {val.size} tokens, fewer than one "
                         f"window of {block + 1}; tokenize with a val_fraction above 0")
    evals = fixed_windows(val, args.eval_windows, block, args.micro_batch, compute.device)
    gpt2_warmup = scaled_warmup(load_training_section(CONFIGS["gpt2"], "pretrain")[1], steps)

    figures, recipes = {}, {}
    with tempfile.TemporaryDirectory(prefix="forge-pretrain-gpu-") as tmp:
        for name in args.sides:
            if name == "nanogpt":
                side = NanoGPT(train, args, steps, gpt2_warmup, compute)
                recipes[name] = {"lr": side.lr, "min_lr": side.min_lr, "warmup": side.warmup,
                                 "max_steps": steps, "micro_batch": side.batch,
                                 "block": side.block, "accum": side.accum}
            else:
                cfg = forge_config(name, args, dataset, steps)
                recipes[name] = cfg.model_dump(mode="json", exclude_unset=True)
                side = Forge(name, cfg, Path(tmp) / name)
            figures[name] = run_side(side, evals, args, compute)
            del side  # free the GPU for the next side, and its compiled graphs
            gc.collect()
            torch._dynamo.reset()
            if compute.device.type == "cuda":
                torch.cuda.empty_cache()

    target = args.target_loss
    if target is None:
        target = figures[args.sides[0]]["val_loss"]
    for f in figures.values():
        f["time_to_target_s"] = time_to_target(f["curve"], target)
    speedups = {}
    modern = figures.get("modern", {}).get("time_to_target_s")
    for other in ("gpt2", "nanogpt"):
        theirs = figures.get(other, {}).get("time_to_target_s")
        speedups[f"modern_vs_{other}"] = round(theirs / modern, 2) if modern and theirs else None
    report(figures, target, speedups, gpu, args, steps)
    write_json(Path(args.out), {
        "benchmark": "pretrain_gpu", "gpu": gpu, "machine": machine_info(["torch", "numpy"]),
        "inputs": {**vars(args), "dataset": str(dataset), "train_tokens": int(train.size),
                   "val_tokens": int(val.size), "steps": steps, "recipes": recipes},
        "target_loss": target, "sides": figures, "speedups": speedups,
        "goals": {"mfu": GOAL_MFU, "speedup": GOAL_SPEEDUP,
                  "mfu_met": {n: f["mfu"] is not None and f["mfu"] >= GOAL_MFU
                              for n, f in figures.items()},
                  "speedup_met": all(s is not None and s >= GOAL_SPEEDUP
                                     for s in speedups.values())},
    })


def report(figures: dict, target: float, speedups: dict, gpu: str | None,
           args: argparse.Namespace, steps: int) -> None:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [[name, f"{f['params'] / 1e6:.1f}M", f["steps"], f"{f['tokens']:,}",
             fmt(f["compile_s"], ".1f"), fmt(f["train_s"], ".1f"), f"{f['tokens_per_s']:,.0f}",
             fmt(f["mfu"], ".1%"), f"{f['val_loss']:.3f}", fmt(f["time_to_target_s"], ".1f")]
            for name, f in figures.items()]
    print_table(f"{args.preset} on {gpu or 'the CPU'}, {steps} steps of {args.total_batch:,} "
                f"tokens, val loss on {args.eval_windows} fixed windows; target {target:.3f}",
                ["side", "params", "steps", "tokens", "compile s", "train s", "tokens/s", "MFU",
                 "val loss", "s to target"], rows)
    curve_rows = [[point["step"], *(f"{f['curve'][i]['val_loss']:.3f}" for f in figures.values())]
                  for i, point in enumerate(next(iter(figures.values()))["curve"])]
    print_table("val loss by step", ["step", *figures], curve_rows)
    evals = [[name, e["batches"], f"{e['tokens']:,}", f"{e['seconds']:.3f}",
              f"{e['step_s']:.3f}", f"{e['vs_step']:.2f}", e["graphs_compiled"]]
             for name, f in figures.items() if (e := f.get("forge_evaluate"))]
    if evals:
        print_table("forge's end-of-run trainer.evaluate() after training",
                    ["side", "batches", "tokens", "evaluate s", "one step s", "x step",
                     "graphs compiled"], evals)
    ups = ", ".join(f"{k.removeprefix('modern_').replace('_', ' ')} {fmt(v, '.2f')}x"
                    for k, v in speedups.items())
    mfus = ", ".join(f"{name} {fmt(f['mfu'], '.1%')}" for name, f in figures.items())
    print(f"\nmodern's speed-up to val loss {target:.3f}: {ups} (goal >= {GOAL_SPEEDUP:.0f}x); "
          f"MFU {mfus} (goal >= {GOAL_MFU:.0%})")


if __name__ == "__main__":
    main()

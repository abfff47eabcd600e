"""`forge pretrain`, `forge eval` and `forge generate`: the pretraining side of the CLI."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from cli.common import add_model_options


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sub = commands.add_parser("pretrain", parents=[common],
                              help="pretrain a GPT on the token shards (rerunning resumes)")
    sub.add_argument("--config", required=True, help="YAML run config with a pretrain: section")
    sub.add_argument("--workdir", help="work folder (replaces the config's)")
    sub.add_argument("--overwrite", action="store_true",
                     help="start over, discarding this run's checkpoints, log and results")
    sub.set_defaults(handler=pretrain)

    sub = commands.add_parser("eval", parents=[common], help="evaluate a checkpoint")
    sub.add_argument("checkpoint", help="a checkpoint file or a work folder (its newest)")
    sub.add_argument("--task", choices=("val", "hellaswag", "wikitext2"), default="val")
    sub.add_argument("--limit", type=int, help="hellaswag: items; wikitext2: tokens")
    sub.add_argument("--eval-dir", default=os.environ.get("FORGE_EVAL_DIR"),
                     help="hellaswag, wikitext2: folder with hellaswag_val_full.txt.bz2 and "
                     "wikitext-2-test.txt.gz (default: $FORGE_EVAL_DIR)")
    sub.add_argument("--dataset", help="val: token dataset (default: the run's)")
    sub.add_argument("--batches", type=int, default=20, help="val: batches to average")
    add_model_options(sub)
    sub.set_defaults(handler=evaluate)

    sub = commands.add_parser("generate", parents=[common], help="continue a prompt")
    sub.add_argument("checkpoint", help="a checkpoint file or a work folder (its newest)")
    sub.add_argument("--prompt", required=True)
    sub.add_argument("--max-tokens", type=int, default=100)
    sub.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    sub.add_argument("--top-k", type=int, default=200)
    sub.add_argument("--top-p", type=float, default=1.0, help="1 disables")
    sub.add_argument("--frequency-penalty", type=float, default=0.0)
    sub.add_argument("--seed", type=int, default=1337)
    add_model_options(sub)
    sub.set_defaults(handler=generate)


def pretrain(args: argparse.Namespace) -> int:
    """Also the trainer process of the flows, one per rank under torchrun (`-m cli.main`)."""
    from cli.common import load_run_config
    from model.stopping import stop_exit_code
    from model.train import run_pretrain

    main_rank = int(os.environ.get("RANK", "0")) == 0
    if not main_rank:
        logging.getLogger().setLevel(logging.WARNING)
    cfg = load_run_config(args)
    summary = run_pretrain(cfg.pretrain, Path(cfg.workdir), overwrite=args.overwrite)
    if main_rank and not args.quiet:
        print(json.dumps(summary, indent=1))
    return stop_exit_code(summary)


def _model_and_encoding(args: argparse.Namespace):
    from model.inference import load_model, vocab_dir_for
    from pipeline.encoding import get_encoding

    model, state = load_model(args.checkpoint, device=args.device)
    return model, state, get_encoding(vocab_dir_for(state, args.vocab_dir))


def evaluate(args: argparse.Namespace) -> int:
    from model import evaluate as ev

    model, state, encoding = _model_and_encoding(args)
    if args.task != "val" and not args.eval_dir:
        raise ValueError(f"--task {args.task} needs --eval-dir (or $FORGE_EVAL_DIR): the folder "
                         "holding the evaluation files")
    eval_dir = Path(args.eval_dir or ".")
    if args.task == "hellaswag":
        result = ev.hellaswag(model, encoding, _need(eval_dir / "hellaswag_val_full.txt.bz2"),
                              args.limit, args.device)
    elif args.task == "wikitext2":
        result = ev.wikitext2(model, encoding, _need(eval_dir / "wikitext-2-test.txt.gz"),
                              args.device, args.limit)
    else:
        result = _val_loss(args, model, state)
    result["checkpoint"] = state["path"]
    print(json.dumps(result, indent=1))
    return 0


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; pass --eval-dir (or set FORGE_EVAL_DIR) to "
                                "the folder holding the evaluation files")
    return path


def _val_loss(args: argparse.Namespace, model, state: dict) -> dict:
    import torch

    from model.data import ShardLoader
    from model.evaluate import val_loss
    from pipeline.files import WorkFolder
    from pipeline.shards import TokenDataset

    dataset = args.dataset or (state.get("train_config") or {}).get("dataset")
    if dataset is None:  # the run's own
        dataset = WorkFolder.of_checkpoint(state["path"]).dataset
    loader = ShardLoader(TokenDataset(dataset), "val", batch_size=8,
                         block_size=model.config.block_size)
    batches = list(loader.first_batches(args.batches))
    return {"task": "val", "batches": len(batches),
            "loss": val_loss(model, batches, torch.device(args.device))}


def generate(args: argparse.Namespace) -> int:
    from model.generate import Engine, Request, SamplingParams, TextStream

    model, _, encoding = _model_and_encoding(args)
    prompt = encoding.encode_ordinary(args.prompt)
    if not prompt:
        raise ValueError("--prompt is empty")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p,
                            frequency_penalty=args.frequency_penalty, seed=args.seed)
    sys.stdout.write(args.prompt)
    text = TextStream(encoding)

    def write(row: int, token: int) -> bool:
        sys.stdout.write(text.push(token))
        sys.stdout.flush()
        return True

    Engine(model, encoding, args.device).generate([Request(prompt, params)], write)
    sys.stdout.write(text.close() + "\n")
    return 0

"""`forge finetune`, `chat`, `serve-chat`, `import-gpt2` and `export`: the assistant side.

Every CHECKPOINT argument is a checkpoint file or a work folder (its newest complete
checkpoint of the latest stage: fine-tuned if there is one, else pretrained); see
model/inference.py. Heavy imports stay inside the handlers so `forge --help` starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cli.common import add_model_options

CHECKPOINT_HELP = "a checkpoint file or a work folder (its newest fine-tuned, else pretrained)"


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the assistant commands to the `forge` parser."""
    sub = commands.add_parser(
        "finetune", parents=[common], help="instruction-fine-tune a checkpoint (full or LoRA)"
    )
    sub.add_argument("--config", required=True, help="YAML run config with a finetune: section")
    sub.add_argument("--workdir", help="output folder (replaces the config's workdir)")
    sub.add_argument(
        "--data",
        action="append",
        metavar="FILE",
        help="Alpaca JSON/JSONL file replacing finetune.data; repeatable",
    )
    sub.add_argument("--base", metavar="CHECKPOINT", help="start from this " + CHECKPOINT_HELP)
    sub.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the work folder's fine-tuning run and start over (rerunning resumes)",
    )
    sub.set_defaults(handler=finetune)

    sub = commands.add_parser(
        "chat", parents=[common], help="talk to a model: interactive, multi-turn, streaming"
    )
    sub.add_argument("checkpoint", metavar="CHECKPOINT", help=CHECKPOINT_HELP)
    sub.add_argument("--prompt", help="answer this once and exit")
    # sampling defaults (None here) are the Engine's, model/generate.py's SamplingParams
    sub.add_argument("--temperature", type=float, help="0: greedy (default 0.7)")
    sub.add_argument("--top-k", type=int, help="default: none; 0 disables")
    sub.add_argument("--top-p", type=float, help="default 0.9; 1 disables")
    sub.add_argument("--frequency-penalty", type=float, help="against loops (default 0.5)")
    sub.add_argument("--max-new-tokens", type=int, help="default 256")
    sub.add_argument("--seed", type=int, help="seed the sampling (default: random)")
    add_model_options(sub)
    sub.set_defaults(handler=chat)

    sub = commands.add_parser(
        "serve-chat",
        parents=[common],
        help="a web chat page and an OpenAI-compatible API over a model (requests batched)",
    )
    sub.add_argument("checkpoint", metavar="CHECKPOINT", help=CHECKPOINT_HELP)
    sub.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    sub.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free one")
    sub.add_argument(
        "--api-key",
        default=os.environ.get("FORGE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/ requests (default: $FORGE_API_KEY)",
    )
    sub.add_argument("--model-name", default="forge", help="the model id clients name")
    sub.add_argument("--max-batch", type=int, help="most requests answered together (32)")
    add_model_options(sub)
    sub.set_defaults(handler=serve_chat)

    sub = commands.add_parser(
        "import-gpt2",
        parents=[common],
        help="Hugging Face GPT-2 folder (safetensors) -> forge checkpoint",
    )
    sub.add_argument("folder", metavar="DIR", help="folder with config.json + model.safetensors")
    sub.add_argument(
        "out", metavar="OUT", help="a .pt file, or a work folder (-> OUT/pretrain/checkpoints/)"
    )
    sub.set_defaults(handler=import_gpt2)

    sub = commands.add_parser(
        "export",
        parents=[common],
        help="forge checkpoint -> a folder of safetensors (Hugging Face GPT-2, or forge's own)",
    )
    sub.add_argument("checkpoint", metavar="CHECKPOINT", help=CHECKPOINT_HELP)
    sub.add_argument("out", metavar="OUT", help="output folder")
    sub.add_argument(
        "--format",
        choices=("hf", "safetensors"),
        default="hf",
        help="hf: config.json + model.safetensors in the GPT-2 layout (gpt2 recipe); "
        "safetensors: model.safetensors + forge_config.json, forge's names (any recipe); "
        "LoRA adapters are merged in both",
    )
    sub.set_defaults(handler=export)


def finetune(args: argparse.Namespace) -> int:
    """Also the trainer process of the flows' finetune (`-m cli.main finetune`)."""
    from cli.common import load_run_config
    from configs.run import validate_training_section
    from model.finetune import run_finetune
    from model.stopping import stop_exit_code

    run = load_run_config(args)
    cfg = run.finetune
    update = {k: v for k, v in (("data", args.data), ("base", args.base)) if v}
    if update:  # validated again, errors naming the field
        cfg = validate_training_section(
            "finetune", {**cfg.model_dump(exclude_unset=True), **update}, "command line")
    summary = run_finetune(cfg, Path(run.workdir), overwrite=args.overwrite)
    if summary["stopped_by"]:
        print(f"stopped by {summary['stopped_by']} at step {summary['steps']}; "
              f"checkpoint: {summary['checkpoint']}; rerun to continue")
        return stop_exit_code(summary)
    if not args.quiet:
        test = summary["test"] or {}
        print(
            f"finetune ({summary['method']}): {summary['steps']} steps, records "
            f"{summary['records']}, dropped {summary['dropped'] or 'none'}"
        )
        before = summary["val_loss_before"]
        print(
            f"val loss {summary['val_loss']:.4f}"
            + (f" (before: {before:.4f})" if before is not None else "")
            + (
                f"; test ROUGE-L F1 {test['rouge_l_f1']:.2f}, token F1 {test['token_f1']:.2f} "
                f"over {test['records']} records -> {summary['test_responses']}"
                if test
                else ""
            )
        )
        print(f"checkpoint: {summary['checkpoint']}")
    return 0


def chat(args: argparse.Namespace) -> int:

    from model.chat import Chat, GenerationSettings, run_chat
    from model.inference import load_model, vocab_dir_for
    from pipeline.encoding import get_encoding

    model, state = load_model(args.checkpoint, device=args.device)
    enc = get_encoding(vocab_dir_for(state, args.vocab_dir))
    given = {
        "temperature": args.temperature,
        "top_k": args.top_k or None,  # 0 disables, as the default does
        "top_p": args.top_p,
        "frequency_penalty": args.frequency_penalty,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }
    settings = GenerationSettings(**{k: v for k, v in given.items() if v is not None})
    session = Chat(model, enc, settings)
    if args.prompt is None and sys.stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input()
    kind = state.get("method") or "pretrained"
    banner = (
        f"forge chat: {state['path']} ({kind}, {model.num_params() / 1e6:.1f}M parameters, "
        f"context {model.config.block_size}). /help for commands, /exit to quit."
    )
    return run_chat(session, prompt=args.prompt, banner=banner)


def serve_chat(args: argparse.Namespace) -> int:
    from model.server import serve_chat as serve

    if args.max_batch is not None and args.max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr)
    extra = {} if args.max_batch is None else {"max_batch": args.max_batch}
    serve(args.checkpoint, args.host, args.port, args.api_key, args.device, args.model_name,
          args.vocab_dir, **extra)
    return 0


def import_gpt2(args: argparse.Namespace) -> int:
    from model.hf_io import import_gpt2 as run

    path = run(args.folder, args.out)
    if not args.quiet:
        print(f"imported {args.folder} -> {path}")
    return 0


def export(args: argparse.Namespace) -> int:
    from model.hf_io import export_forge, export_hf
    from model.inference import load_model

    model, state = load_model(args.checkpoint)
    if args.format == "hf":
        out = export_hf(model, args.out, source=state["path"])
    else:
        out = export_forge(model, args.out)
    if not args.quiet:
        print(
            json.dumps(
                {
                    "checkpoint": state["path"],
                    "out": str(out),
                    "files": sorted(p.name for p in out.iterdir()),
                }
            )
        )
    return 0

"""What every command that uses a trained model shares: finding, reading and building it.

A CHECKPOINT argument is a checkpoint file, a `checkpoints/` folder, a stage folder
(`<workdir>/finetune`) or a work folder; a folder means its newest complete checkpoint, and a
work folder the one of its latest stage: fine-tuned if there is one, else pretrained.

Checkpoints are read by model/checkpoint.py: pretraining's (also what `forge import-gpt2`
writes) and fine-tuning's. A full fine-tune stores the whole model; a LoRA
fine-tune only its adapters plus the path and sha256 of the checkpoint it started from, so
load_model() rebuilds base + adapters and merges them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from model.gpt import GPT, GPTConfig
from pipeline.files import FINETUNE, PRETRAIN, WorkFolder, sha256_file

# The Alpaca prompt, as in Raschka's ch. 7 (the input section only when there is an input).
PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)

# Where a model's answer ends in a conversation: when it starts the next turn itself.
STOP_STRINGS = ("### Instruction:", "### Response:")


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt up to and including '### Response:\\n'; the answer follows it."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input:
        text += f"\n\n### Input:\n{input}"
    return text + "\n\n### Response:\n"


def format_chat(messages: list[dict[str, str]]) -> str:
    """A conversation as one Alpaca prompt, ready for the next answer (`forge chat`, the server).

    messages are OpenAI-style {"role", "content"}: an optional leading "system" message replaces
    the preamble, then "user" and "assistant" alternate, ending with "user". Each user turn is an
    instruction and each assistant turn its response, so a one-message conversation is token for
    token format_prompt(message): what fine-tuning trained on. Raises ValueError saying what is
    wrong with the list.
    """
    preamble, first = PREAMBLE, 0
    if messages and messages[0]["role"] == "system":
        preamble, messages, first = messages[0]["content"], messages[1:], 1
    if not messages:
        raise ValueError("messages must hold at least one user message")
    text = f"{preamble}\n\n"
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"messages[{i + first}] has role {role!r} where {expected!r} was expected: "
                "after an optional first system message, user and assistant turns alternate"
            )
        if role == "user":
            text += f"### Instruction:\n{content}\n\n### Response:\n"
        else:
            text += f"{content}\n\n"
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must be the user's: it is what gets answered")
    return text


# ---------------------------------------------------------------- checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file a CHECKPOINT argument means (see the module docstring)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p} does not exist; give a checkpoint file or a work folder")
    work = WorkFolder(p)
    for folder in (p, p / "checkpoints", work.checkpoints(FINETUNE), work.checkpoints(PRETRAIN)):
        latest = CheckpointManager(folder).latest()
        if latest is not None:
            return latest
    raise CheckpointError(
        f"no complete checkpoint in {p} (looked in it, checkpoints/, finetune/checkpoints/ and "
        "pretrain/checkpoints/); train one first or give a checkpoint file"
    )


def build_model(model_config: dict, **overrides: Any) -> GPT:
    """An uninitialized-weights GPT of a checkpoint's config (fields it lacks keep defaults)."""
    fields = set(GPTConfig.__dataclass_fields__)
    return GPT(GPTConfig(**{k: v for k, v in {**model_config, **overrides}.items() if k in fields}))


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    merge: bool = True,
    dropout: float | None = None,
) -> tuple[GPT, dict[str, Any]]:
    """The model of any forge checkpoint (a CHECKPOINT argument), in eval mode, and its state.

    A LoRA checkpoint is rebuilt from its base checkpoint and merged (merge=False keeps the
    LoRALinear layers). dropout replaces the saved model's. The returned state holds
    everything but the weights and the optimizer, plus `path`: the file read.
    """
    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    weights = state.pop("model")
    overrides = {} if dropout is None else {"dropout": dropout}
    if state.get("method") == "lora":
        from model.lora import apply_lora, merge_lora

        model = load_base(state["base"], **overrides)
        lora = state["lora"]
        apply_lora(model, lora["r"], lora["alpha"], 0.0, lora["target_modules"])
        model.load_state_dict(weights, strict=False)
        if merge:
            merge_lora(model)
    else:
        model = build_model(state["model_config"], **overrides)
        model.load_state_dict(weights)
    state.pop("optimizer", None)
    state["path"] = str(path)
    return model.to(device).eval(), state


def load_base(base: dict, **overrides: Any) -> GPT:
    """The (merged) model a LoRA checkpoint was trained on, refused if its bytes changed."""
    path = Path(base["path"])
    if not path.is_file():
        raise CheckpointError(
            f"the base checkpoint {path} of this LoRA fine-tune is gone; LoRA checkpoints store "
            "only adapters, so restore that file (or export a merged model while it exists)"
        )
    if sha256_file(path) != base["sha256"]:
        raise CheckpointError(
            f"the base checkpoint {path} of this LoRA fine-tune has changed since training "
            "(sha256 differs); restore the original file"
        )
    model, _ = load_model(path, dropout=overrides.get("dropout"))
    return model


def vocab_dir_for(state: dict[str, Any], explicit: str | None = None) -> str | None:
    """Where the GPT-2 vocabulary is: explicit, $FORGE_VOCAB_DIR, or the run's own config."""
    if explicit:
        return explicit
    if os.environ.get("FORGE_VOCAB_DIR"):
        return os.environ["FORGE_VOCAB_DIR"]
    recorded = (state.get("train_config") or {}).get("vocab_dir")
    return recorded if recorded and Path(recorded).is_dir() else None

"""The `finetune:` section of a run config, validated by pydantic (unknown keys rejected).

Defaults follow Raschka's ch. 7 recipe (Alpaca template, AdamW lr 5e-5, weight decay 0.1,
batch 8, 2 epochs) and the split the decontamination stage uses (seed 1337, 5% val, 10% test).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Linear layers of a GPT block: attn.c_attn (fused q, k, v), attn.c_proj, mlp.c_fc, mlp.c_proj.
# Here, not in model/lora.py, so that configs load without importing torch.
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")


class FinetuneConfigError(ValueError):
    """A fine-tuning misconfiguration, in one sentence that names the field and the fix."""


class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=16, ge=1, description="Rank of the low-rank update B A.")
    alpha: float = Field(
        default=16.0, gt=0, description="Scaling numerator: the update is multiplied by alpha / r."
    )
    dropout: float = Field(
        default=0.05, ge=0, lt=1, description="Dropout on the adapters' input (training only)."
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        min_length=1,
        description="Linear layers to adapt, by name or name suffix: c_attn (fused q, k, v), "
        "c_proj (attention and MLP outputs), c_fc (MLP input), or a full name such as "
        "transformer.h.0.attn.c_attn. lm_head is not allowed (tied to the embeddings).",
    )


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # ------------------------------------------------------------ model
    base: str | None = Field(
        default=None,
        description="Checkpoint to start from: a checkpoint file or a work folder (its newest "
        "pretraining checkpoint; e.g. one made by `forge import-gpt2`). Default: the run's "
        "workdir. Resolved once, at the start: a resumed run keeps its base.",
    )
    method: Literal["full", "lora"] = Field(
        default="full",
        description="full: train every weight; lora: train low-rank adapters only (the "
        "checkpoints then hold only the adapters).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")
    dropout: float | None = Field(
        default=None, ge=0, lt=1, description="Model dropout while fine-tuning (default: base's)."
    )

    # ------------------------------------------------------------ data
    data: list[str] = Field(
        default_factory=list,
        description="Alpaca-format JSON or JSONL(.gz) files (instruction, input, output; records "
        "with a `status` keep only 'ok'). Each file is split on its own, as decontamination does.",
    )
    split_seed: int = Field(
        default=1337, description="Seed of the train/val/test split (decontamination's seed)."
    )
    val_fraction: float = Field(
        default=0.05, ge=0, lt=1, description="Share of each file for validation."
    )
    test_fraction: float = Field(
        default=0.10, ge=0, lt=1, description="Share of each file held out for the test."
    )
    mask_prompt: bool = Field(
        default=True,
        description="Leave the prompt tokens out of the loss (-100), training on responses only.",
    )
    max_length: int | None = Field(
        default=None,
        ge=8,
        description="Longest record in tokens (prompt + response + end-of-text); longer ones are "
        "dropped as too_long. Default and maximum: the model's context + 1.",
    )
    vocab_dir: str | None = Field(
        default=None,
        description="GPT-2 vocabulary folder, for offline use (default: data.tokenize.vocab_dir "
        "of the same config, or $FORGE_VOCAB_DIR).",
    )

    # ------------------------------------------------------------ schedule
    seed: int = Field(default=1337, description="Seeds the record order and dropout.")
    micro_batch_size: int = Field(default=8, ge=1, description="Records per forward pass.")
    grad_accum_steps: int = Field(
        default=1, ge=1, description="Micro-batches per optimizer step (batch = product)."
    )
    epochs: float = Field(default=2.0, gt=0, description="Passes over the train split.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Optimizer steps; replaces `epochs` when set."
    )
    lr: float = Field(
        default=5e-5, gt=0, le=1, description="Peak learning rate (LoRA usually wants ~1e-4-5e-4)."
    )
    min_lr: float = Field(default=5e-6, ge=0, description="Floor of the cosine decay.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW decay of matrices.")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(
        default=1.0, ge=0, description="Clip the global gradient norm to this; 0 disables."
    )

    # ------------------------------------------------------------ hardware
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: CUDA when available, else the CPU."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="Autocast dtype; auto: bfloat16 on CUDA, float32 on the CPU."
    )
    num_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for torch (default: torch's choice)."
    )

    # ------------------------------------------------------------ evaluation and output
    eval_every: int = Field(
        default=50, ge=0, description="Steps between validation losses; 0: only at the end."
    )
    eval_batches: int | None = Field(
        default=None, ge=1, description="Validation batches per evaluation (default: all)."
    )
    checkpoint_every: int = Field(
        default=50, ge=0, description="Steps between checkpoints; 0: only at the end."
    )
    keep_last: int = Field(default=2, ge=1, description="Checkpoints kept (the newest K).")
    log_every: int = Field(default=1, ge=1, description="Steps between log lines.")
    test_generate: bool = Field(
        default=True,
        description="After training, answer the test split (greedy) into test_responses.json "
        "and score it against the references (ROUGE-L F1, token F1).",
    )
    test_max_new_tokens: int = Field(
        default=256, ge=1, description="Longest generated test answer, in tokens."
    )
    test_limit: int | None = Field(
        default=None, ge=1, description="Answer only the first N test records (default: all)."
    )

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}; lower min_lr")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave records to train on")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {self.betas} must both lie in [0, 1)")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds max_steps {self.max_steps}")
        if any(t.rpartition(".")[2] == "lm_head" for t in self.lora.target_modules):
            raise ValueError("lora.target_modules may not name lm_head (tied to the embeddings)")
        return self

    def base_path(self, workdir: Path) -> Path:
        return Path(self.base) if self.base else Path(workdir)

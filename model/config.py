"""The `pretrain:` section of a run config, validated by pydantic.

Like pipeline/config.py: every field is described (the Prefect UI renders these models as
forms) and unknown keys are rejected, so a typo fails before any work and names the field.
The whole run config, which adds this section to the data stages', is configs/run.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.gpt_config import ARCHITECTURES, PRESETS, GPTConfig
from pipeline.files import WorkFolder


class PretrainConfigError(ValueError):
    """A pretraining misconfiguration, in one sentence that names the fields and the fix."""


# the optimizer fields that only one recipe reads
GPT2_ONLY = frozenset({"lr", "min_lr", "weight_decay"})
MODERN_ONLY = frozenset(
    {"matrix_lr", "embedding_lr", "head_lr", "gain_lr", "muon_momentum", "cooldown_frac"}
)


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # ------------------------------------------------------------ model
    recipe: Literal["gpt2", "modern"] = Field(
        default="gpt2",
        description="gpt2: GPT-2's architecture and AdamW with cosine decay (imports and exports "
        "OpenAI's weights). modern: rotary, QK-norm, RMSNorm, ReLU squared, untied head, "
        "zero-initialized projections, soft-capped logits; Muon for the blocks' matrices, AdamW "
        "for the rest, warmup-stable-decay (modded-nanogpt, nanochat).",
    )
    preset: str = Field(
        default="small",
        description=f"Model preset from model.gpt.PRESETS: {', '.join(PRESETS)}.",
    )
    n_layer: int | None = Field(default=None, ge=1, description="Override the preset's layers.")
    n_head: int | None = Field(default=None, ge=1, description="Override the preset's heads.")
    n_embd: int | None = Field(default=None, ge=1, description="Override the preset's width.")
    block_size: int | None = Field(
        default=None, ge=8, description="Override the preset's context length (tokens)."
    )
    dropout: float | None = Field(
        default=None, ge=0.0, lt=1.0, description="Override the preset's dropout (0 pretraining)."
    )
    vocab_size: int | None = Field(
        default=None,
        ge=1,
        description="Model vocabulary (default: the dataset's). Padding to a multiple of 64, "
        "e.g. 50304 for GPT-2, makes GPU matmuls faster; never smaller than the dataset's.",
    )

    # ------------------------------------------------------------ data
    dataset: str | None = Field(
        default=None,
        description="Token dataset (zarr) to train on; default <workdir>/tokenize/dataset.zarr.",
    )
    verify_data: bool = Field(
        default=True,
        description="Recompute every shard checksum before training (shard sizes are always "
        "checked); turn off for huge datasets already verified with `forge verify`.",
    )
    seed: int = Field(default=1337, description="Seeds the model init, dropout and data order.")

    # ------------------------------------------------------------ hardware
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: CUDA when available, else the CPU."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="Compute dtype of autocast; auto: bfloat16 on CUDA, float32 on the CPU. "
        "Weights and optimizer state stay float32.",
    )
    compile: bool = Field(default=False, description="torch.compile the model (CUDA runs).")
    num_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for torch (default: torch's choice)."
    )

    # ------------------------------------------------------------ batch and schedule
    micro_batch_size: int = Field(default=8, ge=1, description="Sequences per forward pass.")
    total_batch_tokens: int = Field(
        default=2048,
        ge=1,
        description="Global batch in tokens per optimizer step; gradient accumulation steps = "
        "total_batch_tokens / (micro_batch_size * block_size * world_size), which must be whole.",
    )
    max_steps: int = Field(default=200, ge=1, description="Optimizer steps to train for.")
    lr: float = Field(default=6e-4, gt=0, le=1.0, description="gpt2: peak learning rate.")
    min_lr: float = Field(
        default=6e-5, ge=0, description="gpt2: floor the cosine decays to (at most lr); 0.1 * lr."
    )
    warmup_steps: int = Field(
        default=10, ge=0, description="Linear warmup steps (at most max_steps)."
    )
    weight_decay: float = Field(
        default=0.1, ge=0, description="gpt2: AdamW decay of matrices and embeddings."
    )
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas.")
    # the modern recipe's optimizer; published values (modded-nanogpt records/track_1_short,
    # nanochat scripts/base_train.py and nanochat/gpt.py setup_optimizer)
    matrix_lr: float = Field(
        default=0.02, gt=0, le=1.0,
        description="modern: Muon's lr for the blocks' matrices (modded-nanogpt 2024-11-03 "
        "record and nanochat: 0.02).",
    )
    embedding_lr: float = Field(
        default=0.3, gt=0, le=10.0,
        description="modern: AdamW's lr for the token embeddings (modded-nanogpt 2024-11-03 "
        "record and nanochat: 0.3).",
    )
    head_lr: float = Field(
        default=0.008, gt=0, le=1.0,
        description="modern: AdamW's lr for the head (nanochat unembedding_lr and modded-nanogpt "
        "2024-11-19 record: 0.008).",
    )
    gain_lr: float = Field(
        default=0.04, gt=0, le=1.0,
        description="modern: AdamW's lr for the norm gains (modded-nanogpt 2024-11-19 record's "
        "scalars: 0.04).",
    )
    muon_momentum: float = Field(
        default=0.95, ge=0, lt=1.0, description="modern: Muon's momentum (both: 0.95)."
    )
    cooldown_frac: float = Field(
        default=0.6, gt=0, le=1.0,
        description="modern: the last fraction of the steps over which the lr decays linearly "
        "to 0 (modded-nanogpt train_gpt.py: 0.6; nanochat warmdown_ratio: 0.65).",
    )
    grad_clip: float = Field(
        default=1.0, ge=0, description="Clip the global gradient norm to this; 0 disables."
    )

    # ------------------------------------------------------------ evaluation and output
    eval_every: int = Field(
        default=50, ge=0, description="Steps between validation losses; 0: only at the end."
    )
    eval_batches: int = Field(
        default=20, ge=1, description="Validation batches (the first N of the val split)."
    )
    checkpoint_every: int = Field(
        default=100, ge=0, description="Steps between checkpoints; 0: only at the end."
    )
    keep_last: int = Field(default=3, ge=1, description="Checkpoints kept (the newest K).")
    log_every: int = Field(default=1, ge=1, description="Steps between log lines.")
    sample_every: int = Field(
        default=0, ge=0, description="Steps between sample generations; 0: never."
    )
    sample_prompt: str = Field(
        default="\n", description="Text the samples start from (GPT-2 tokens)."
    )
    sample_tokens: int = Field(default=64, ge=1, description="Tokens generated per sample.")
    vocab_dir: str | None = Field(
        default=None,
        description="GPT-2 vocabulary folder for encoding the sample prompt offline "
        "(default: data.tokenize.vocab_dir of the same config, or $FORGE_VOCAB_DIR).",
    )

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.preset not in PRESETS:
            raise ValueError(
                f"preset {self.preset!r} is unknown; valid presets: {', '.join(PRESETS)}"
            )
        # another recipe's field at its default is harmless (a whole config dumped and read
        # back sets them all); a changed one would be silently ignored, so it is refused
        mine = MODERN_ONLY if self.recipe == "gpt2" else GPT2_ONLY
        foreign = sorted(f for f in mine & self.model_fields_set
                         if getattr(self, f) != type(self).model_fields[f].default)
        if foreign:
            other = "modern" if self.recipe == "gpt2" else "gpt2"
            raise ValueError(
                f"{', '.join(foreign)} belong to the {other} recipe, and recipe is "
                f"{self.recipe!r}; set recipe: {other} or remove them"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}; lower min_lr")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds max_steps {self.max_steps}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {self.betas} must both lie in [0, 1)")
        gpt = self.gpt_config()  # raises on an inconsistent shape (n_embd % n_head)
        self.grad_accum_steps(world_size=1, block_size=gpt.block_size)
        return self

    def gpt_config(self, vocab_size: int | None = None) -> GPTConfig:
        """The model's GPTConfig: the preset with the overrides (and the vocabulary) applied."""
        overrides = {
            name: getattr(self, name)
            for name in ("n_layer", "n_head", "n_embd", "block_size", "dropout")
            if getattr(self, name) is not None
        }
        overrides.update(ARCHITECTURES[self.recipe])
        vocab = self.vocab_size or vocab_size
        if vocab is not None:
            overrides["vocab_size"] = vocab
        try:
            return GPTConfig.from_preset(self.preset, **overrides)
        except ValueError as e:
            raise PretrainConfigError(f"pretrain.preset/n_embd/n_head: {e}") from None

    def grad_accum_steps(self, world_size: int, block_size: int | None = None) -> int:
        """Micro-batches per optimizer step on each rank; fails fast unless it is whole."""
        block = block_size or self.gpt_config().block_size
        per_micro = self.micro_batch_size * block * world_size
        if self.total_batch_tokens % per_micro or self.total_batch_tokens < per_micro:
            raise PretrainConfigError(
                f"pretrain.total_batch_tokens ({self.total_batch_tokens}) must be a positive "
                f"multiple of pretrain.micro_batch_size ({self.micro_batch_size}) x block_size "
                f"({block}) x world size ({world_size}) = {per_micro}; set total_batch_tokens "
                f"to e.g. {max(1, round(self.total_batch_tokens / per_micro)) * per_micro}"
            )
        return self.total_batch_tokens // per_micro

    def dataset_path(self, workdir: Path) -> Path:
        """The dataset to read: `dataset` if set, else the tokenize stage's output."""
        return Path(self.dataset) if self.dataset else WorkFolder(workdir).dataset

    def model_dict(self, vocab_size: int) -> dict:
        """The model config as a plain dict (what checkpoints store and compare)."""
        return dataclasses.asdict(self.gpt_config(vocab_size))

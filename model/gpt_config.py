"""GPT-2's hyperparameters and presets, apart from the model so configs load without torch.

The architecture switches below default to GPT-2 (what imports and exports OpenAI's weights);
ARCHITECTURES names the set each training recipe uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257  # GPT-2's BPE; pad to 50304 yourself if you want faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in Linear and LayerNorm
    # "rmsnorm": RMSNorm in the blocks and before the head, and a gain-free one on the token
    # embeddings (modded-nanogpt, nanochat)
    norm: str = "layernorm"
    mlp: str = "gelu"  # "relu2": ReLU squared, ~1-2% better than GELU (Primer, arXiv 2109.08668)
    tie_embeddings: bool = True  # False: the head has its own matrix (modded-nanogpt 2024-11-03)
    # attn/mlp output projections (and an untied head) start at zero (modded-nanogpt 2024-10-14)
    zero_init: bool = False
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap) (Gemma 2; nanochat 15)
    rotary: bool = False  # rotary position embeddings instead of learned ones (RoFormer)
    qk_norm: bool = False  # RMSNorm of each head's queries and keys (modded-nanogpt, nanochat)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm {self.norm!r} is unknown; valid: layernorm, rmsnorm")
        if self.mlp not in ("gelu", "relu2"):
            raise ValueError(f"mlp {self.mlp!r} is unknown; valid: gelu, relu2")
        if self.rotary and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rotary needs an even head size, not {self.n_embd // self.n_head}")

    @property
    def gpt2_layout(self) -> bool:
        """Whether this is GPT-2's architecture (the one OpenAI's published files hold)."""
        return all(getattr(self, k) == v for k, v in ARCHITECTURES["gpt2"].items())

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> GPTConfig:
        """Config of a named preset, with any field overridden (e.g. block_size=256)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128),  # CPU tests
    "small": GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256),  # CPU experiments
}

# The architecture of each training recipe (model/config.py's pretrain.recipe).
ARCHITECTURES: dict[str, dict[str, object]] = {
    "gpt2": dict(
        bias=True, norm="layernorm", mlp="gelu", tie_embeddings=True, zero_init=False,
        logit_softcap=0.0, rotary=False, qk_norm=False,
    ),
    "modern": dict(
        bias=False, norm="rmsnorm", mlp="relu2", tie_embeddings=False, zero_init=True,
        logit_softcap=15.0, rotary=True, qk_norm=True,
    ),
}

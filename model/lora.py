"""LoRA (Hu et al., 2021): low-rank adapters on a frozen GPT's Linear layers.

    y = W x + b + (alpha / r) * B A dropout(x)      A: (r, in), B: (out, r), B starts at 0

so the adapted model starts exactly equal to the base. The math and the initialization are
peft's (A kaiming-uniform with a=sqrt(5), B zeros, scaling alpha / r); we do not use peft
itself because it requires transformers and accelerate at run time and wraps the model in a
PeftModel that expects a Hugging Face model's forward signature. Adapter parameters are named
`<linear>.lora_A` / `<linear>.lora_B`, so a LoRA checkpoint is the state dict filtered by
lora_state_dict(), and merge_lora() folds B A into W for export and fast inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.finetune_config import LORA_TARGETS as TARGETS


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update; same state keys as the Linear."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # shared with the wrapped Linear: loads and merges in place
        self.bias = base.bias
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function (W + scaling * B A)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            linear.weight.copy_(self.weight.float() + delta)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}"


def _matches(name: str, targets: tuple[str, ...] | list[str]) -> bool:
    """peft's rule: a target names a module by its full name or the end of it after a dot."""
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    targets: tuple[str, ...] | list[str] = TARGETS,
) -> list[str]:
    """Wrap every targeted nn.Linear in a LoRALinear and freeze everything but the adapters.

    Returns the wrapped module names; fails if a target matches nothing or names lm_head (its
    weight is tied to the token embeddings, so merging into it would change those too).
    """
    if any(t.rpartition(".")[2] == "lm_head" for t in targets):
        raise ValueError("LoRA on lm_head is not supported: its weight is tied to wte")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and _matches(name, targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, r, alpha, dropout))
            wrapped.append(name)
    missing = [t for t in targets if not any(_matches(n, [t]) for n in wrapped)]
    if missing:
        raise ValueError(
            f"LoRA target modules {missing} match no Linear layer; valid: {', '.join(TARGETS)}"
        )
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only: what a LoRA checkpoint stores."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged Linear, in place; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.merged())
    return model

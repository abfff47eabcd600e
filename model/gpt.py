"""A GPT-2 language model in one file, in the spirit of nanoGPT's model.py.

Module names follow the Hugging Face / OpenAI GPT-2 layout (transformer.wte, transformer.h[i].attn.
c_attn, ...), so importing GPT-2 weights is a rename-free copy (HF's Conv1D weights are stored
transposed relative to nn.Linear, so c_attn/c_proj/c_fc need a .t() on import).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.gpt_config import PRESETS, GPTConfig  # noqa: F401 - PRESETS is part of this API

# Dense bf16 peak FLOP/s per GPU, for MFU. The SXM parts; PCIe cards are lower.
PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


class KVCache:
    """Keys and values of past positions for a batch of rows, preallocated: (B, heads, max_len,
    head_dim) per layer.

    Each row keeps its own length: a forward writes every row's new tokens at that row's own
    positions, so rows of different lengths share one forward, and a query attends to the keys
    of its row up to its own position. Buffers are allocated on a layer's first write, with the
    dtype and device of the keys written, so the cache just works under autocast.

    Before a forward the caller sets `rows`, the cache rows the batch's rows are (None: all, in
    order), and `span`, how many columns attention reads (longest row after the step: a short
    answer does not pay for max_len).
    """

    def __init__(self, n_layer: int, batch_size: int, max_len: int) -> None:
        self.batch_size = batch_size
        self.max_len = max_len
        self.rows: torch.Tensor | None = None
        self.span = max_len
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at positions (B, T); return the keys and values of the rows'
        first `span` columns and the attention mask (B, 1, T, span): keys up to each position."""
        B, H, T, D = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(self.batch_size, H, self.max_len, D)
            self.v[layer] = v.new_zeros(self.batch_size, H, self.max_len, D)
        kbuf, vbuf = self.k[layer], self.v[layer]
        rows = self.rows if self.rows is not None else torch.arange(B, device=k.device)
        kbuf[rows[:, None], :, positions] = k.transpose(1, 2)  # (B, T, H, D) per (row, position)
        vbuf[rows[:, None], :, positions] = v.transpose(1, 2)
        if self.rows is None and k.size(0) == self.batch_size:
            keys, values = kbuf[:, :, : self.span], vbuf[:, :, : self.span]
        else:
            keys, values = kbuf[rows, :, : self.span], vbuf[rows, :, : self.span]
        columns = torch.arange(self.span, device=k.device)
        return keys, values, (columns <= positions[:, :, None]).unsqueeze(1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # which layer of a KVCache this one uses
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """positions (B, T) or (T,): where each token sits in its row."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            k, v, mask = cache.update(self.layer_idx, k, v, positions)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), positions, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer):
        # each layer adds two of them, and this keeps the residual's variance from growing.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (the tied wte/lm_head counted once).

        non_embedding subtracts the position embeddings only, as nanoGPT: the token embeddings
        are used as the output projection too, so they do real compute.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        positions: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and the mean cross-entropy loss when targets are given.

        Targets equal to -100 are left out of the loss (masked prompt tokens). positions (B, T)
        says where each token of idx sits in its row (default 0..T-1); with a cache, idx holds
        only the new tokens and positions is required: each row continues at its own length.
        last_only returns logits for the last position only (B, 1, vocab), for sampling.
        """
        B, T = idx.shape
        if positions is None:
            if cache is not None:
                raise ValueError("a forward with a KV cache needs the positions of its tokens")
            if idx.size(1) > self.config.block_size:
                raise ValueError(
                    f"sequence of {T} positions exceeds block_size {self.config.block_size}"
                )
            positions = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x, positions, cache)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
            return logits, loss
        return self.lm_head(x[:, -1:] if last_only else x), None

    def configure_optimizer(
        self,
        weight_decay: float,
        lr: float,
        betas: tuple[float, float],
        device_type: str,
        fused: bool | None = None,
    ) -> torch.optim.AdamW:
        """AdamW decaying matrices and embeddings only; biases and LayerNorm gains (1-D) are not.

        fused defaults to on wherever torch has the kernel (CPU and CUDA): one kernel over all
        parameters, a quarter of the unfused step time on the CPU.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if fused is None:
            fused = device_type in ("cpu", "cuda")
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6*N + 12*L*H*Q*T (PaLM appendix B, as nanoGPT).

        N is num_params(non_embedding=True); 6N counts forward (2N) and backward (4N) of the
        matmuls; 12*L*H*Q*T the attention scores and weighted sum, with L layers, H heads, Q the
        head size and T the sequence length (block_size unless given).
        """
        cfg = self.config
        L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        T = seq_len if seq_len is not None else cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * L * H * Q * T

    def mfu(self, tokens_per_s: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilization: estimate_flops_per_token() * tokens_per_s / peak_flops.

        tokens_per_s and peak_flops must cover the same hardware (e.g. both per GPU).
        """
        return self.estimate_flops_per_token(seq_len) * tokens_per_s / peak_flops

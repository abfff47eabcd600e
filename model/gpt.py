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
IGNORE_INDEX = -100  # a target that does not count in the loss (masked prompt tokens)


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


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer, arXiv 2104.09864) in the rotate-half layout of
    Llama and modded-nanogpt: channel i pairs with channel i + head_size/2, rotated by
    position * base^(-2i/head_size). Base 10000, as RoFormer and modded-nanogpt."""

    def __init__(self, head_size: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, T, D) by positions (B, T) or (T,)."""
        angles = positions.unsqueeze(-1).float() * self.inv_freq  # (B, T, D/2) or (T, D/2)
        if angles.dim() == 3:
            angles = angles.unsqueeze(1)  # one rotation per row, shared by its heads
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, n, size)]


class SoftcappedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of cap * tanh(logits / cap), computed over chunks of rows on the CPU.

    The plain expression makes six passes over a (tokens, 50k) tensor, each allocating one;
    in eager CPU mode that made the modern recipe's steps 1.5x slower than gpt2's. Here each
    chunk stays in cache, and the forward writes the gradient too (as fused cross-entropy
    kernels do), so the backward only scales it: about a quarter of the plain cost. With the
    logits capped, exp(capped - cap) cannot overflow, so no max pass is needed. On the GPU
    torch.compile fuses the plain expression instead. Targets equal to IGNORE_INDEX do not
    count, as in F.cross_entropy.
    """

    CHUNK_ROWS = 16

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
        ctx.dtype, ctx.shape = logits.dtype, logits.shape
        logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
        keep = targets != IGNORE_INDEX
        row_scale = keep / keep.sum()
        picked_targets = targets.clamp(min=0)[:, None]
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty(logits.shape, dtype=torch.float32) if want_grad else None
        chunk = torch.empty(2, SoftcappedCrossEntropy.CHUNK_ROWS, logits.size(1))
        losses = torch.empty(len(targets))
        for rows in _chunks(len(targets), SoftcappedCrossEntropy.CHUNK_ROWS):
            x = logits[rows].float()
            t = torch.div(x, cap, out=grad[rows] if want_grad else chunk[0, : len(x)]).tanh_()
            e = torch.add(-cap, t, alpha=cap, out=chunk[1, : len(x)]).exp_()  # exp(capped - cap)
            total = e.sum(1)
            target = picked_targets[rows]
            losses[rows] = total.log() + cap - cap * t.gather(1, target).squeeze(1)
            if want_grad:  # (softmax - one_hot) * d(capped)/dx, each row scaled by its weight
                e.mul_((row_scale[rows] / total)[:, None])
                e.scatter_add_(1, target, -row_scale[rows, None])
                t.mul_(t).neg_().add_(1).mul_(e)
        ctx.grad = grad
        return (losses * row_scale).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad, ctx.grad = ctx.grad, None  # scaled in place, so it serves one backward
        if grad is None:
            raise RuntimeError("SoftcappedCrossEntropy's gradient serves one backward; run the "
                               "forward again")
        if grad_loss.item() != 1.0:  # gradient accumulation divides the loss
            grad.mul_(grad_loss)
        return grad.to(ctx.dtype).view(ctx.shape), None, None


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
        self.qk_norm = config.qk_norm
        self.rotary = Rotary(config.n_embd // config.n_head) if config.rotary else None

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """positions (B, T) or (T,): where each token sits in its row."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if self.rotary is not None:  # keys enter the cache rotated to their own positions
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            k, v, mask = cache.update(self.layer_idx, k, v, positions)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class ReLUSquared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2's "gelu_new", or ReLU squared
        self.act = nn.GELU(approximate="tanh") if config.mlp == "gelu" else ReLUSquared()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
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
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not config.rotary:  # learned positions, added to the token embeddings
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(
            dict(
                **modules,
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=make_norm(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if config.zero_init and (name.endswith("c_proj.weight") or name == "lm_head.weight"):
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                # GPT-2 scales the projections that write into the residual stream by
                # 1/sqrt(2 * n_layer): each layer adds two, and this keeps the variance level.
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.norm == "rmsnorm":
            # normalized before use, so only its scale relative to Adam's steps matters: unit
            # scale as nn.Embedding's default, which modded-nanogpt keeps (embedding lr 0.3-0.6)
            nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)

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

        non_embedding subtracts the lookups, which do no matmul: the position embeddings, as
        nanoGPT, and the token embeddings when untied (tied, they are the head too).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(
                m.weight.numel()
                for name, m in self.transformer.items()
                if name == "wpe" or (name == "wte" and not self.config.tie_embeddings)
            )
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        positions: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab), or with targets (None, the mean cross-entropy loss): a loss
        need not hold a training batch's capped logits, 50k floats per token.

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
        x = self.transformer.wte(idx)
        if self.config.norm == "rmsnorm":
            x = F.rms_norm(x, (x.size(-1),))
        if not self.config.rotary:
            x = x + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, positions, cache)
        x = self.transformer.ln_f(x)
        if targets is not None:
            return None, self.loss(x, targets)
        return self.head(x[:, -1:] if last_only else x), None

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the final hidden states' logits against targets."""
        cap = self.config.logit_softcap
        if cap > 0 and x.device.type == "cpu":
            return SoftcappedCrossEntropy.apply(self.lm_head(x), targets, cap)
        logits = self.head(x)
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the final hidden states, soft-capped when the config says so (in float32,
        where tanh keeps its precision)."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits.float() / cap) if cap > 0 else logits

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

"""Evaluation: validation loss, HellaSwag accuracy and WikiText-2 perplexity.

val_loss() is the one validation loss: pretraining's and fine-tuning's evaluations during
training, and `forge eval --task val`.

HellaSwag is scored the llm.c way: each of the four endings is appended to the context and
the ending's tokens are scored; the ending with the lowest mean cross-entropy wins
("acc_norm", normalized by length), and the lowest total loss gives plain "acc".
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.gpt import GPT, IGNORE_INDEX


@torch.no_grad()
def val_loss(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, autocast: contextlib.AbstractContextManager | None = None,
             rank: int = 0, world_size: int = 1) -> float:
    """Mean loss per target token (IGNORE_INDEX targets left out) over the (x, y) batches; under DDP
    each rank takes every world_size-th batch and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of losses, targets
    for i, (x, y) in enumerate(batches):
        if i % world_size != rank:
            continue
        with autocast or contextlib.nullcontext():
            _, loss = model(x.to(device), y.to(device))
        targets = int((y != IGNORE_INDEX).sum())
        total[0] += loss.double() * targets
        total[1] += targets
    if world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    if not total[1]:
        raise ValueError("no validation batch with a target to score")
    return float(total[0] / total[1])


@dataclass
class HellaSwagItem:
    context: str
    label: int
    endings: list[str]


def _read_text(path: Path) -> str:
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def hellaswag_items(path: str | Path, limit: int | None = None) -> Iterator[HellaSwagItem]:
    """Items of the 6-lines-per-item layout: 'activity: context', label, four endings."""
    lines = _read_text(Path(path)).splitlines()
    count = len(lines) // 6 if limit is None else min(limit, len(lines) // 6)
    for i in range(count):
        first, label, *endings = lines[6 * i: 6 * i + 6]
        context = first.split(": ", 1)[1] if ": " in first else first  # llm.c uses ctx alone
        yield HellaSwagItem(context, int(label), endings)


@torch.no_grad()
def score_endings(model: GPT, context: list[int], endings: list[list[int]],
                  device: torch.device) -> tuple[list[float], list[float]]:
    """(mean, total) cross-entropy of each ending's tokens after the context."""
    block = model.config.block_size
    rows, masks = [], []
    for ending in endings:
        tokens = (context + ending)[-(block + 1):]
        rows.append(tokens)
        masks.append([0] * (len(tokens) - len(ending)) + [1] * len(ending))
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, (row, m) in enumerate(zip(rows, masks, strict=True)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
    tokens, mask = tokens.to(device), mask.to(device)
    logits, _ = model(tokens[:, :-1])
    losses = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")
    losses = losses * mask[:, 1:]
    totals = losses.sum(dim=1)
    means = totals / mask[:, 1:].sum(dim=1)
    return means.tolist(), totals.tolist()


def hellaswag(model: GPT, encoding, path: str | Path, limit: int | None = None,
              device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    correct_norm = correct = total = 0
    for item in hellaswag_items(path, limit):
        context = encoding.encode_ordinary(item.context)
        endings = [encoding.encode_ordinary(" " + e) for e in item.endings]
        means, totals = score_endings(model, context, endings, device)
        correct_norm += int(min(range(4), key=means.__getitem__) == item.label)
        correct += int(min(range(4), key=totals.__getitem__) == item.label)
        total += 1
    return {"task": "hellaswag", "items": total, "acc_norm": correct_norm / max(1, total),
            "acc": correct / max(1, total)}


_WIKITEXT_JOINS = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "),
                   (" ; ", "; "), (" : ", ": "), (" 's", "'s"), (" n't", "n't"), ("( ", "("),
                   (" )", ")")]


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's tokenization (' @-@ ', ' , '), as the GPT-2 paper's detokenizer does."""
    for old, new in _WIKITEXT_JOINS:
        text = text.replace(old, new)
    return re.sub(r" \n", "\n", text)


@torch.no_grad()
def perplexity(model: GPT, tokens: list[int], device: torch.device | str = "cpu",
               stride: int | None = None) -> dict:
    """Token perplexity with sliding windows: every token is predicted once, with up to
    block_size - stride tokens of context carried over from the previous window."""
    device = torch.device(device)
    block = model.config.block_size
    stride = stride or block // 2
    ids = torch.tensor(tokens, dtype=torch.long)
    last = len(tokens) - 1  # positions 1..last are predicted
    nll, scored = 0.0, 0
    for begin in range(0, last, stride):
        end = min(begin + block, last)
        logits, _ = model(ids[begin:end].unsqueeze(0).to(device))
        targets = ids[begin + 1:end + 1].to(device)
        losses = F.cross_entropy(logits[0].float(), targets, reduction="none")
        fresh = end - scored  # targets no earlier window has scored
        nll += losses[-fresh:].sum().item()
        scored = end
        if end == last:
            break
    return {"tokens": scored, "loss": nll / scored, "perplexity": math.exp(nll / scored)}


def wikitext2(model: GPT, encoding, path: str | Path, device: torch.device | str = "cpu",
              limit_tokens: int | None = None) -> dict:
    tokens = encoding.encode_ordinary(detokenize_wikitext(_read_text(Path(path))))
    if limit_tokens:
        tokens = tokens[:limit_tokens]
    return {"task": "wikitext2", **perplexity(model, tokens, device)}

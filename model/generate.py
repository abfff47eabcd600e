"""Batched generation with a KV cache: the one way forge turns prompts into answers.

`Engine.generate` takes a list of requests and answers them together: each prompt is prefilled
into its own row of a preallocated KV cache, then every step runs one forward over all the rows
still going, each row at its own position. A row ends on its own: at <|endoftext|>, at one of
its stop strings, after its max_tokens, at the end of the context, or when the caller's
on_token callback says so; its slot then leaves the batch. Each row samples with its own
random generator, so with a seed its answer does not depend on the other rows.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from model.gpt import GPT, KVCache
from pipeline.encoding import VOCAB_SIZE


@dataclass(frozen=True)
class SamplingParams:
    """How one answer is sampled. temperature 0 is greedy (penalties still apply).

    frequency_penalty and presence_penalty are OpenAI's: a token's logit is lowered by
    frequency_penalty times the number of times the answer already holds it, plus
    presence_penalty once it holds it at all; they keep a small model out of loops.
    """

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int | None = None
    frequency_penalty: float = 0.3
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "max_tokens": (self.max_tokens >= 1, ">= 1"),
            "temperature": (self.temperature >= 0, ">= 0"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "top_k": (self.top_k is None or self.top_k >= 1, ">= 1 or None"),
            "frequency_penalty": (-2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            "presence_penalty": (-2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            "stop": (all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Completion:
    """An answer: its tokens (without <|endoftext|>), its text (cut before a stop string) and
    why it ended: "stop" (end of text or a stop string), "length" (max_tokens or the context
    is full) or "cancelled" (on_token returned False)."""

    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int


class TextStream:
    """The text of an answer as its tokens come, released only once it is certain: a stop
    string cuts the answer, and text that could still begin one (with the whitespace before
    it) is held back, as are the bytes of a character split across tokens."""

    def __init__(self, encoding: Any, stop: tuple[str, ...] = ()) -> None:
        self.encoding, self.stop = encoding, stop
        self.text = ""  # the answer so far, cut before a stop string once one appears
        self.stopped = False
        self.released = 0  # characters of text handed out
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """Add a token; returns the text that became certain (none once stopped)."""
        if self.stopped:
            return ""
        start = len(self.text)
        self.text += self._decoder.decode(self.encoding.decode_single_token_bytes(token))
        cuts = [self.text.find(s, max(0, start - len(s) + 1)) for s in self.stop]
        if any(c >= 0 for c in cuts):
            self.text, self.stopped = self.text[: min(c for c in cuts if c >= 0)], True
            return ""
        held = next(
            (n for n in range(min(len(self.text), max(map(len, self.stop), default=1) - 1), 0, -1)
             if any(s.startswith(self.text[-n:]) for s in self.stop)),
            0,
        )
        end = len(self.text[: len(self.text) - held].rstrip())
        ready = self.text[self.released : end]
        self.released = max(self.released, end)
        return ready

    def close(self) -> str:
        """The rest of the text, once the answer has ended."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        rest = self.text[self.released :]
        self.released = len(self.text)
        return rest


class _Row:
    """One request in flight: its tokens so far, its text, its generator, its end."""

    def __init__(self, request: Request, limit: int, encoding: Any) -> None:
        self.request, self.params = request, request.params
        self.limit = limit  # new tokens allowed: max_tokens, or less where the context ends
        self.length = len(request.prompt)  # positions in the cache
        self.tokens: list[int] = []
        self.stream = TextStream(encoding, self.params.stop)
        self.generator = torch.Generator()
        if self.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)
        self.finish: str | None = None

    def add(self, token: int) -> None:
        """Append a new token (not end of text) and see whether the answer is over."""
        self.tokens.append(token)
        self.stream.push(token)
        if self.stream.stopped:
            self.end("stop")
        elif len(self.tokens) >= self.limit:
            self.end("length")

    def end(self, reason: str) -> None:
        self.stream.close()
        self.finish = reason

    def completion(self) -> Completion:
        assert self.finish is not None
        return Completion(self.tokens, self.stream.text, self.finish, len(self.request.prompt))


class Engine:
    """Answers requests in batches on one model (see the module docstring)."""

    def __init__(self, model: GPT, encoding: Any, device: str | torch.device) -> None:
        self.model = model.eval()
        self.encoding = encoding
        self.device = torch.device(device)
        self.eot = encoding.eot_token

    def check(self, index: int, request: Request) -> None:
        """Refuse a request the model cannot answer, naming it and why."""
        block = self.model.config.block_size
        n = len(request.prompt)
        if n == 0:
            raise ValueError(f"request {index}: the prompt is empty")
        if n >= block:
            raise ValueError(
                f"request {index}: the prompt has {n} tokens; the model's context holds {block}, "
                "and one position must be left for the answer"
            )
        if min(request.prompt) < 0 or max(request.prompt) >= VOCAB_SIZE:
            raise ValueError(f"request {index}: token ids must be in [0, {VOCAB_SIZE})")

    @torch.no_grad()
    def generate(
        self, requests: list[Request], on_token: Callable[[int, int], bool] | None = None
    ) -> list[Completion]:
        """The completions of requests, in their order.

        on_token(row, token) is called after each new token of row (its index in requests);
        returning False ends that row ("cancelled") and frees its slot.
        """
        for i, request in enumerate(requests):
            self.check(i, request)
        if not requests:
            return []
        block = self.model.config.block_size
        rows = [_Row(r, min(r.params.max_tokens, block - len(r.prompt)), self.encoding)
                for r in requests]
        cache = KVCache(
            self.model.config.n_layer, len(rows), max(row.length + row.limit for row in rows)
        )
        logits = torch.cat([self._prefill(cache, i, row) for i, row in enumerate(rows)])
        counts = None  # times each row's answer holds each token, for the penalties
        if any(r.params.frequency_penalty or r.params.presence_penalty for r in requests):
            counts = torch.zeros(len(rows), VOCAB_SIZE, device=self.device)
        active = list(range(len(rows)))
        while True:
            params = [rows[i].params for i in active]
            if counts is not None:
                logits = penalize(logits, counts[active], params)
            tokens = sample(logits, params, [rows[i].generator for i in active]).tolist()
            for i, token in zip(active, tokens, strict=True):
                row = rows[i]
                if token == self.eot:
                    row.end("stop")
                    continue
                row.add(token)
                if counts is not None:
                    counts[i, token] += 1
                if on_token is not None and on_token(i, token) is False and row.finish is None:
                    row.end("cancelled")
            fed = [(i, t) for i, t in zip(active, tokens, strict=True) if rows[i].finish is None]
            if not fed:
                return [row.completion() for row in rows]
            active = [i for i, _ in fed]
            positions = torch.tensor([[rows[i].length] for i in active], device=self.device)
            every = len(active) == len(rows)
            cache.rows = None if every else torch.tensor(active, device=self.device)
            cache.span = max(rows[i].length for i in active) + 1
            idx = torch.tensor([[t] for _, t in fed], device=self.device)
            out, _ = self.model(idx, cache=cache, positions=positions, last_only=True)
            logits = out[:, -1, :VOCAB_SIZE].float()
            for i in active:
                rows[i].length += 1

    def _prefill(self, cache: KVCache, slot: int, row: _Row) -> torch.Tensor:
        """Run a prompt into its cache row; the logits (1, vocab) of its first new token."""
        cache.rows = torch.tensor([slot], device=self.device)
        cache.span = row.length
        positions = torch.arange(row.length, device=self.device)[None]
        idx = torch.tensor([row.request.prompt], device=self.device)
        out, _ = self.model(idx, cache=cache, positions=positions, last_only=True)
        return out[:, -1, :VOCAB_SIZE].float()


def penalize(
    logits: torch.Tensor, counts: torch.Tensor, params: list[SamplingParams]
) -> torch.Tensor:
    """OpenAI's frequency and presence penalties over each row's answer so far."""
    freq = torch.tensor([p.frequency_penalty for p in params], device=logits.device)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=logits.device)[:, None]
    return logits - freq * counts - pres * (counts > 0)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> torch.Tensor:
    """One token per row of logits (B, vocab) -> (B,), each row with its own settings.

    Greedy rows take the argmax. The others keep their top_k most likely tokens and the
    smallest set of most likely tokens whose probability reaches top_p (nucleus, as HF, never
    fewer than one), then draw by inverse CDF with one uniform number from the row's own
    generator: a row's draw depends on nothing but its logits and its generator.
    """
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return tokens
    temperature = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
    scaled = logits[sampled] / temperature[:, None]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([params[i].top_p for i in sampled], device=logits.device)[:, None]
    keep = probs.cumsum(dim=-1) - probs < top_p  # the tokens more likely fall short of top_p
    top_k = [params[i].top_k or probs.size(-1) for i in sampled]
    rank = torch.arange(probs.size(-1), device=logits.device)
    keep &= rank < torch.tensor(top_k, device=logits.device)[:, None]
    cdf = (probs * keep).cumsum(dim=-1)
    u = torch.cat([torch.rand(1, generator=generators[i]) for i in sampled]).to(logits.device)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=probs.size(-1) - 1)
    tokens[sampled] = order.gather(-1, pick).squeeze(-1)
    return tokens

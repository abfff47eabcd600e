"""`forge chat`: a multi-turn terminal assistant that streams its answers.

The conversation is one Alpaca prompt that grows a turn at a time:

    Below is an instruction ... completes the request.

    ### Instruction:
    {turn 1}

    ### Response:
    {answer 1}

    ### Instruction:
    {turn 2}

    ### Response:

so the first turn is token for token what fine-tuning trained on. When the prompt would leave
too little room for an answer, the oldest turns are dropped. Each answer is generated with a
KV cache (GPT.stream) and printed as it comes; it ends at <|endoftext|>, at the model starting
a new "### Instruction:" of its own, or after max_new_tokens.
"""

from __future__ import annotations

import codecs
import dataclasses
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from model.gpt import GPT
from model.inference import STOP_STRINGS, format_chat
from pipeline.encoding import EOT_ID

HELP = """commands:
  /reset               forget the conversation
  /set NAME VALUE      temperature, top_k, top_p, max_new_tokens or seed ('none' unsets
                       top_k, top_p, seed); e.g. /set temperature 0.7
  /settings            show the generation settings
  /help                this text
  /exit                quit (also /quit or Ctrl-D); Ctrl-C stops an answer"""


@dataclass
class GenerationSettings:
    """How answers are sampled; temperature 0 is greedy."""

    temperature: float = 0.7
    top_k: int | None = 50
    top_p: float | None = 0.95
    max_new_tokens: int = 256
    seed: int | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            self._check(field.name, getattr(self, field.name))

    @staticmethod
    def _check(name: str, value: Any) -> None:
        ok = {
            "temperature": lambda v: v >= 0,
            "top_k": lambda v: v is None or v >= 1,
            "top_p": lambda v: v is None or 0 < v <= 1,
            "max_new_tokens": lambda v: v >= 1,
            "seed": lambda v: True,
        }[name]
        if not ok(value):
            limits = {
                "temperature": ">= 0",
                "top_k": ">= 1",
                "top_p": "in (0, 1]",
                "max_new_tokens": ">= 1",
            }
            raise ValueError(f"{name} must be {limits[name]}, got {value}")

    def set(self, name: str, text: str) -> None:
        """Set a field from text (a /set command); raises ValueError naming what is wrong."""
        types = {
            "temperature": float,
            "top_k": int,
            "top_p": float,
            "max_new_tokens": int,
            "seed": int,
        }
        if name not in types:
            raise ValueError(f"unknown setting {name!r}; one of: {', '.join(types)}")
        if text.lower() == "none" and name in ("top_k", "top_p", "seed"):
            value = None
        else:
            try:
                value = types[name](text)
            except ValueError:
                kind = "whole number" if types[name] is int else "number"
                raise ValueError(f"{name} takes a {kind}, not {text!r}") from None
        self._check(name, value)
        setattr(self, name, value)

    def describe(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(self).items())


def chat_prompt(turns: list[tuple[str, str]], message: str) -> str:
    """The conversation so far plus the new message, ready for the answer (format_chat)."""
    messages = []
    for user, reply in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return format_chat([*messages, {"role": "user", "content": message}])


def _held_back(text: str) -> int:
    """How many trailing characters could start a stop string (wait before printing them)."""
    for n in range(min(len(text), max(map(len, STOP_STRINGS)) - 1), 0, -1):
        if any(stop.startswith(text[-n:]) for stop in STOP_STRINGS):
            return n
    return 0


class Chat:
    """A conversation with a model: its turns, its settings and its random generator."""

    def __init__(self, model: GPT, enc: Any, settings: GenerationSettings | None = None) -> None:
        self.model, self.enc = model.eval(), enc
        self.settings = settings or GenerationSettings()
        self.device = next(model.parameters()).device
        self.turns: list[tuple[str, str]] = []
        self.dropped_turns = 0  # turns that no longer fit the context
        self.reseed()

    def reseed(self) -> None:
        self.generator = torch.Generator(device=self.device)
        if self.settings.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.settings.seed)

    def reset(self) -> None:
        self.turns, self.dropped_turns = [], 0

    def set(self, name: str, text: str) -> None:
        self.settings.set(name, text)
        if name == "seed":
            self.reseed()

    def prompt_ids(self, message: str) -> list[int]:
        """The prompt's tokens, without the oldest turns if the answer would not fit.

        Room for min(max_new_tokens, half the context) is kept; a message too long even alone
        keeps its end.
        """
        block = self.model.config.block_size
        budget = block - min(self.settings.max_new_tokens, block // 2)
        while True:
            ids = self.enc.encode_ordinary(chat_prompt(self.turns, message))
            if len(ids) <= budget or not self.turns:
                return ids[-budget:]
            self.turns.pop(0)
            self.dropped_turns += 1

    def reply(self, message: str) -> Iterator[str]:
        """Stream the answer to message as text pieces; the turn is kept once it ends
        (also when the caller stops early, e.g. on Ctrl-C: what was shown is kept)."""
        ids = self.prompt_ids(message)
        room = self.model.config.block_size - len(ids)
        s = self.settings
        tokens = self.model.stream(
            torch.tensor(ids, device=self.device),
            max_new_tokens=min(s.max_new_tokens, room),
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            eos_id=EOT_ID,
            generator=self.generator,
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        shown, pending = [], ""
        try:
            for tok in tokens:
                pending += decoder.decode(self.enc.decode_single_token_bytes(tok))
                cut = min(
                    (i for i in (pending.find(x) for x in STOP_STRINGS) if i >= 0), default=-1
                )
                if cut >= 0:
                    pending = pending[:cut]
                    break
                keep = _held_back(pending)  # and the whitespace before: it may end the answer
                head = pending[: len(pending) - keep]
                keep += len(head) - len(head.rstrip())
                ready, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
                if ready:
                    shown.append(ready)
                    yield ready
            else:
                pending += decoder.decode(b"", final=True)
            if pending.rstrip():
                shown.append(pending.rstrip())
                yield pending.rstrip()
        finally:
            tokens.close()
            self.turns.append((message, "".join(shown).strip()))


def run_chat(
    chat: Chat,
    prompt: str | None = None,
    banner: str = "",
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> int:
    """The terminal loop: `prompt` answers once and returns; else read lines until /exit."""

    def answer(message: str) -> None:
        try:
            for piece in chat.reply(message):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        out.flush()

    if prompt is not None:
        answer(prompt)
        return 0
    if banner:
        print(banner, file=out, flush=True)
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            print("\n(/exit quits)", file=out, flush=True)
            continue
        if not line:
            continue
        if line.startswith("/"):
            command, *args = line[1:].split()
            if command in ("exit", "quit"):
                return 0
            if command == "reset":
                chat.reset()
                print("(conversation cleared)", file=out, flush=True)
            elif command == "set" and len(args) == 2:
                try:
                    chat.set(*args)
                    print(f"({args[0]} = {getattr(chat.settings, args[0])})", file=out, flush=True)
                except ValueError as e:
                    print(f"({e})", file=out, flush=True)
            elif command == "settings":
                print(f"({chat.settings.describe()})", file=out, flush=True)
            else:
                print(HELP, file=out, flush=True)
            continue
        before = chat.dropped_turns
        out.write("assistant> ")
        out.flush()
        answer(line)
        if chat.dropped_turns > before:
            print(
                f"(the oldest {chat.dropped_turns - before} turn(s) no longer fit the "
                "context and were dropped)",
                file=out,
                flush=True,
            )

"""`forge chat`: the multi-turn prompt, context fitting, streaming, commands, a real terminal.

The model is the tiny GPT fine-tuned (in test_finetune.taught_workdir) to answer every
instruction with "Forty-two is the answer.", so a reply's content can be checked.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from test_finetune import ANSWER, taught_workdir

from model.chat import STOP_STRINGS, Chat, GenerationSettings, chat_prompt, run_chat
from model.generate import TextStream
from model.gpt import GPT
from model.inference import format_prompt, load_model
from pipeline.encoding import EOT_ID, get_encoding

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def enc():
    return get_encoding(str(VOCAB))


@pytest.fixture(scope="module")
def taught(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return taught_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def model(taught: Path) -> GPT:
    return load_model(taught)[0]


def test_first_turn_is_the_training_prompt(enc) -> None:
    assert chat_prompt([], "Name a fruit.") == format_prompt("Name a fruit.")
    two = chat_prompt([("Name a fruit.", "Apple.")], "Another?")
    assert two.startswith(format_prompt("Name a fruit.") + "Apple.\n\n### Instruction:\n")
    assert two.endswith("### Instruction:\nAnother?\n\n### Response:\n")
    assert two.count("Below is an instruction") == 1


def test_greedy_reply_streams_with_the_kv_cache(model: GPT, enc) -> None:
    chat = Chat(model, enc, GenerationSettings(temperature=0, max_new_tokens=12))
    lengths: list[int] = []
    hook = model.register_forward_hook(lambda m, args, out: lengths.append(args[0].size(1)))
    pieces: list[str] = []
    try:
        assert chat.reply("Name item 3: cloud sand", pieces.append) == ANSWER
    finally:
        hook.remove()
    assert "".join(pieces) == ANSWER and len(pieces) > 3  # token by token, not at the end
    prompt = enc.encode_ordinary(format_prompt("Name item 3: cloud sand"))
    assert lengths[0] == len(prompt) and set(lengths[1:]) == {1}  # prefill, then one token each
    # the same answer as greedy full forwards without a cache
    seq = list(prompt)
    while seq[-1] != EOT_ID and len(seq) < len(prompt) + 12:
        seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert enc.decode(seq[len(prompt) : -1]) == ANSWER
    assert chat.turns == [("Name item 3: cloud sand", ANSWER)]


def test_oldest_turns_are_dropped_to_fit(model: GPT, enc) -> None:
    chat = Chat(model, enc, GenerationSettings(max_new_tokens=40))
    budget = model.config.block_size - 40
    chat.turns = [(f"question {i} " + "word " * 10, f"answer {i}") for i in range(6)]
    ids = chat.prompt_ids("the newest question")
    assert len(ids) <= budget and chat.dropped_turns > 0
    assert [u.split()[1] for u, _ in chat.turns] == [str(i) for i in range(chat.dropped_turns, 6)]
    assert enc.decode(ids).endswith("### Instruction:\nthe newest question\n\n### Response:\n")
    chat.reset()
    ids = chat.prompt_ids("x " * 500)  # too long even alone: its end is kept
    assert len(ids) == budget and enc.decode(ids).endswith("\n\n### Response:\n")


def test_stop_strings_and_split_characters(enc) -> None:
    """The chat's text stream: cut at the model's own next instruction, whole characters only."""

    def streamed(text: str) -> list[str]:
        stream = TextStream(enc, STOP_STRINGS)
        pieces = [stream.push(t) for t in enc.encode_ordinary(text)] + [stream.close().rstrip()]
        return [p for p in pieces if p]

    assert "".join(streamed("Paris.\n\n### Instruction:\nAnd Rome?")) == "Paris."
    assert "".join(streamed("Use ## for a heading")) == "Use ## for a heading"
    text = "Use ## for a heading: naïve 日本 🎉"
    tokens = enc.encode_ordinary(text)

    def partial(token: int) -> bool:
        try:
            enc.decode_single_token_bytes(token).decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False

    assert any(partial(t) for t in tokens)  # some character spans tokens
    pieces = streamed(text)
    assert "".join(pieces) == text and len(pieces) > 3 and all("\ufffd" not in p for p in pieces)


def test_settings_parse_and_validate() -> None:
    s = GenerationSettings()
    s.set("temperature", "0.2")
    s.set("top_k", "none")
    s.set("max_new_tokens", "64")
    assert (s.temperature, s.top_k, s.max_new_tokens) == (0.2, None, 64)
    for name, value, needle in [
        ("temperature", "-1", ">= 0"),
        ("top_p", "1.5", r"\(0, 1\]"),
        ("top_k", "x", "takes a whole number"),
        ("beam", "2", "unknown"),
    ]:
        with pytest.raises(ValueError, match=needle):
            s.set(name, value)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)


def test_commands(model: GPT, enc) -> None:
    lines = iter(
        [
            "Name item 5: apple sand",
            "/set temperature 0.5",
            "/set top_p 2",
            "/settings",
            "/reset",
            "/bogus",
            "/help",
            "/",
            "/exit",
            "never read",
        ]
    )
    out = io.StringIO()
    chat = Chat(model, enc, GenerationSettings(temperature=0, max_new_tokens=12, seed=1))
    assert run_chat(chat, read=lambda prompt: next(lines), out=out) == 0
    text = out.getvalue()
    assert f"assistant> {ANSWER}\n" in text
    assert "(temperature = 0.5)" in text and "top_p must be in (0, 1]" in text
    assert "temperature 0.5, top_k None" in text and "(conversation cleared)" in text
    assert "/reset" in text.split("cleared")[1]  # the help
    assert text.count("(unknown command or arguments: /bogus; the commands are below)") == 1
    assert text.count("unknown command") == 2 and text.count("/settings ") == 3  # `/`, /help
    assert chat.turns == [] and chat.settings.temperature == 0.5


def test_prompt_answers_once(taught: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "chat",
            str(taught),
            "--prompt",
            "Name item 7: river stone",
            "--temperature",
            "0",
            "--vocab-dir",
            str(VOCAB),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ANSWER + "\n"


def test_interactive_chat_in_a_terminal(taught: Path) -> None:
    """Drive `forge chat` through a real pseudo-terminal: banner, a reply, commands, /exit."""
    import pexpect
    child = pexpect.spawn(
        sys.executable,
        ["-m", "cli.main", "chat", str(taught), "--temperature", "0", "--max-new-tokens", "16"],
        cwd=str(REPO),
        env={**os.environ, "FORGE_VOCAB_DIR": str(VOCAB)},
        encoding="utf-8",
        timeout=90,
    )
    try:
        child.expect("/exit to quit")
        child.expect("you> ")
        child.sendline("Name item 9: sand light")
        child.expect_exact(f"assistant> {ANSWER}")
        child.expect("you> ")
        child.sendline("/set temperature 0.9")
        child.expect_exact("(temperature = 0.9)")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0

"""`forge serve-chat`: the real command on a free loopback port, spoken to by real clients.

Two servers run for the module: the tiny GPT fine-tuned (test_finetune.taught_workdir) to answer
every instruction with "Forty-two is the answer." (so an answer's content can be checked), behind
an API key; and an untrained GPT with a 1,024-token context whose weights are scaled up so that
its greedy continuations differ from prompt to prompt (so answers mixed up between clients would
show) and run long (so a client can leave mid-stream).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from test_finetune import ANSWER, taught_workdir

from model.checkpoint import PRETRAIN_FORMAT, CheckpointManager
from model.gpt import GPT, GPTConfig
from model.inference import PREAMBLE, format_chat, format_prompt
from pipeline.encoding import get_encoding

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
QUESTION = "Name item 3: cloud sand"


class Server:
    """A `forge serve-chat` subprocess; `url` once it answers /health."""

    def __init__(self, checkpoint: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve-chat", str(checkpoint), "--port", "0",
             "--device", "cpu", "--vocab-dir", str(VOCAB), *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        lines = []
        while "chat page" not in (line := self.proc.stdout.readline()):
            lines.append(line)
            if not line:  # it exited
                raise AssertionError(f"serve-chat did not start:\n{''.join(lines)}")
        self.url = line.split("chat page ")[1].split()[0].rstrip("/")
        self.host, self.port = self.url.removeprefix("http://").split(":")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # drain the logs

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as response:
            return json.load(response)

    def post(self, path: str, body: bytes | dict, headers: dict | None = None
             ) -> tuple[int, dict]:
        """One request on a fresh connection: (status, JSON body)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
        try:
            conn.request("POST", path, data, {"Content-Type": "application/json",
                                              "Authorization": f"Bearer {KEY}",
                                              **(headers or {})})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def enc():
    return get_encoding(str(VOCAB))


@pytest.fixture(scope="module")
def taught_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(taught_workdir(tmp_path_factory), "--api-key", KEY)
    yield server
    server.close()


def chaotic_checkpoint(path: Path) -> Path:
    """An untrained GPT whose large weights make greedy text depend strongly on the prompt."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=1024))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    state = {"format": PRETRAIN_FORMAT, "version": 1, "step": 0, "model": model.state_dict(),
             "model_config": dataclasses.asdict(model.config)}
    return CheckpointManager(path).save(0, state)


@pytest.fixture(scope="module")
def chaotic_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(chaotic_checkpoint(tmp_path_factory.mktemp("chaotic")), "--api-key", KEY)
    yield server
    server.close()


def stream_completion(server: Server, body: dict) -> tuple[str, list[dict]]:
    """A streamed /v1/completions request read to `data: [DONE]`: (text, chunks)."""
    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=120)
    try:
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        chunks, done = [], False
        for line in response:
            line = line.decode().strip()
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                break
            chunks.append(json.loads(line[6:]))
        assert done, "the stream ended without data: [DONE]"
        return "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), chunks
    finally:
        conn.close()


# ---------------------------------------------------------------- the prompt format


def test_chat_messages_become_the_training_prompt() -> None:
    one = [{"role": "user", "content": QUESTION}]
    assert format_chat(one) == format_prompt(QUESTION)  # what fine-tuning trained on
    two = format_chat([*one, {"role": "assistant", "content": ANSWER},
                       {"role": "user", "content": "And item 4?"}])
    assert two == format_prompt(QUESTION) + ANSWER + "\n\n" + (
        "### Instruction:\nAnd item 4?\n\n### Response:\n")
    system = format_chat([{"role": "system", "content": "Be brief."}, *one])
    assert system.startswith("Be brief.\n\n### Instruction:") and PREAMBLE not in system
    for bad, needle in [
        ([], "at least one user"),
        ([{"role": "assistant", "content": "hi"}], "messages[0] has role 'assistant'"),
        ([*one, *one], "messages[1] has role 'user'"),
        ([*one, {"role": "assistant", "content": "x"}], "last message must be the user's"),
    ]:
        with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            format_chat(bad)


# ---------------------------------------------------------------- the official client


def test_openai_client_chat_stream_and_completion(taught_server: Server, enc) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=taught_server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["forge"]
    messages = [{"role": "user", "content": QUESTION}]
    prompt_tokens = len(enc.encode_ordinary(format_prompt(QUESTION)))

    reply = client.chat.completions.create(model="forge", messages=messages, temperature=0,
                                           max_tokens=20)
    assert reply.choices[0].message.content == ANSWER
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == prompt_tokens
    assert 0 < reply.usage.completion_tokens <= 20
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model="forge", messages=messages, temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    pieces = [p for p in pieces if p]
    assert "".join(pieces) == ANSWER and len(pieces) > 3  # token by token, not at the end
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.prompt_tokens == prompt_tokens

    short = client.chat.completions.create(model="forge", messages=messages, temperature=0,
                                           max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert ANSWER.startswith(short.choices[0].message.content)

    plain = client.completions.create(model="forge", prompt=format_prompt(QUESTION),
                                      temperature=0, max_tokens=20, seed=1)
    assert plain.choices[0].text.startswith(ANSWER)
    assert plain.usage.prompt_tokens == prompt_tokens
    stopped = client.completions.create(model="forge", prompt=format_prompt(QUESTION),
                                        temperature=0, max_tokens=20, stop=[" is"])
    assert stopped.choices[0].text == "Forty-two" and stopped.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------- batching


def test_concurrent_streams_each_get_their_own_answer(chaotic_server: Server) -> None:
    bodies = [{"model": "forge", "prompt": f"Client {i} asks about {i * 7} apples.",
               "max_tokens": 24, "temperature": 0, "seed": i} for i in range(16)]
    alone = [stream_completion(chaotic_server, body)[0] for body in bodies]
    assert len(set(alone)) == 16  # distinct answers: a mix-up would show
    before = chaotic_server.health()

    together: list[str | None] = [None] * 16
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def client(i: int) -> None:
        try:
            start.wait()
            together[i] = stream_completion(chaotic_server, bodies[i])[0]
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert together == alone
    after = chaotic_server.health()
    assert after["served"] - before["served"] == 16
    assert after["batches"] - before["batches"] < 16  # clients shared forward passes


def test_disconnecting_client_frees_its_slot(chaotic_server: Server) -> None:
    before = chaotic_server.health()
    conn = http.client.HTTPConnection(chaotic_server.host, int(chaotic_server.port), timeout=60)
    conn.request("POST", "/v1/completions",
                 json.dumps({"model": "forge", "prompt": "Tell a long story.", "max_tokens": 1000,
                             "stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the answer has started
    other: list[str] = []
    neighbour = threading.Thread(target=lambda: other.append(stream_completion(
        chaotic_server, {"model": "forge", "prompt": "Hello", "max_tokens": 40,
                         "temperature": 0})[0]))
    neighbour.start()
    response.close()
    conn.close()  # the client leaves mid-stream
    neighbour.join(60)
    assert other and other[0]  # the other client was served in full
    deadline = time.monotonic() + 30
    while (stats := chaotic_server.health())["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["running"] == 0 and stats["queued"] == 0
    assert stats["cancelled"] == before["cancelled"] + 1  # stopped early, not run to 1,000
    assert stats["served"] == before["served"] + 1


# ---------------------------------------------------------------- bad input


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    taught_server: Server,
) -> None:
    ok = {"model": "forge", "messages": [{"role": "user", "content": QUESTION}],
          "temperature": 0, "max_tokens": 20}
    cases = [
        (b'{"model": "forge", "messages": [', {}, 400, None, "invalid_json"),
        (json.dumps({**ok, "pad": "x" * (1 << 20)}).encode(), {}, 413, None,
         "request_too_large"),
        ({**ok, "model": "gpt-4"}, {}, 404, "model", "model_not_found"),
        ({**ok, "max_tokens": -5}, {}, 400, "max_tokens", "invalid_value"),
        ({**ok, "max_tokens": 10**9}, {}, 400, "max_tokens", "context_length_exceeded"),
        ({**ok, "temperature": "hot"}, {}, 400, "temperature", "invalid_value"),
        ({**ok, "messages": [{"role": "user", "content": "word " * 400}]}, {}, 400,
         "messages", "context_length_exceeded"),
        ({**ok, "messages": [{"role": "assistant", "content": "hi"}]}, {}, 400, "messages",
         None),
        ({k: v for k, v in ok.items() if k != "messages"}, {}, 400, "messages",
         "invalid_value"),
        (ok, {"Authorization": "Bearer wrong"}, 401, None, "invalid_api_key"),
        (ok, {"Authorization": ""}, 401, None, "invalid_api_key"),
    ]
    for body, headers, status, param, code in cases:
        got, error = taught_server.post("/v1/chat/completions", body, headers)
        assert got == status, (body if isinstance(body, bytes) else body.keys(), error)
        assert set(error["error"]) == {"message", "type", "param", "code"}, error
        assert error["error"]["param"] == param and error["error"]["code"] == code, error
        assert error["error"]["message"]
    for prompt, code in [("x" * 2000, "context_length_exceeded"), ([], None), ([60000], None)]:
        got, error = taught_server.post("/v1/completions", {"model": "forge", "prompt": prompt})
        assert got == 400 and error["error"]["code"] == code, error
        assert error["error"]["param"] == "prompt", error
    got, answer = taught_server.post("/v1/chat/completions", ok)
    assert got == 200 and answer["choices"][0]["message"]["content"] == ANSWER


def test_page_is_self_contained(taught_server: Server) -> None:
    with urllib.request.urlopen(taught_server.url + "/", timeout=10) as response:
        page = response.read().decode()
    assert response.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page and "getReader" in page
    assert "http://" not in page and "https://" not in page  # no CDN, no web font


# ---------------------------------------------------------------- a real browser


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise AssertionError("Chromium is missing: `apt-get install -y chromium` (see README)")
    return path


@pytest.mark.slow
def test_browser_chats_with_streamed_answer(taught_server: Server, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True,
                                    args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(taught_server.url + "/")
        page.get_by_text("Settings").click()
        page.fill("#api_key", KEY)
        page.dispatch_event("#api_key", "change")
        expect(page.locator("#model")).to_contain_text("forge · context 128")
        page.fill("#temperature", "0")
        # record every text the answer bubble is given, to see it arrive in pieces: from the
        # mutation records, not the bubble's text when the observer runs, since the browser
        # may hand the page several events in one network read and one observer call
        page.evaluate("""() => {
            window.seen = [];
            new MutationObserver(records => {
                for (const r of records) {
                    if (!r.target.classList?.contains('assistant')) continue;
                    for (const n of r.addedNodes) {
                        if (n.nodeType === Node.TEXT_NODE && n.data !== window.seen.at(-1))
                            window.seen.push(n.data);
                    }
                }
            }).observe(document.getElementById('log'), {childList: true, subtree: true});
        }""")
        page.locator("#input").click()
        page.keyboard.type(QUESTION)
        page.keyboard.press("Enter")
        expect(page.locator(".assistant")).to_have_text(ANSWER, timeout=30_000)
        expect(page.locator("#send")).to_be_enabled()
        seen = page.evaluate("window.seen")
        assert len(seen) > 3 and seen[-1] == ANSWER  # streamed: it grew piece by piece
        assert all(ANSWER.startswith(s) for s in seen)
        page.keyboard.type("And item 4?")  # a second turn: the conversation so far is sent
        page.keyboard.press("Enter")
        expect(page.locator(".assistant")).to_have_count(2)
        expect(page.locator(".assistant").nth(1)).to_have_text(ANSWER, timeout=30_000)
        # a turn that fits the 128-token context alone but not after the others: the page
        # drops the oldest turns, as `forge chat` does, and says so
        page.keyboard.type("Repeat: " + "word " * 50)
        page.keyboard.press("Enter")
        expect(page.locator(".note").first).to_contain_text("oldest turn no longer fits")
        expect(page.locator(".assistant")).to_have_count(3, timeout=30_000)
        expect(page.locator("#send")).to_be_enabled(timeout=30_000)
        page.screenshot(path=str(tmp_path / "chat.png"))
        page.get_by_role("button", name="New chat").click()
        expect(page.locator(".assistant")).to_have_count(0)
        browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 1000


@pytest.mark.slow
def test_browser_stop_button_ends_the_answer(chaotic_server: Server) -> None:
    from playwright.sync_api import expect, sync_playwright

    before = chaotic_server.health()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True,
                                    args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(chaotic_server.url + "/")
        page.get_by_text("Settings").click()
        page.fill("#api_key", KEY)
        page.dispatch_event("#api_key", "change")
        expect(page.locator("#model")).to_contain_text("context 1024")
        page.locator("#input").fill("Tell me a very long story.")  # ~1,000 tokens if let run
        page.keyboard.press("Enter")
        expect(page.locator(".assistant")).not_to_have_text("", timeout=30_000)
        page.get_by_role("button", name="Stop").click()
        expect(page.locator(".note")).to_have_text("(stopped)")
        expect(page.locator("#send")).to_be_enabled()
        browser.close()
    deadline = time.monotonic() + 30
    while (stats := chaotic_server.health())["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["cancelled"] == before["cancelled"] + 1  # the server stopped generating too

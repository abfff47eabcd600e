"""`forge serve-chat`: a web chat page and an OpenAI-compatible API over one loaded model.

One process loads the model once. HTTP requests are validated here, turned into token
prompts (chat messages through format_chat, the prompt format fine-tuning trains on) and
handed to one batching worker thread: it waits for a request, collects every other request
that arrives within a short window (`window_s`), and answers them together with
Engine.generate, so concurrent clients share forward passes. Each generated token goes back to
its client's asyncio queue as it comes; a client that disconnects has its row cancelled at
the next token, freeing the slot for the others.

Endpoints: GET / (the chat page, model/web/chat.html), GET /v1/models,
POST /v1/chat/completions, POST /v1/completions (both streamed as server-sent events ending
with `data: [DONE]`, or not), GET /health. Errors have OpenAI's shape:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from model.generate import Completion, Engine, SamplingParams, TextStream
from model.generate import Request as EngineRequest
from model.inference import STOP_STRINGS, format_chat

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024  # far more than any prompt that fits a GPT-2 context
MAX_STOP = 4  # as OpenAI
WINDOW_S = 0.02  # how long the worker waits for more requests to batch with the first
MAX_BATCH = 32  # most requests answered together


# ---------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's shape; `param` names the offending request field."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's list of validation errors as one OpenAI error naming the first bad field."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}",
                        code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    where = f"{param}: " if param else ""
    return APIError(400, f"{where}{first.get('msg')}", param=param, code="invalid_value")


class BodyLimit:
    """ASGI middleware refusing request bodies over `limit` bytes (413), declared or streamed."""

    class TooLarge(Exception):
        pass

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = APIError(413, f"the request body is over {self.limit} bytes",
                         code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await error.response()(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyLimit.TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except BodyLimit.TooLarge:
            await error.response()(scope, receive, send)


# ---------------------------------------------------------------- request bodies


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    """The fields both endpoints share (top_k is an extension). A field left out takes the
    Engine's default (SamplingParams), which differs from OpenAI's where a small model needs
    it: a frequency penalty and top-p keep it out of loops. Unknown fields are ignored, as
    OpenAI clients send many that do not change the answer (user, metadata, ...)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP or not all(stops):
            raise APIError(400, f"stop takes at most {MAX_STOP} non-empty strings",
                           param="stop")
        return tuple(stops)


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name


class CompletionBody(Sampling):
    prompt: str | list[int]
    echo: bool = False


# ---------------------------------------------------------------- the batching worker


@dataclass
class Job:
    """One request on its way through the worker; tokens come back on `events`."""

    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def put(self, kind: str, value: Any) -> None:
        """Called from the worker thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class BatchWorker(threading.Thread):
    """Collects the requests arriving within `window_s` of the first and runs them as one
    batch through Engine.generate; a cancelled job's row stops at its next token."""

    def __init__(self, engine: Engine, window_s: float = WINDOW_S,
                 max_batch: int = MAX_BATCH) -> None:
        super().__init__(name="forge-batcher", daemon=True)
        self.engine, self.window_s, self.max_batch = engine, window_s, max_batch
        self.pending: queue.Queue[Job | None] = queue.Queue()
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "batches": 0, "running": 0}
        self.lock = threading.Lock()

    def submit(self, job: Job) -> None:
        self.pending.put(job)

    def stop(self) -> None:
        self.pending.put(None)

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {**self.counts, "queued": self.pending.qsize()}

    def _count(self, **deltas: int) -> None:
        with self.lock:
            for key, delta in deltas.items():
                self.counts[key] += delta

    def run(self) -> None:
        while (first := self.pending.get()) is not None:
            batch = [first]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    job = self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.pending.put(None)  # stop after this batch
                    break
                batch.append(job)
            dropped = [job for job in batch if job.cancelled]  # gone while queued
            batch = [job for job in batch if not job.cancelled]
            self._count(cancelled=len(dropped))
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        def on_token(row: int, token: int) -> bool:
            job = batch[row]
            if not job.cancelled:
                job.put("token", token)
            return not job.cancelled

        self._count(batches=1, running=len(batch))
        try:
            completions = self.engine.generate([job.request for job in batch], on_token)
        except Exception as e:  # noqa: BLE001 - every client of the batch hears of it
            log.exception("generation failed")
            self._count(failed=len(batch), running=-len(batch))
            for job in batch:
                job.put("error", e)
            return
        cancelled = sum(c.finish_reason == "cancelled" for c in completions)
        self._count(running=-len(batch), cancelled=cancelled, served=len(batch) - cancelled)
        for job, completion in zip(batch, completions, strict=True):  # counted before told
            job.put("done", completion)


# ---------------------------------------------------------------- the app


class ChatServer:
    """The FastAPI app over one model: validation, prompts, the worker, the responses."""

    def __init__(
        self,
        engine: Engine,
        encoding: Any,
        block_size: int,
        model_name: str = "forge",
        api_key: str | None = None,
        window_s: float = WINDOW_S,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.enc, self.block_size = encoding, block_size
        self.model_name, self.api_key = model_name, api_key
        self.created = int(time.time())
        self.worker = BatchWorker(engine, window_s=window_s, max_batch=max_batch)
        self.app = self._build_app()

    # -- plumbing

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="forge serve-chat", docs_url=None, redoc_url=None,
                      openapi_url=None, lifespan=self._lifespan)
        app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

        @app.exception_handler(APIError)
        async def api_error(request: Request, exc: APIError) -> JSONResponse:
            return exc.response()

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            return _validation_error(exc).response()

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            return APIError(exc.status_code, str(exc.detail), code=code).response()

        app.get("/", response_class=HTMLResponse)(self.page)
        app.get("/health")(self.health)
        app.get("/v1/models")(self.models)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.post("/v1/completions")(self.completions)
        return app

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.worker.start()
        yield
        self.worker.stop()

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(401, "incorrect or missing API key: send 'Authorization: Bearer KEY' "
                           "with the key given to forge serve-chat --api-key",
                           code="invalid_api_key")

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server has "
                           f"{self.model_name!r}", param="model", code="model_not_found")

    # -- endpoints

    async def page(self) -> HTMLResponse:
        return HTMLResponse(resources.files("model").joinpath("web/chat.html").read_text())

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, **self.worker.stats()}

    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created,
            "owned_by": "forge", "context_length": self.block_size}]}

    async def chat_completions(self, body: ChatBody, request: Request) -> Response:
        self._authorize(request)
        self._check_model(body.model)
        try:
            text = format_chat([m.model_dump() for m in body.messages])
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        prompt = self.enc.encode_ordinary(text)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await self._answer(body, prompt, max_tokens, "messages", chat=True)

    async def completions(self, body: CompletionBody, request: Request) -> Response:
        self._authorize(request)
        self._check_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompt = body.prompt  # token ids as they are: Engine.check vets them
        if isinstance(prompt, str):
            prompt = self.enc.encode_ordinary(prompt)
        return await self._answer(body, prompt, body.max_tokens, "prompt", chat=False)

    # -- answering

    def _params(self, body: Sampling, prompt: list[int], max_tokens: int | None,
                prompt_field: str, stops: tuple[str, ...]) -> SamplingParams:
        room = self.block_size - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context is "
                           f"{self.block_size}, which leaves no room for an answer",
                           param=prompt_field, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + the prompt's {len(prompt)} tokens "
                           f"exceed this model's context of {self.block_size}; at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        given = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                 "frequency_penalty": body.frequency_penalty,
                 "presence_penalty": body.presence_penalty, "seed": body.seed}
        return SamplingParams(max_tokens=max_tokens or room, stop=stops,
                              **{k: v for k, v in given.items() if v is not None})

    async def _answer(self, body: Sampling, prompt: list[int], max_tokens: int | None,
                      prompt_field: str, chat: bool) -> Response:
        stops = body.stops() + (STOP_STRINGS if chat else ())
        params = self._params(body, prompt, max_tokens, prompt_field, stops)
        wanted = EngineRequest(prompt=prompt, params=params)
        try:  # what the Engine would refuse must not fail the batch it joins
            self.worker.engine.check(0, wanted)
        except ValueError as e:
            raise APIError(400, str(e).removeprefix("request 0: "), param=prompt_field) from None
        job = Job(wanted, asyncio.get_running_loop())
        self.worker.submit(job)
        reply = Reply(self, job, body.model, chat, stops)
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(reply.events(usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            completion = await reply.result()
        finally:
            job.cancelled = True  # a no-op once done; frees the row if we were cancelled
        return JSONResponse(reply.body(completion))

    def serve(self, host: str, port: int, what: str = "") -> None:
        """Run until interrupted; prints where the page and the API are."""
        import uvicorn

        sock = _listen(host, port)
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{sock.getsockname()[1]}"
        print(f"forge serve-chat: {what} as model {self.model_name!r}; chat page {url}/ , "
              f"OpenAI API {url}/v1 (Ctrl-C stops)", flush=True)
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2)
        uvicorn.Server(config).run(sockets=[sock])


class Reply:
    """The answer to one request, as an OpenAI response body or a stream of SSE chunks."""

    def __init__(self, server: ChatServer, job: Job, model: str, chat: bool,
                 stops: tuple[str, ...]) -> None:
        self.job, self.model, self.chat = job, model, chat
        self.stream = TextStream(server.enc, stops)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    async def result(self) -> Completion:
        while True:
            kind, value = await self.job.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise APIError(500, f"generation failed: {value}", type="server_error")

    def _final(self, text: str) -> str:
        """A chat answer ends without the blank lines the prompt format puts before a turn
        (as in `forge chat`); a plain completion is left as generated."""
        return text.rstrip() if self.chat else text

    def _usage(self, completion: Completion) -> dict[str, int]:
        made = len(completion.tokens)
        return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": made,
                "total_tokens": completion.prompt_tokens + made}

    def _choice(self, text: str | None, finish: str | None, stream: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        key = "delta" if stream else "message"
        content = {} if text is None else {"content": text}
        if not stream:
            content["role"] = "assistant"
        return {"index": 0, key: content, "logprobs": None, "finish_reason": finish}

    def body(self, completion: Completion) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model,
                "choices": [self._choice(self._final(completion.text), completion.finish_reason,
                                         False)],
                "usage": self._usage(completion)}

    def _chunk(self, choice: dict | None, usage: dict | None = None) -> str:
        obj = self.object + (".chunk" if self.chat else "")
        data = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [] if choice is None else [choice]}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        try:
            if self.chat:
                yield self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None})
            while True:
                kind, value = await self.job.events.get()
                if kind == "token":
                    if delta := self.stream.push(value):
                        yield self._chunk(self._choice(delta, None, True))
                elif kind == "error":
                    error = APIError(500, f"generation failed: {value}", type="server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    break
                else:
                    if rest := self._final(self.stream.close()):
                        yield self._chunk(self._choice(rest, None, True))
                    yield self._chunk(self._choice(None, value.finish_reason, True))
                    if include_usage:
                        yield self._chunk(None, self._usage(value))
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancelled = True  # the client went away (or we are done): free the row


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: any free port), IPv4 or IPv6."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((host, port), family=family)
    sock.set_inheritable(True)
    return sock


def serve_chat(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    device: str = "cpu",
    model_name: str = "forge",
    vocab_dir: str | None = None,
    max_batch: int = MAX_BATCH,
) -> None:
    """Load the model once and serve the page and the API until interrupted."""
    from model.inference import load_model, vocab_dir_for
    from pipeline.encoding import get_encoding

    model, state = load_model(checkpoint, device=device)
    enc = get_encoding(vocab_dir_for(state, vocab_dir))
    engine = Engine(model, enc, device)
    server = ChatServer(engine, enc, model.config.block_size, model_name, api_key,
                        max_batch=max_batch)
    server.serve(host, port, f"{state['path']} on {device}")

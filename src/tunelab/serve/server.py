"""`tunelab serve`: an OpenAI-compatible HTTP API.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions,
GET /health (no key). One process, one base model, any number of LoRA adapters.

The request path, top to bottom:
1. `Guard` (ASGI middleware) checks the API key from the headers and the declared body
   size before a byte of the body is read; a body that grows past the cap is cut at 413.
2. The body is validated against `protocol` (400 in OpenAI's error shape, never 422).
3. The prompt is tokenized on a worker thread, so a huge prompt never stalls the event loop.
4. Each choice becomes a `Job` for the `Batcher`, whose thread runs continuous batching
   over every concurrent request (batching.py); a full queue answers 429.
5. Tokens come back through an asyncio queue, are detokenized incrementally and cut at
   stop strings. A client that goes away (streaming or not), a stop string or the
   per-request timeout cancel the job: its row leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException

from tunelab.data.types import Message
from tunelab.errors import TunelabError
from tunelab.serve.batching import Job, QueueFull, make_batcher
from tunelab.serve.engine import Engine
from tunelab.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    error_response,
    validation_message,
)

DEFAULT_MAX_TOKENS = 512  # when a chat request names no max_tokens (and the context leaves room)
OPEN_PATHS = frozenset({"/health"})


@dataclass
class Limits:
    max_body_bytes: int = 4 * 2**20  # 4 MiB: ~1M tokens of text, far above any context
    max_batch: int = 32  # rows decoded together
    max_waiting: int = 256  # requests (choices) queued before 429
    request_timeout: float = 600.0  # seconds from arrival to the last token
    docs: bool = False  # serve /docs and /openapi.json (behind the key when there is one)
    kv_slots: bool | None = None  # the GPU's static-slot batcher (SlotBatcher): None = where it applies


# --- the gate: key and body size before the body is read -------------------------------------


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server accepts ({limit} bytes); "
                              f"send a shorter prompt or start the server with a larger --max-body-mb")


class Guard:
    """ASGI middleware: 401 without a valid key and 413 for an oversized body, both decided
    from the headers alone (a body read only to be refused costs memory: issue 21)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not self.key_ok(headers.get("authorization", "")):
            return await error_response(401, "invalid or missing API key: send the header "
                                             "`Authorization: Bearer <key>`", "authentication_error",
                                        code="invalid_api_key")(scope, receive, send)
        declared = headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            return await error_response(413, BodyTooLarge(self.max_body_bytes).detail,
                                        code="request_too_large")(scope, receive, send)
        received = 0

        async def capped_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:  # chunked bodies declare no length
                raise BodyTooLarge(self.max_body_bytes)
            return message

        await self.app(scope, capped_receive, send)

    def key_ok(self, authorization: str) -> bool:
        if self.api_key is None:
            return True
        token = authorization[7:] if authorization.lower().startswith("bearer ") else ""
        return secrets.compare_digest(token.encode(), self.api_key.encode())


# --- text out: incremental detokenization and stop strings -----------------------------------


class Detokenizer:
    """Token ids -> text deltas, as TGI/vLLM do it: decode a short window and emit only what
    is new, holding back a trailing U+FFFD until the character split across tokens is whole."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.prefix, self.read = tokenizer, [], 0, 0

    def add(self, token: int) -> str:
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.tokens[self.prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return now[len(before):]

    def flush(self) -> str:
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.tokens[self.prefix:], skip_special_tokens=True)
        self.prefix = self.read = len(self.tokens)
        return now[len(before):]


class StopMatcher:
    """Cut a text stream at the first stop string, holding back any tail that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text safe to emit now; sets `stopped` once a stop string appears."""
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Choice:
    """One completion being generated: its job in the batcher and its text on the way out."""

    def __init__(self, server: Server, prompt: list[int], options, adapter: str | None, stops: list[str]):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple) -> None:  # called on the batcher's thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
                loop.call_soon_threadsafe(self.events.put_nowait, event)

        self.job = Job(prompt=prompt, options=options, emit=emit, adapter=adapter,
                       deadline=time.monotonic() + server.limits.request_timeout,
                       stop_ids=frozenset(server.engine.stop_ids))
        self.detokenizer = Detokenizer(server.engine.tokenizer)
        self.matcher = StopMatcher(stops)
        self.engine = server.engine
        self.text = ""
        self.finish_reason: str | None = None

    async def deltas(self) -> AsyncIterator[str]:
        """Text as it is generated, cut at stop strings; the job is cancelled on any exit."""
        try:
            while self.finish_reason is None:
                kind, value = await self.events.get()
                if kind == "error":
                    raise job_error(value)
                text = self.detokenizer.add(value) if kind == "token" else self.detokenizer.flush()
                out = self.matcher.feed(text)
                if self.matcher.stopped:
                    self.finish_reason = "stop"
                elif kind == "done":
                    out += self.matcher.flush()
                    self.finish_reason = "stop" if value == "cancelled" else value
                if out:
                    self.text += out
                    yield out
        finally:
            self.job.cancel()

    async def run(self) -> str:
        async for _ in self.deltas():
            pass
        return self.text

    def completion_tokens(self) -> int:
        # Cut at a stop string, the text is shorter than what was generated: count what is sent.
        return self.engine.count_tokens(self.text) if self.matcher.stopped else len(self.job.tokens)


def job_error(reason: str) -> APIError:
    if reason == "timeout":
        return APIError(408, "the request took longer than this server's --request-timeout", "timeout_error",
                        code="request_timeout")
    return APIError(500, reason, "server_error")


# --- the server ---------------------------------------------------------------------------------


class Server:
    def __init__(self, engine: Engine, limits: Limits):
        self.engine, self.limits = engine, limits
        self.batcher = make_batcher(engine, max_batch=limits.max_batch, max_waiting=limits.max_waiting,
                                    slots=limits.kv_slots)
        # One thread: transformers' fast tokenizers are not safe to call from several at once.
        self.tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunelab-tokenize")
        self.created = int(time.time())

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn, *args)

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "tunelab"}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card(name) for name in self.engine.model_names()]}

    def adapter_of(self, model: str) -> str | None:
        if model not in self.engine.model_names():
            raise APIError(404, f"the model {model!r} does not exist; this server has: "
                                f"{', '.join(self.engine.model_names())}", param="model", code="model_not_found")
        return None if model == self.engine.base_name else model

    # --- prompts -----------------------------------------------------------------------------

    def chat_prompt(self, req: ChatRequest) -> list[int]:
        # OpenAI's `developer` role is the system prompt of newer models.
        messages = [Message("system" if m.role == "developer" else m.role, m.text()) for m in req.messages]
        try:
            return self.engine.encode(messages)
        except TunelabError as exc:
            roles = sorted({m.role for m in messages})
            raise APIError(400, f"{exc.what} (message roles: {', '.join(roles)}; this model's chat template "
                                f"decides which roles it renders)", param="messages") from None

    def text_prompts(self, req: CompletionRequest) -> list[list[int]]:
        vocab = len(self.engine.tokenizer)
        prompts = []
        for i, p in enumerate(req.prompts()):
            if isinstance(p, list):
                if any(not 0 <= t < vocab for t in p):
                    raise APIError(400, f"prompt[{i}] holds token ids outside the vocabulary (0..{vocab - 1})",
                                   param="prompt")
                prompts.append(p)
            else:
                prompts.append(self.engine.encode_text(p))
        return prompts

    def options(self, req: Sampling, prompt_len: int, wanted: int | None, default: int | None):
        """Generation options for one prompt, or a 400 when it leaves no room in the context."""
        from tunelab.model.generate import GenerationOptions

        room = self.engine.room_for(prompt_len)
        if room <= 0 or (wanted is not None and wanted > room):
            asked = wanted if wanted is not None else 1
            raise APIError(400, f"This model's maximum context length is {self.engine.context_length} tokens. "
                                f"However, you requested {prompt_len + asked} tokens ({prompt_len} in the messages, "
                                f"{asked} in the completion). Please reduce the length of the messages or "
                                f"completion.", param="messages", code="context_length_exceeded")
        return GenerationOptions(max_new_tokens=wanted or min(default or room, room), temperature=req.temperature,
                                 top_p=req.top_p, seed=req.seed)

    def start(self, req: Sampling, prompts: list[list[int]], wanted: int | None, default: int | None) -> list[Choice]:
        """Queue n choices per prompt, all or none (429 when the queue is full)."""
        adapter = self.adapter_of(req.model)
        planned = [(p, self.options(req, len(p), wanted, default)) for p in prompts]
        # Choice j samples with seed + j: n choices of one seeded request differ, and reproducibly.
        choices = [Choice(self, p, dataclasses.replace(o, seed=None if o.seed is None else o.seed + j), adapter,
                          req.stop_strings()) for p, o in planned for j in range(req.n)]
        try:
            self.batcher.submit([c.job for c in choices])
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}; retry shortly", "rate_limit_error",
                           code="rate_limit_exceeded") from None
        return choices

    # --- answers --------------------------------------------------------------------------------

    async def collect(self, choices: list[Choice], request: Request) -> list[str] | None:
        """Every choice's text; None (and every job cancelled) if the client hangs up first."""
        work = asyncio.ensure_future(asyncio.gather(*(c.run() for c in choices)))
        gone = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                return None
            return work.result()
        finally:
            for task in (work, gone):
                task.cancel()
            for c in choices:
                c.job.cancel()

    async def events(self, choices: list[Choice], make_chunk, first: dict | None, usage_of) -> AsyncIterator[str]:
        """Server-sent events: each choice's deltas in turn (all run at once), then usage and [DONE].
        Closing the generator (client gone) cancels every job."""
        try:
            for index, c in enumerate(choices):
                if first is not None:
                    yield make_chunk(index, first, None)
                async for delta in c.deltas():
                    yield make_chunk(index, delta, None)
                yield make_chunk(index, None, c.finish_reason)
            if usage := usage_of():
                yield f"data: {json.dumps(usage, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        except APIError as exc:  # mid-stream: headers are gone, the error travels as an event
            error = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:
            for c in choices:
                c.job.cancel()


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so the next ASGI
    message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator even when the client disconnects mid-stream, so the
    generator's cleanup (cancelling its jobs) runs now, not whenever it is collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


# --- routes -------------------------------------------------------------------------------------


async def chat_completions(server: Server, req: ChatRequest, request: Request):
    req.refuse_unsupported()
    prompt = await server.off_loop(server.chat_prompt, req)
    choices = server.start(req, [prompt], req.wanted_tokens(), DEFAULT_MAX_TOKENS)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
    total = lambda: usage(len(prompt), sum(c.completion_tokens() for c in choices))  # noqa: E731
    if req.stream:
        def chunk(index: int, delta, finish: str | None) -> str:
            content = delta if isinstance(delta, dict) else ({} if delta is None else {"content": delta})
            body = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": index, "delta": content, "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def last_usage():
            return req.include_usage() and {**head, "object": "chat.completion.chunk", "choices": [],
                                             "usage": total()}

        return ClosingStreamingResponse(server.events(choices, chunk, {"role": "assistant", "content": ""},
                                                      last_usage), media_type="text/event-stream")
    texts = await server.collect(choices, request)
    if texts is None:
        return Response(status_code=499)  # nobody is listening
    return {**head, "object": "chat.completion", "usage": total(),
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": c.finish_reason} for i, (c, text) in enumerate(zip(choices, texts))]}


async def completions(server: Server, req: CompletionRequest, request: Request):
    req.refuse_unsupported()
    prompts = await server.off_loop(server.text_prompts, req)
    choices = server.start(req, prompts, req.max_tokens, None)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
    total = lambda: usage(sum(map(len, prompts)), sum(c.completion_tokens() for c in choices))  # noqa: E731
    if req.stream:
        def chunk(index: int, delta, finish: str | None) -> str:
            body = {**head, "object": "text_completion",
                    "choices": [{"index": index, "text": delta or "", "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def last_usage():
            return req.include_usage() and {**head, "object": "text_completion", "choices": [], "usage": total()}

        return ClosingStreamingResponse(server.events(choices, chunk, None, last_usage),
                                        media_type="text/event-stream")
    texts = await server.collect(choices, request)
    if texts is None:
        return Response(status_code=499)
    return {**head, "object": "text_completion", "usage": total(),
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": c.finish_reason}
                        for i, (c, text) in enumerate(zip(choices, texts))]}


def create_app(engine: Engine, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    server = Server(engine, limits)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        server.batcher.close()

    app = FastAPI(title="tunelab", description="OpenAI-compatible completions", lifespan=lifespan,
                  docs_url="/docs" if limits.docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if limits.docs else None)
    app.state.server = server
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = str(exc.detail)
        if message in ("Not Found", "Method Not Allowed"):  # Starlette's routing, not ours
            message = (f"{request.method} {request.url.path} is not a route of this server; it has GET /v1/models, "
                       f"GET /v1/models/{{id}}, POST /v1/chat/completions, POST /v1/completions, GET /health")
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception):
        return error_response(500, f"internal error ({type(exc).__name__})", "server_error")

    @app.get("/v1/models")
    async def list_models():
        return server.models()

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        server.adapter_of(model)
        return server.model_card(model)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        return await chat_completions(server, req, request)

    @app.post("/v1/completions")
    async def complete(req: CompletionRequest, request: Request):
        return await completions(server, req, request)

    @app.get("/health")
    async def health():
        return {"status": "ok", **server.batcher.load()}

    return app


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise TunelabError(f"cannot listen on {host}:{port} ({exc.strerror or exc})", where="--host/--port",
                               fix=f"pick another port (--port {port + 1}) or stop the program using {port}") from None


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits | None = None) -> None:
    import uvicorn

    check_port_free(host, port)
    uvicorn.run(create_app(engine, api_key, limits), host=host, port=port, log_level="info")

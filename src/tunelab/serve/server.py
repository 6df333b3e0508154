"""`tunelab serve`: an OpenAI-compatible HTTP API (GET /v1/models, POST /v1/chat/completions).

One process, one model. Requests are queued on an asyncio lock and every piece of model
work runs on a single worker thread, so the event loop keeps answering (other requests,
disconnects, errors) while a generation runs, and two requests can never interleave
their steps: adapters are model-wide state, and under greedy decoding each answer is
exactly the one that request gets alone. A stream holds the queue until it ends or its
client goes away; either way its generator is closed on the worker, so the next
request starts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunelab.data.types import Message
from tunelab.errors import TunelabError
from tunelab.serve.engine import Engine

DEFAULT_MAX_TOKENS = 512  # when a request names no max_tokens (and the context leaves room)


# --- request schema (the subset of OpenAI's we honour; unknown fields are ignored) ----


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


# --- errors in OpenAI's shape -----------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Pydantic's errors as one readable sentence naming each bad field."""
    parts, first = [], None
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        first = first or loc
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), first


# --- stop strings -------------------------------------------------------------------------


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


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = matcher.feed(text)
    return (out, True) if matcher.stopped else (out + matcher.flush(), False)


# --- the app ------------------------------------------------------------------------------


class Server:
    def __init__(self, engine: Engine, api_key: str | None = None):
        self.engine = engine
        self.api_key = api_key
        self.queue = asyncio.Lock()  # FIFO: requests are served in arrival order
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunelab-model")
        self.created = int(time.time())

    async def on_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, functools.partial(fn, *args))

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header `Authorization: Bearer <key>`",
                           type_="authentication_error", code="invalid_api_key")

    def models(self) -> dict:
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "tunelab"}
                for name in self.engine.model_names()]
        return {"object": "list", "data": data}

    def prepare(self, req: ChatRequest) -> tuple[list[int], object]:
        """Prompt ids and generation options, or an APIError saying what to change."""
        from tunelab.model.generate import GenerationOptions

        if req.model not in self.engine.model_names():
            raise APIError(404, f"the model {req.model!r} does not exist; this server has: "
                                f"{', '.join(self.engine.model_names())}", param="model", code="model_not_found")
        messages = [Message(m.role, m.text()) for m in req.messages]
        try:
            prompt = self.engine.encode(messages)
        except TunelabError as exc:
            raise APIError(400, exc.what, param="messages") from None
        limit = self.engine.context_length
        wanted = req.max_completion_tokens or req.max_tokens
        room = self.engine.room_for(len(prompt))
        if room <= 0 or (wanted is not None and wanted > room):
            asked = wanted if wanted is not None else 1
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{len(prompt) + asked} tokens ({len(prompt)} in the messages, {asked} in the "
                                f"completion). Please reduce the length of the messages or completion.",
                           param="messages", code="context_length_exceeded")
        options = GenerationOptions(max_new_tokens=wanted or min(DEFAULT_MAX_TOKENS, room),
                                    temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        return prompt, options

    def adapter_of(self, req: ChatRequest) -> str | None:
        return None if req.model == self.engine.base_name else req.model

    async def complete(self, req: ChatRequest) -> dict:
        prompt, options = self.prepare(req)
        async with self.queue:
            generations = await self.on_worker(self.engine.generate, prompt, options, req.n, self.adapter_of(req))
        choices, completion_tokens = [], 0
        for index, gen in enumerate(generations):
            text, stopped = cut_at_stop(gen.text, req.stop_strings())
            tokens = self.engine.count_tokens(text) if stopped else gen.completion_tokens
            completion_tokens += tokens
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "logprobs": None, "finish_reason": "stop" if stopped else gen.finish_reason})
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "choices": choices,
                "usage": usage(len(prompt), completion_tokens)}

    async def stream(self, req: ChatRequest) -> AsyncIterator[str]:
        prompt, options = self.prepare(req)  # errors surface as HTTP errors, before the stream starts
        return self.sse(req, prompt, options)

    async def sse(self, req: ChatRequest, prompt: list[int], options) -> AsyncIterator[str]:
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": req.model}

        def chunk(choices: list, **extra) -> str:
            return f"data: {json.dumps({**base, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

        completion_tokens = 0
        async with self.queue:
            for index in range(req.n):
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                text, matcher = "", StopMatcher(req.stop_strings())
                # aclosing: if the client leaves, the model's generator is closed before the queue moves on.
                async with contextlib.aclosing(self.stream_text(prompt, options, self.adapter_of(req), matcher)) as deltas:
                    async for delta in deltas:
                        text += delta
                        yield chunk([{"index": index, "delta": {"content": delta}, "finish_reason": None}])
                # stream_generate yields text, not ids: count the answer's tokens by encoding it again.
                tokens = self.engine.count_tokens(text)
                completion_tokens += tokens
                finish = "length" if tokens >= options.max_new_tokens and not matcher.stopped else "stop"
                yield chunk([{"index": index, "delta": {}, "finish_reason": finish}])
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], usage=usage(len(prompt), completion_tokens))
        yield "data: [DONE]\n\n"

    async def stream_text(self, prompt: list[int], options, adapter: str | None,
                          matcher: StopMatcher) -> AsyncIterator[str]:
        """Text deltas from the worker, cut at stop strings; the generator is always closed."""
        generator = self.engine.stream(prompt, options, adapter)
        try:
            while not matcher.stopped:
                delta = await self.on_worker(next, generator, None)
                if delta is None:
                    break
                if out := matcher.feed(delta):
                    yield out
            if not matcher.stopped and (tail := matcher.flush()):
                yield tail
        finally:
            # Shielded: a cancelled request (client gone) must still free the model for the next one.
            with anyio.CancelScope(shield=True):
                await self.on_worker(generator.close)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator even when the client disconnects mid-stream, so the
    generator's cleanup (freeing the model queue) runs now, not whenever it is collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    server = Server(engine, api_key)
    app = FastAPI(title="tunelab", description="OpenAI-compatible chat completions")
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return APIError(422, message, param=param).response()

    auth = [Depends(server.check_key)]

    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        return server.models()

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatRequest):
        if req.stream:
            return ClosingStreamingResponse(await server.stream(req), media_type="text/event-stream")
        return await server.complete(req)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise TunelabError(f"cannot listen on {host}:{port} ({exc.strerror or exc})", where="--host/--port",
                               fix=f"pick another port (--port {port + 1}) or stop the program using {port}") from None


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> None:
    import uvicorn

    check_port_free(host, port)
    uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level="info")

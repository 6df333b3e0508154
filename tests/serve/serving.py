"""Helpers shared by the server tests: a tiny engine with two adapters and a live server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import uvicorn

from conftest import tiny_lora_adapter
from tunelab.data.types import Message
from tunelab.model.generate import GenerationOptions, generate_batch
from tunelab.serve.engine import load_engine

HELLO = [{"role": "user", "content": "Hello, who are you?"}]

KEY = "test-key"
CONTEXT = 256


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_engine(tiny_model_dir, folder, **kw):
    adapters = {"alpha": tiny_lora_adapter(tiny_model_dir, folder / "alpha", seed=1),
                "beta": tiny_lora_adapter(tiny_model_dir, folder / "beta", seed=2)}
    return load_engine(str(tiny_model_dir), adapters, device="cpu", context_length=CONTEXT, **kw)


@contextlib.contextmanager
def running(app):
    """Serve `app` on a free loopback port for the block; yields the /v1 base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def alone(engine, model: str | None, messages: list[dict] | None = None, max_tokens: int = 6,
          prompt: list[int] | None = None) -> str:
    """The greedy answer computed directly, with nothing else running."""
    if prompt is None:
        prompt = engine.encode([Message(m["role"], m["content"]) for m in messages])
    with engine.using(model):
        [gen] = generate_batch(engine.model, engine.tokenizer, [prompt], GenerationOptions(max_new_tokens=max_tokens),
                               stop_ids=engine.stop_ids, progress=False)
    return gen.text


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    """The tiny engine with two adapters, once per test module (import it: `from serving import engine`)."""
    return tiny_engine(tiny_model_dir, tmp_path_factory.mktemp("adapters"))

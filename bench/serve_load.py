"""`tunelab serve` under load: N concurrent streaming clients vs the same requests one at a time.

    python bench/serve_load.py --clients 16 --requests 32 --max-tokens 32            # CPU
    python bench/serve_load.py --clients 32 --requests 64 --max-tokens 128 --device cuda --kv-slots
    python bench/serve_load.py --clients 32 --requests 64 --max-tokens 128 --device cuda --kv-slots --dtype float32
    python bench/serve_load.py --clients 32 --requests 64 --max-tokens 128 --device cuda --no-kv-slots  # the dynamic batcher

Starts `tunelab serve` as a subprocess on a free loopback port (the clients run here, so
they do not share the server's interpreter), then
1. sends every request alone, one after another (each answer is its prompt's greedy answer
   with nothing else running: the reference),
2. sends the same requests from `--clients` concurrent streaming clients,
and reports completion tokens/s of both, their ratio, p50/p99 latency (request sent ->
last token) and time to first token, and checks every concurrent answer against its own
prompt's reference (greedy decoding; the prompts are distinct questions in the model's chat
template). A differing answer is classified:
- "diverged": it shares a prefix with its own reference, then goes another way. In bf16 a
  batch of another shape rounds differently, and a near-tie between two tokens can flip:
  expected (vLLM documents the same), reported with the shared prefix, not a failure;
- "like_another": another prompt's reference shares a longer prefix with it than its own
  (at least 16 characters): the answer belongs to another request - a real bug, a failure.
A lost request, an answer like another's, or with `--exact` (the default with
`--dtype float32`) any difference fails the run (exit 1). In float32 on the CPU concurrent
answers equal the alone ones token for token (tests/serve/test_server_batching.py).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

TOPICS = ["hotels", "trains", "rivers", "bread", "chess", "volcanoes", "tea", "bicycles", "owls", "glass",
          "maps", "bees", "clocks", "salt", "kites", "bridges"]
ASKS = ["Tell me one fact about {}.", "Write a short poem about {}.", "Why do people like {}?",
        "Explain {} to a child.", "Give two tips about {}.", "What is the history of {}?"]


@dataclass
class Result:
    text: str = ""
    tokens: int = 0
    latency: float = 0.0  # sent -> last token
    first_token: float = 0.0
    error: str = ""


def prompts(n: int) -> list[str]:
    return [ASKS[i // len(TOPICS) % len(ASKS)].format(TOPICS[i % len(TOPICS)]) for i in range(n)]


def ask(port: int, key: str, model: str, question: str, max_tokens: int) -> Result:
    """One streamed chat completion over plain http.client (no client library in the way)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
                       "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}})
    result, started = Result(), time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            result.error = f"HTTP {response.status}: {response.read()[:200]!r}"
            return result
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                result.error = event["error"]["message"]
            for choice in event.get("choices", []):
                if choice["delta"].get("content"):
                    result.first_token = result.first_token or time.perf_counter() - started
                    result.text += choice["delta"]["content"]
            if event.get("usage"):
                result.tokens = event["usage"]["completion_tokens"]
        result.latency = time.perf_counter() - started
    except (OSError, http.client.HTTPException, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return result


def run(port: int, key: str, model: str, questions: list[str], max_tokens: int, clients: int):
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda q: ask(port, key, model, q, max_tokens), questions))
    return results, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summary(name: str, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if not r.error]
    tokens = sum(r.tokens for r in ok)
    lat = [r.latency for r in ok] or [0.0]
    ttft = [r.first_token for r in ok if r.first_token] or [0.0]
    row = {"phase": name, "requests": len(results), "answered": len(ok), "completion_tokens": tokens,
           "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(len(ok) / wall, 2),
           "p50_latency_s": round(percentile(lat, 50), 2), "p99_latency_s": round(percentile(lat, 99), 2),
           "p50_first_token_s": round(percentile(ttft, 50), 3)}
    print(json.dumps(row), flush=True)
    return row


def start_server(args, key: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "tunelab.cli", "serve", "--model", args.model, "--port", str(port),
           "--device", args.device, "--dtype", args.dtype, "--max-batch-size", str(args.max_batch_size),
           "--max-queue", str(max(256, args.requests))]
    for adapter in args.adapter:
        cmd += ["--adapter", adapter]
    if args.kv_slots is not None:  # unset: the server's default (slots on a GPU where they apply)
        cmd.append("--kv-slots" if args.kv_slots else "--no-kv-slots")
    server = subprocess.Popen(cmd, env={**os.environ, "TUNELAB_API_KEY": key})  # the key stays out of `ps`
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with code {server.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return server, port
        except OSError:
            time.sleep(0.5)
    server.terminate()
    sys.exit("the server did not come up in time")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", action="append", default=[], help="NAME=PATH, served and asked for by NAME")
    ap.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    ap.add_argument("--requests", type=int, default=32, help="requests in each phase")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--kv-slots", action=argparse.BooleanOptionalAction, default=None,
                    help="pass `--kv-slots` / `--no-kv-slots` to `tunelab serve` (default: its own choice)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                    help="fail on any differing answer (default: only with --dtype float32)")
    args = ap.parse_args()
    exact = args.dtype == "float32" if args.exact is None else args.exact

    key = secrets.token_hex(16)
    server, port = start_server(args, key)
    model = args.adapter[0].partition("=")[0] if args.adapter else None
    try:
        if model is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
            model = json.loads(conn.getresponse().read())["data"][0]["id"]
        questions = prompts(args.requests)
        ask(port, key, model, questions[0], 4)  # warm-up
        alone, alone_wall = run(port, key, model, questions, args.max_tokens, clients=1)
        together, together_wall = run(port, key, model, questions, args.max_tokens, clients=args.clients)
    finally:
        server.terminate()
        server.wait(timeout=60)
    seq = summary("one at a time", alone, alone_wall)
    par = summary(f"{args.clients} concurrent clients", together, together_wall)
    lost = sum(1 for r in together if r.error)
    check = compare(questions, [r.text for r in alone], [r.text for r in together],
                    [bool(a.error or b.error) for a, b in zip(alone, together)])
    ratio = par["tokens_per_s"] / max(seq["tokens_per_s"], 1e-9)
    print(json.dumps({"throughput_ratio": round(ratio, 2), "lost": lost, **check,
                      "errors": sorted({r.error for r in alone + together if r.error})[:3]}), flush=True)
    failed = lost or check["like_another"] or (exact and check["mismatched"]) or any(r.error for r in alone)
    return 1 if failed else 0


def shared_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(questions: list[str], alone: list[str], together: list[str], skip: list[bool]) -> dict:
    """Each concurrent answer against the references: equal, diverged after a shared prefix
    (batch-shape rounding), or like another prompt's reference (a request crossed with another)."""
    diverged, foreign, prefixes = 0, 0, []
    for i, (want, got) in enumerate(zip(alone, together)):
        if skip[i] or want == got:
            continue
        own = shared_prefix(want, got)
        other = max((shared_prefix(ref, got) for j, ref in enumerate(alone)
                     if questions[j] != questions[i]), default=0)
        if other > own and other >= 16:
            foreign += 1
        else:
            diverged += 1
            prefixes.append(own)
    return {"mismatched": diverged + foreign, "diverged": diverged, "like_another": foreign,
            "diverged_after_chars_p50": statistics.median(prefixes) if prefixes else None}


if __name__ == "__main__":
    sys.exit(main())

"""`tunelab eval --backend openai`: the same rows and scores from a server as from local generation."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.evaluate.remote import Endpoint, predict_remote
from tunelab.model.generate import GenerationOptions

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "data" / "quickstart.jsonl"


class ModelServer:
    """/v1/completions backed by a local model: tokenizes the prompt text, greedy-decodes,
    stops at the request's stop strings (as special tokens), answers like vLLM."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.requests, self.lock = [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body})
                payload = server.complete(body)
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def complete(self, body):
        from tunelab.model.generate import generate_batch

        ids = self.tok(body["prompt"], add_special_tokens=False)["input_ids"]
        stops = [self.tok.convert_tokens_to_ids(s) for s in body.get("stop", [])]
        with self.lock:  # one model, one request at a time
            gen = generate_batch(self.model, self.tok, [ids], GenerationOptions(max_new_tokens=body["max_tokens"]),
                                 stops, progress=False)[0]
        return {"choices": [{"text": gen.text, "finish_reason": gen.finish_reason, "index": 0}],
                "usage": {"completion_tokens": gen.completion_tokens, "prompt_tokens": len(ids)}}


@pytest.fixture(scope="module")
def model_server(tiny_model_dir):
    torch.set_num_threads(1)
    server = ModelServer(tiny_model_dir)
    yield server
    server.http.shutdown()
    server.http.server_close()


def rows(folder):
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def test_completions_backend_scores_like_local_eval(tiny_model_dir, hotel_dir, model_server, tmp_path):
    common = ["eval", "--no-progress", "--max-new-tokens", "8", "--data", str(hotel_dir / "test.jsonl"),
              "--task", "hotel", "--limit", "6"]
    assert main(common + ["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "local")]) == 0
    assert main(common + ["--backend", "openai", "--base-url", model_server.url, "--model", "tiny",
                          "--tokenizer", str(tiny_model_dir), "--output-dir", str(tmp_path / "remote")]) == 0
    local, remote = rows(tmp_path / "local"), rows(tmp_path / "remote")
    assert [r["prediction"] for r in remote] == [r["prediction"] for r in local]
    assert [r["prompt"] for r in remote] == [r["prompt"] for r in local]  # the hotel prompt, rendered here
    scores = [json.loads((tmp_path / d / "scores.json").read_text())["scores"] for d in ("local", "remote")]
    assert scores[0] == scores[1]
    sent = model_server.requests[-1]["body"]
    assert sent["model"] == "tiny" and sent["prompt"].endswith("<|im_start|>") and "<|im_end|>" in sent["stop"]


def test_chat_backend_against_our_own_server(tiny_model_dir, tmp_path):
    import uvicorn

    from tunelab.serve.engine import load_engine
    from tunelab.serve.server import create_app

    engine = load_engine(str(tiny_model_dir), device="cpu")
    config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        data = ["--data", str(QUICKSTART), "--limit", "3", "--max-new-tokens", "6", "--no-progress"]
        assert main(["eval", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "local"), *data]) == 0
        assert main(["eval", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1",
                     "--model", engine.base_name, "--output-dir", str(tmp_path / "remote"), *data]) == 0
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert [r["prediction"] for r in rows(tmp_path / "remote")] == [r["prediction"] for r in rows(tmp_path / "local")]


def test_bad_remote_requests_are_clear_errors(tmp_path, capsys, hotel_dir):
    base = ["eval", "--backend", "openai", "--data", str(hotel_dir / "test.jsonl"), "--task", "hotel",
            "--limit", "1", "--no-progress"]
    assert main(base) != 0 and "--base-url" in capsys.readouterr().err
    assert main(base + ["--base-url", "http://127.0.0.1:9/v1", "--api", "completions"]) != 0
    assert "--tokenizer" in capsys.readouterr().err
    assert main(base + ["--base-url", "http://127.0.0.1:9/v1", "--metrics", "ppl"]) != 0
    assert "perplexity" in capsys.readouterr().err
    from tunelab.evaluate.tasks import get_task

    samples = get_task("hotel").load(str(hotel_dir / "test.jsonl"), "auto", 1)
    with pytest.raises(TunelabError, match="top-k"):
        predict_remote(Endpoint("http://127.0.0.1:9/v1", "m", api="chat"), samples,
                       GenerationOptions(top_k=5), task="hotel")
    with pytest.raises(TunelabError, match="the server failed"):  # nothing listens on port 9
        predict_remote(Endpoint("http://127.0.0.1:9/v1", "m", api="chat", max_retries=0), samples,
                       GenerationOptions(max_new_tokens=4), task="hotel", progress=False)

"""`tunelab board`'s API through FastAPI's TestClient: the token, the runs, curves, comparisons,
examples, config checks, data preview, estimate, launch and chat."""

from __future__ import annotations

import time

import pytest
from fake_runs import fake_run, tiny_config_values, tiny_trained_run
from fastapi.testclient import TestClient

from tunelab.board.app import create_app, parse_form
from tunelab.errors import TunelabError

TOKEN = "secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("runs")
    fake_run(folder / "slow", lr=1e-4, rate=0.05, predictions=[("Hello", "Hi!", "Hey.")])
    fake_run(folder / "fast", lr=5e-4, rate=0.2, predictions=[("Hello", "Hi!", "Hi!")])
    tiny_trained_run(tiny_model_dir, tmp_path_factory.mktemp("data"), folder / "tiny")
    return folder


@pytest.fixture(scope="module")
def client(runs_dir):
    return TestClient(create_app(runs_dir, token=TOKEN))


def test_every_api_call_needs_the_token_when_one_is_set(client):
    assert client.get("/api/runs").status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get(f"/api/runs?token={TOKEN}").status_code == 200
    assert client.post("/api/check", json={"text": "lora_rank: 8"}).status_code == 401
    assert client.get("/").status_code == 200  # the page itself holds no data


def test_posts_must_be_json_and_the_host_a_loopback_name(runs_dir):
    client = TestClient(create_app(runs_dir, allowed_hosts=["127.0.0.1", "localhost"]))
    assert client.get("/api/runs").status_code == 400  # Host: testserver, as a rebound DNS name would be
    local = TestClient(create_app(runs_dir, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1:7860")
    assert local.get("/api/runs").status_code == 200
    assert local.post("/api/check", content="lora_rank: 8", headers={"Content-Type": "text/plain"}).status_code == 415


def test_runs_list_with_status(client):
    runs = {r["id"]: r for r in client.get("/api/runs", headers=AUTH).json()["runs"]}
    assert set(runs) == {"slow", "fast", "tiny"}
    assert all(r["status"] == "finished" for r in runs.values())
    assert runs["tiny"]["step"] == 2 and runs["tiny"]["max_steps"] == 2 and "eval_loss" in runs["tiny"]["final"]


def test_curves_and_comparison_of_two_runs(client):
    curves = client.get("/api/curves?run=slow&run=fast", headers=AUTH).json()["runs"]
    assert [c["run"] for c in curves] == ["slow", "fast"]
    assert len(curves[0]["train"]) == 12 and [e["step"] for e in curves[0]["eval"]] == [4, 8, 12]
    compare = client.get("/api/compare?run=slow&run=fast", headers=AUTH).json()
    assert compare["config_diff"] == {"learning_rate": {"slow": 1e-4, "fast": 5e-4}}
    assert compare["metrics"]["fast"]["best"][0] < compare["metrics"]["slow"]["best"][0]
    assert compare["findings"]["slow"][0]["title"].startswith("Healthy run")


def test_examples_show_prediction_and_reference(client):
    rows = client.get("/api/examples?run=fast", headers=AUTH).json()["rows"]
    assert rows == [{"prompt": "Hello", "reference": "Hi!", "prediction": "Hi!", "scores": None}]


def test_unknown_run_is_a_clear_error(client):
    response = client.get("/api/examples?run=nope", headers=AUTH)
    assert response.status_code == 400 and "no run 'nope'" in response.json()["error"]


@pytest.mark.parametrize("text, words", [
    ("examples/quickstart.yaml\nlora_rnak=16", "did you mean 'lora_rank'"),
    ("learning_rate: fast", "learning_rate must be float"),
    ("examples/quickstart.yaml\nnot an override", "key=value"),
    ("", "empty"),
])
def test_a_bad_config_gets_our_error_text(client, text, words):
    for path in ("/api/check", "/api/launch", "/api/estimate"):
        response = client.post(path, json={"text": text}, headers=AUTH)
        assert response.status_code == 400 and words in response.json()["error"], (path, response.json())


def test_form_takes_yaml_or_a_path_and_overrides():
    assert parse_form("examples/quickstart.yaml\nlearning_rate=1e-4\n# note\n") == (
        "examples/quickstart.yaml", ["learning_rate=1e-4"])
    assert parse_form("learning_rate: 1e-4\nlora_rank: 16") == (None, {"learning_rate": "1e-4", "lora_rank": 16})
    with pytest.raises(TunelabError):
        parse_form("lora_rank: [")


def test_data_preview_highlights_the_trained_tokens(client, runs_dir):
    text = (runs_dir / "tiny" / "config.yaml").read_text()
    data = client.post("/api/preview", json={"text": text, "index": 1}, headers=AUTH).json()
    trained = "".join(p["text"] for p in data["pieces"] if p["trained"])
    untrained = "".join(p["text"] for p in data["pieces"] if not p["trained"])
    assert data["index"] == 1 and data["trained_tokens"] > 0 and trained
    assert "<|im_start|>user" in untrained and "<|im_start|>assistant" in untrained  # prompts are not trained on
    assert trained.strip().endswith("<|im_end|>")  # the answer and its end-of-turn marker are


def test_estimate_gives_memory_and_a_time_from_a_run_like_it(client, runs_dir, tmp_path):
    text = (runs_dir / "tiny" / "config.yaml").read_text().replace(str(runs_dir / "tiny"), str(tmp_path / "new"))
    data = client.post("/api/estimate", json={"text": "examples/quickstart.yaml"}, headers=AUTH).json()
    assert data["gib"] > 0 and "smollm2-135m-instruct" in data["text"] and "estimated peak" in data["text"]
    timed = client.post("/api/estimate", json={"text": text}, headers=AUTH).json()
    assert "in run tiny" in timed["time"]


def test_launch_starts_tunelab_train_and_its_error_shows_as_a_failed_run(client, runs_dir, tmp_path, tiny_model_dir):
    values = tiny_config_values(tiny_model_dir, tmp_path, runs_dir / "launched")
    values["dataset"] = [str(tmp_path / "missing.jsonl")]  # passes the config checks, fails when read
    text = "\n".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in values.items())
    started = client.post("/api/launch", json={"text": text}, headers=AUTH).json()
    assert started["run_dir"] == str(runs_dir / "launched") and started["pid"] > 0
    client.app.state.board.processes[started["run_dir"]].wait(timeout=120)
    for _ in range(50):
        runs = {r["id"]: r for r in client.get("/api/runs", headers=AUTH).json()["runs"]}
        if "launched" in runs:
            break
        time.sleep(0.1)
    assert runs["launched"]["status"] == "failed"
    assert "missing.jsonl" in runs["launched"]["final"]["error"]


def test_chat_answers_with_the_runs_model(client):
    reply = client.post("/api/chat", json={"run": "tiny", "messages": [{"role": "user", "content": "Hello!"}],
                                           "max_new_tokens": 5}, headers=AUTH).json()
    assert isinstance(reply["reply"], str) and reply["model"] == "tiny"
    engine = client.app.state.board.engine
    assert list(engine.adapters) == ["tiny"]  # the run's adapter on its base, as `tunelab chat` loads it
    bad = client.post("/api/chat", json={"run": "tiny", "messages": []}, headers=AUTH)
    assert bad.status_code == 400 and "user message" in bad.json()["error"]


def test_board_refuses_other_machines_without_a_token(capsys, monkeypatch):
    from tunelab.cli import main

    monkeypatch.delenv("TUNELAB_BOARD_TOKEN", raising=False)
    assert main(["board", "--host", "0.0.0.0", "--port", "7861"]) == 2
    assert "without a token" in capsys.readouterr().err


def test_the_page_fetches_nothing_from_the_network():
    from tunelab.board.app import STATIC

    for path in STATIC.iterdir():
        text = path.read_text(encoding="utf-8").replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path.name

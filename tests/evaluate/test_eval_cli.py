"""`tunelab eval` end to end through the CLI, on a tiny random model saved as a local folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import shared_tokenizer, tiny_llama
from tunelab.cli import main
from tunelab.data.templates import resolve_template
from tunelab.evaluate.runner import reference_losses
from tunelab.evaluate.tasks import get_task


def save_lora(model, folder, seed: int = 1):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter change the outputs
            torch.nn.init.normal_(param, std=0.5)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok():
    return shared_tokenizer("qwen2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("tiny-model")
    model = tiny_llama(tok, initializer_range=0.2)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tok, model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.name_or_path = str(model_dir)
    return save_lora(model, tmp_path_factory.mktemp("run") / "adapter")


def eval_cli(*args) -> int:
    return main(["eval", "--no-progress", "--max-new-tokens", "12", *map(str, args)])


def cli(*args) -> int:
    return main([str(a) for a in args])


def scores_of(folder):
    return json.loads((folder / "scores.json").read_text(encoding="utf-8"))["scores"]


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_hotel_task_end_to_end_and_predictions_round_trip(model_dir, hotel_dir, tmp_path):
    out = tmp_path / "hotel"
    assert eval_cli("--model", model_dir, "--data", hotel_dir / "test.jsonl", "--task", "hotel", "--limit", 5,
                    "--metrics", "slots,bleu,ppl", "--batch-size", 2, "--output-dir", out) == 0
    rows = read_rows(out / "predictions.jsonl")
    summary = scores_of(out)
    assert len(rows) == 5 and summary["samples"] == 5
    assert summary["search_rows"] + summary["assistant_rows"] == 5
    assert all(r["prompt"].endswith("<|im_start|>") for r in rows)  # the hotel generation prompt
    assert all("<|im_end|>" not in r["prediction"] and r["completion_tokens"] <= 12 for r in rows)
    assert all(r["ref_tokens"] > 0 and "scores" in r for r in rows)
    assert summary["ppl"] > 1 and "| slot_f1 |" in (out / "scores.md").read_text(encoding="utf-8")

    again = tmp_path / "rescored"
    assert cli("eval", "--predictions", out / "predictions.jsonl", "--metrics", "slots,bleu,ppl",
               "--output-dir", again) == 0
    assert scores_of(again) == summary
    assert [r["scores"] for r in read_rows(again / "predictions.jsonl")] == [r["scores"] for r in rows]


def test_rescoring_counts_empty_predictions(tmp_path):
    rows = [{"task": "generic", "reference": "Paris.", "prediction": "Paris.", "meta": {}},
            {"task": "generic", "reference": "Yes", "prediction": "", "meta": {}}]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert cli("eval", "--predictions", path, "--metrics", "em,bleu") == 0
    summary = scores_of(tmp_path)
    assert summary["empty_predictions"] == 1 and summary["exact_match"] == 50.0


def test_rescoring_hotel_predictions_written_without_meta(tmp_path):
    rows = [{"reference": 'search\n{"type": "经济型"}', "prediction": 'search\n{"type": "经济型"}'},
            {"reference": "assistant\n好的。", "prediction": "assistant\n"}]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert cli("eval", "--task", "hotel", "--predictions", path) == 0
    summary = scores_of(tmp_path)
    assert summary["slot_f1"] == 100.0 and summary["empty_predictions"] == 1


def test_rescoring_with_an_llm_judge(tmp_path, monkeypatch):
    from test_judge import FakeJudge

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    fake = FakeJudge()
    try:
        rows = [{"task": "generic", "prompt": "Capital of France?", "reference": "Paris.", "prediction": "Paris.",
                 "meta": {}}]
        path = tmp_path / "predictions.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        args = ("eval", "--predictions", path, "--metrics", "em", "--judge-url", fake.url, "--judge-model", "j")
        assert cli(*args) == 0
        summary = scores_of(tmp_path)
        assert summary["judge_correctness"] == 4 and summary["judge_fluency"] == 3
        assert (tmp_path / "judgements.jsonl").exists()
        assert cli(*args) == 0 and len(fake.requests) == 1  # the second run is served from the cache
    finally:
        fake.server.shutdown()
        fake.server.server_close()


def test_compare_base_writes_one_table(model_dir, adapter_dir, hotel_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert eval_cli("--model", model_dir, "--adapter", adapter_dir, "--data", hotel_dir / "test.jsonl",
                    "--task", "hotel", "--limit", 3, "--compare-base", "--output-dir", out) == 0
    table = capsys.readouterr().out
    assert "| metric | base | tuned | delta |" in table and "| slot_f1 |" in table and "| bleu4 |" in table
    comparison = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    assert comparison["base"] == scores_of(out / "base") and comparison["tuned"] == scores_of(out / "tuned")
    base_rows, tuned_rows = read_rows(out / "base" / "predictions.jsonl"), read_rows(out / "tuned" / "predictions.jsonl")
    assert [r["source"] for r in base_rows] == [r["source"] for r in tuned_rows]
    assert [r["prediction"] for r in base_rows] != [r["prediction"] for r in tuned_rows]  # the adapter is applied
    assert (out / "comparison.md").read_text(encoding="utf-8").count("| slot_f1 |") == 1


def test_adapter_of_another_model_is_refused(model_dir, hotel_dir, tok, tmp_path, capsys):
    other = tiny_llama(tok, hidden_size=32, intermediate_size=64)
    other.name_or_path = "other-tiny-model"
    adapter = save_lora(other, tmp_path / "wrong-adapter")
    code = eval_cli("--model", model_dir, "--adapter", adapter, "--data", hotel_dir / "test.jsonl",
                    "--task", "hotel", "--limit", 1, "--output-dir", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2 and "other-tiny-model" in err and str(model_dir) in err
    assert "Traceback" not in err


def test_generic_rows_without_reference_fail_before_loading(model_dir, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"text": "just text"}) + "\n", encoding="utf-8")
    assert eval_cli("--model", tmp_path / "no-such-model", "--data", data) == 2
    assert "chat.jsonl:1" in capsys.readouterr().err


def test_reference_perplexity_is_the_training_loss(model_dir, tok, tmp_path):
    from tunelab.data.tokenize import encode_conversation

    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("Hi", "Hello there, how can I help?"), ("2+2?", "4"), ("法国的首都？", "巴黎。")]]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    samples = get_task("generic").load(data)
    model = tiny_llama(tok, initializer_range=0.2)
    template = resolve_template("chatml", tok)
    batched = reference_losses(model, tok, samples, template, batch_size=3)
    for sample, (nll, count) in zip(samples, batched):
        enc = encode_conversation(sample.conversation(), tok, template, 4096)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels]))
        assert count == sum(label != -100 for label in enc.labels[1:])
        assert nll / count == pytest.approx(float(out.loss), rel=1e-4)

    out_dir = tmp_path / "gen"
    assert eval_cli("--model", model_dir, "--data", data, "--template", "chatml", "--metrics", "bleu,rouge,em,ppl",
                    "--output-dir", out_dir) == 0
    summary = scores_of(out_dir)
    assert {"bleu4", "corpus_bleu", "rouge1", "rougeL", "exact_match", "ppl"} <= set(summary)


def test_report_command_reads_a_run(tmp_path, capsys):
    # A run whose loss still falls steeply at the end: the report must say it has not converged.
    rows = [{"step": s, "epoch": s / 50, "loss": 2.5 * 0.97 ** s + 0.3, "learning_rate": 1e-4} for s in range(1, 101)]
    (tmp_path / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert cli("report", tmp_path, "--output-dir", tmp_path / "rep") == 0
    assert "converged" in capsys.readouterr().out.lower()
    assert (tmp_path / "rep" / "report.md").is_file()
    assert cli("report", tmp_path / "missing") == 2
    assert "does not exist" in capsys.readouterr().err


def test_scores_of_a_full_fine_tuning_run_go_into_its_folder(tmp_path):
    """`tunelab eval --model runs/full` (no adapter: the run folder is the model) writes next to the run,
    where `tunelab report` looks, not into ./eval_out."""
    from types import SimpleNamespace

    from tunelab.evaluate.cli import _output_dir

    run = tmp_path / "full"
    run.mkdir()
    args = SimpleNamespace(output_dir=None, predictions=None, adapter=None, model=str(run))
    assert _output_dir(args) == Path("eval_out")  # a plain model folder: the working directory
    (run / "config.yaml").write_text("finetuning_type: full\n")
    assert _output_dir(args) == run / "eval"
    assert _output_dir(SimpleNamespace(output_dir=None, predictions=None, adapter="runs/a", model=str(run))) \
        == Path("runs/a/eval")

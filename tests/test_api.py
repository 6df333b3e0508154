"""The Python API: `from tunelab import train, evaluate, merge, load_config` on a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.errors import TunelabError

pytestmark = pytest.mark.usefixtures("one_thread")
QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "data" / "quickstart.jsonl"


def records(n: int) -> list[dict]:
    return [json.loads(line) for line in QUICKSTART.read_text(encoding="utf-8").splitlines()[:n]]


def settings(tmp_path, model_dir, **more) -> dict:
    return dict(model_name_or_path=str(model_dir), output_dir=str(tmp_path / "run"), cutoff_len=96, max_steps=2,
                per_device_train_batch_size=2, lora_rank=4, lora_alpha=8, learning_rate=1e-2, logging_steps=1,
                report_to="none", disable_tqdm=True, device="cpu", save_strategy="no") | more


def test_import_is_light_and_the_names_stay_callable():
    code = ("import sys, tunelab; from tunelab import train, evaluate, merge, load_config; "
            "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules); "
            "import tunelab.train.loop, tunelab.evaluate.runner; from tunelab import train as again; "
            "assert callable(train) and callable(again) and callable(evaluate) and tunelab.train.loop")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_on_records_in_memory_returns_metrics_model_and_tokenizer(tmp_path, tiny_model_dir):
    import torch

    from tunelab import load_config, train

    cfg = load_config(None, settings(tmp_path, tiny_model_dir))
    result = train(cfg, data=records(8), eval_data=records(10)[8:], eval_strategy="steps", eval_steps=2)
    assert result.run_dir == tmp_path / "run" and result.global_step == 2
    assert set(result.metrics) >= {"train_loss", "eval_loss", "global_step"}
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["dataset"] == [str(result.run_dir / "data" / "train.jsonl")]  # the run holds its data
    assert len((result.run_dir / "data" / "train.jsonl").read_text().splitlines()) == 8

    model, tokenizer = result.model, result.tokenizer
    from peft import PeftModel

    assert isinstance(model, PeftModel) and model.peft_config["default"].r == 4
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[1] == ids.shape[1]


def test_train_from_a_dict_with_a_datasets_dataset_then_evaluate_and_merge(tmp_path, tiny_model_dir):
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install 'tunelab[hub]')")
    from tunelab import evaluate, merge, train

    result = train(settings(tmp_path, tiny_model_dir), data=datasets.Dataset.from_list(records(6)))
    assert result.metrics["global_step"] == 2

    scores = evaluate(result, data=records(3), metrics="bleu,em", max_new_tokens=4, no_progress=True, device="cpu")
    assert set(scores.scores) >= {"bleu4", "exact_match"} and scores.output_dir == result.run_dir / "eval"
    assert len(scores.predictions) == 3

    report = merge(result, tmp_path / "merged", dtype="fp32")
    assert (report.out_dir / "config.json").is_file() and (report.out_dir / "README.md").is_file()


def test_bad_data_and_options_are_clear_errors(tmp_path, tiny_model_dir):
    from tunelab import evaluate, train

    with pytest.raises(TunelabError, match="record 2 is a str"):
        train(settings(tmp_path, tiny_model_dir), data=[records(1)[0], "text"])
    with pytest.raises(TunelabError, match="data is a dict"):
        train(settings(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "other")), data=records(1)[0])
    with pytest.raises(TunelabError, match="does not take"):
        evaluate(str(tiny_model_dir), data=records(1), not_an_option=3)
    with pytest.raises(TunelabError, match="unknown key"):
        train(settings(tmp_path, tiny_model_dir), lora_rnk=4)

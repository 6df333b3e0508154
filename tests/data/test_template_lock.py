"""The template lock: a run trained with `template: hotel` is prompted with exactly the
trained tokens by eval, chat/serve, merge and a plain transformers/PEFT user."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from tunelab.cli import main
from tunelab.data.templates import (
    LOCK_FILE,
    as_dicts,
    choose_template,
    find_lock,
    lock_template,
    read_lock,
    resolve_template,
    same_prompts,
)
from tunelab.errors import TunelabError

HOTEL_SYSTEM = "你是酒店助手。Answer \"briefly\"."


@pytest.fixture(scope="module")
def hotel_run(tmp_path_factory, tiny_model_dir, hotel_dir):
    """A real (two-step) LoRA run with template: hotel and a default system prompt."""
    from tunelab.config import load_config
    from tunelab.train import loop

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("hotel-run")
    data = tmp / "train.jsonl"
    data.write_text("\n".join((hotel_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()[:8]) + "\n",
                    encoding="utf-8")
    cfg = load_config(None, dict(model_name_or_path=str(tiny_model_dir), dataset=[str(data)], template="hotel",
                                 system_prompt=HOTEL_SYSTEM, cutoff_len=1024, max_steps=2, lora_rank=2,
                                 per_device_train_batch_size=2, output_dir=str(tmp / "run"), report_to=[],
                                 disable_tqdm=True, device="cpu", val_size=0, eval_strategy="no", save_steps=1))
    loop.train(cfg)
    return Path(cfg.output_dir)


def hotel_samples(hotel_dir, n=4):
    from tunelab.evaluate.tasks import get_task

    return get_task("hotel").load(str(hotel_dir / "test.jsonl"), "auto", n)


def test_every_saved_folder_carries_the_trained_template(hotel_run):
    from transformers import AutoTokenizer

    lock = read_lock(hotel_run)
    assert lock.template == "hotel" and lock.system_prompt == HOTEL_SYSTEM
    assert "<|im_end|>" in lock.stop_tokens
    checkpoints = sorted(hotel_run.glob("checkpoints/checkpoint-*"))
    assert checkpoints, "the run saved checkpoints"
    for folder in [hotel_run, *checkpoints]:
        assert (folder / LOCK_FILE).is_file(), folder
        assert AutoTokenizer.from_pretrained(folder).chat_template == lock.chat_template


def test_eval_chat_serve_and_transformers_get_the_trained_prompt_ids(hotel_run, tiny_model_dir, hotel_dir):
    from transformers import AutoTokenizer

    from tunelab.data.readers import load_conversations
    from tunelab.data.tokenize import IGNORE_INDEX, encode_conversation
    from tunelab.evaluate.runner import encode_prompts
    from tunelab.model.adapters import adapter_tokenizer
    from tunelab.serve.cli import template_from_args
    from tunelab.serve.engine import load_engine

    samples = hotel_samples(hotel_dir)
    # What training saw: the record with the run's system prompt, rendered with `hotel`.
    train_conv = load_conversations([str(hotel_dir / "test.jsonl")], system_prompt=HOTEL_SYSTEM, max_samples=1)[0]
    trained = encode_conversation(train_conv, adapter_tokenizer(str(tiny_model_dir), None),
                                  lock_template(adapter_tokenizer(str(tiny_model_dir), None), "hotel", HOTEL_SYSTEM),
                                  4096, train_on="last")
    first_label = next(i for i, label in enumerate(trained.labels) if label != IGNORE_INDEX)

    # tunelab eval: the adapter's tokenizer and lock (the task's default `hotel` only as fallback).
    tok = adapter_tokenizer(str(tiny_model_dir), hotel_run)
    eval_src = choose_template(None, tok, read_lock(hotel_run), fallback="hotel")
    eval_ids = encode_prompts(samples, tok, eval_src)
    assert eval_ids[0] == trained.input_ids[:first_label]  # eval prompts exactly as training rendered

    # tunelab chat / serve: the engine built from the command line (no --template).
    args = argparse.Namespace(model=str(tiny_model_dir), template=None, force_template=False)
    _, serve_src = template_from_args(args, {"hotel": hotel_run})
    engine = load_engine(str(tiny_model_dir), {"hotel": hotel_run}, template=serve_src, device="cpu")
    assert [engine.encode(s.prompt) for s in samples] == eval_ids

    # A PEFT / transformers user of the saved folder.
    saved = AutoTokenizer.from_pretrained(hotel_run)
    for sample, ids in zip(samples, eval_ids):
        got = saved.apply_chat_template(as_dicts(sample.prompt), add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
        assert list(got) == ids


def test_an_explicit_template_that_prompts_differently_is_refused(hotel_run, tiny_model_dir, hotel_dir, capsys):
    args = ["eval", "--model", tiny_model_dir, "--adapter", hotel_run, "--data", hotel_dir / "test.jsonl",
            "--task", "hotel", "--limit", "1", "--show-prompt"]
    assert main([str(a) for a in args + ["--template", "chatml"]]) != 0
    err = capsys.readouterr().err
    assert "prompts the model differently" in err and "--force-template" in err
    assert main([str(a) for a in args + ["--template", "chatml", "--force-template"]]) == 0
    assert "<|im_start|>assistant\n" in capsys.readouterr().out
    # Without --template: the trained one, system prompt included, the reply [[marked]].
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert HOTEL_SYSTEM in out and "[[search\n" in out and "<|im_end|>]]" in out


def test_chat_show_prompt_is_a_dry_run_with_the_trained_template(hotel_run, tiny_model_dir, capsys):
    assert main(["chat", "--model", str(tiny_model_dir), "--adapter", str(hotel_run), "--show-prompt", "hi"]) == 0
    out = capsys.readouterr().out
    assert f"<|im_start|>system\n{HOTEL_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>\n" in out
    assert "[[assistant\n(the reply)<|im_end|>]]" in out


def test_merge_keeps_the_lock_and_stops_at_the_end_of_turn(hotel_run, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(hotel_run), "--out", str(out),
                 "--dtype", "fp32"]) == 0
    lock = read_lock(hotel_run)
    assert read_lock(out).chat_template == lock.chat_template
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == lock.chat_template
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    with pytest.raises(TunelabError, match="prompts the model differently"):
        from tunelab.export.merge import merge_adapter

        merge_adapter(str(tiny_model_dir), hotel_run, tmp_path / "m2", template="chatml")


def test_same_prompts_and_choice(qwen2_tokenizer):
    hotel, chatml = resolve_template("hotel", qwen2_tokenizer), resolve_template("chatml", qwen2_tokenizer)
    assert same_prompts(hotel, hotel, qwen2_tokenizer)
    assert not same_prompts(hotel, chatml, qwen2_tokenizer)
    # Same rendering, other source (a comment): accepted.
    assert same_prompts(hotel, "{#- mine #}" + hotel, qwen2_tokenizer)
    from tunelab.data.templates import TemplateLock

    lock = TemplateLock(hotel, "hotel")
    assert choose_template(None, qwen2_tokenizer, lock) == hotel
    assert choose_template("{#- mine #}" + hotel, qwen2_tokenizer, lock).startswith("{#- mine")
    with pytest.raises(TunelabError):
        choose_template("chatml", qwen2_tokenizer, lock)
    assert choose_template("chatml", qwen2_tokenizer, lock, force=True) == chatml
    assert choose_template(None, qwen2_tokenizer, None, fallback="chatml") == chatml


def test_two_adapters_with_different_templates_are_refused(tmp_path):
    for name, src in (("a", "{{ 'x' }}"), ("b", "{{ 'y' }}")):
        (tmp_path / name).mkdir()
        (tmp_path / name / LOCK_FILE).write_text(json.dumps({"chat_template": src}), encoding="utf-8")
    assert find_lock([tmp_path / "a", tmp_path / "a"]).chat_template == "{{ 'x' }}"
    with pytest.raises(TunelabError, match="different chat templates"):
        find_lock([tmp_path / "a", tmp_path / "b"])
    (tmp_path / "a" / LOCK_FILE).write_text("{", encoding="utf-8")
    with pytest.raises(TunelabError, match="unreadable"):
        read_lock(tmp_path / "a")


def test_vllm_hand_off_checks(tmp_path, tiny_model_dir, caplog):
    """What `vllm serve --enable-lora` needs: a plain LoRA with listed targets and the trained
    template beside it; DoRA, biases and high ranks get a warning with the fix."""
    import logging

    from conftest import tiny_lora_adapter
    from tunelab.model.adapters import read_adapter_config, vllm_issues

    plain = read_adapter_config(tiny_lora_adapter(tiny_model_dir, tmp_path / "plain"))
    assert vllm_issues(plain) == []
    assert {"q_proj", "down_proj"} <= set(plain["target_modules"]) and plain["r"] and plain["lora_alpha"]
    dora = read_adapter_config(tiny_lora_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True))
    assert any("DoRA" in issue for issue in vllm_issues(dora))
    assert any("--max-lora-rank 64" in issue for issue in vllm_issues({**plain, "r": 64}))
    assert vllm_issues({**plain, "bias": "all"}) and vllm_issues({**plain, "target_modules": ".*proj"})

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.model.adapters import save_trained

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with caplog.at_level(logging.WARNING):
        save_trained(model, None, tmp_path / "a")
        save_trained(model, None, tmp_path / "b")
    assert sum("DoRA" in r.message for r in caplog.records) == 1  # once per run, not per checkpoint

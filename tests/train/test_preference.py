"""Preference stages: tokenizing pairs, one forward for both sides, the reference model,
bad input, and short runs through `tunelab train`."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import shared_tokenizer, tiny_llama
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.data.collate import IGNORE_INDEX
from tunelab.data.preference_tokenize import (
    assign_kl_completions,
    collate_kto,
    collate_pairs,
    encode_kto,
    encode_pair,
    fit_lengths,
)
from tunelab.data.templates import resolve_template
from tunelab.data.types import KTOExample, Message, PreferencePair
from tunelab.errors import TunelabError
from tunelab.model.adapters import prepare_for_training
from tunelab.train.objectives import check_stage, objective_class
from tunelab.train.objectives.preference import KTOObjective, sequence_logps
from tunelab.train.runlog import read_log

TEMPLATE = "phi3.5"  # the phi3 vocabulary is the smallest shared one: cheap logits

QUESTIONS = [
    ("What is the capital of France?", "Paris.", "Berlin."),
    ("How many legs does a spider have?", "Eight.", "Six."),
    ("What colour is the sky on a clear day?", "Blue.", "Green."),
    ("What is 3 times 4?", "It is 12.", "It is 7."),
    ("Which planet is closest to the sun?", "Mercury is.", "Jupiter is."),
    ("What do bees make?", "Honey.", "Milk."),
    ("What is frozen water called?", "Ice.", "Steam."),
    ("How many days are in a week?", "Seven days.", "Ten days."),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one intra-op thread


@pytest.fixture(scope="module")
def tok():
    return shared_tokenizer("phi3")


@pytest.fixture(scope="module")
def template(tok):
    return resolve_template(TEMPLATE, tok)


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-phi3-llama")
    tiny_llama(tok, initializer_range=0.2).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def pair(question="What is 2+2?", chosen="It is 4.", rejected="It is 5.", source="pairs.jsonl:1"):
    return PreferencePair([Message("user", question)], Message("assistant", chosen),
                          Message("assistant", rejected), source)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pair_records(n=8):
    return [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in (QUESTIONS * 4)[:n]]


def kto_records(n=8):
    rows = []
    for q, c, r in (QUESTIONS * 4)[:n]:
        rows += [{"instruction": q, "output": c, "kto_tag": True}, {"instruction": q, "output": r, "kto_tag": False}]
    return rows


def cfg_for(tmp_path, model_dir, data, **overrides):
    values = dict(stage="dpo", model_name_or_path=str(model_dir), dataset=[str(data)], template=TEMPLATE,
                  cutoff_len=64, per_device_train_batch_size=4, learning_rate=1e-3, lora_rank=4, lora_alpha=8,
                  lora_dropout=0.0, max_steps=4, logging_steps=1, save_strategy="no", report_to=["jsonl"],
                  disable_tqdm=True, device="cpu", output_dir=str(tmp_path / "run"), plot_loss=False)
    values.update(overrides)
    return load_config(None, values)


# --- tokenizing pairs --------------------------------------------------------------------

def test_pair_shares_one_prompt_and_labels_only_the_answers(tok, template):
    row = encode_pair(pair(), tok, template, cutoff_len=64)
    # The prompt ends with the assistant header (the tokenizer's decode may add spaces after
    # special tokens, so compare without trailing white space) and each answer starts exactly
    # at its own first token: nothing of the header is labelled, nothing of the answer is not.
    assert tok.decode(row.prompt).rstrip().endswith("<|assistant|>")
    assert tok.decode(row.chosen).startswith("It is 4.")
    assert tok.decode(row.rejected).startswith("It is 5.")
    assert tok.decode([t for t in row.chosen_labels if t != IGNORE_INDEX]).startswith("It is 4.")
    batch = collate_pairs([row, row], pad_token_id=tok.pad_token_id)
    n_prompt = len(row.prompt)
    # Every sequence starts with the same prompt tokens, none of them labelled.
    assert all(batch["input_ids"][i, :n_prompt].tolist() == row.prompt for i in range(4))
    assert (batch["labels"][:, :n_prompt] == IGNORE_INDEX).all()
    assert batch["labels"][0, n_prompt:n_prompt + 3].tolist() == row.chosen[:3]
    assert batch["labels"][2, n_prompt:n_prompt + 3].tolist() == row.rejected[:3]
    assert batch["n_examples"] == 2 and batch["attention_mask"].shape == batch["input_ids"].shape


def test_truncation_cuts_the_prompt_from_the_left_and_both_answers_alike(tok, template):
    long_question = "Please think carefully about this question. " * 8 + "What is 2+2?"
    full = encode_pair(pair(long_question), tok, template, cutoff_len=1000)
    cut = encode_pair(pair(long_question), tok, template, cutoff_len=24)
    assert len(cut) <= 24
    assert len(cut.prompt) < len(full.prompt) and full.prompt[-len(cut.prompt):] == cut.prompt
    assert (cut.chosen, cut.rejected) == (full.chosen, full.rejected)  # short answers are kept whole


def test_fit_lengths_budget():
    assert fit_lengths(10, 5, 100) == (10, 5)
    assert fit_lengths(90, 20, 100) == (80, 20)  # short answer kept whole
    assert fit_lengths(20, 90, 100) == (20, 80)  # short prompt kept whole
    assert fit_lengths(150, 50, 100) == (75, 25)  # both long: in proportion


def test_pair_identical_after_truncation_is_refused(tok, template):
    same_start = pair(chosen="The answer is four. " * 10 + "Yes.", rejected="The answer is four. " * 10 + "No.")
    with pytest.raises(TunelabError, match="same within cutoff_len"):
        encode_pair(same_start, tok, template, cutoff_len=20)


# --- one forward for both sides ------------------------------------------------------------

def test_concatenated_forward_equals_separate_forwards(tok, template):
    model = tiny_llama(tok, initializer_range=0.2)
    rows = [encode_pair(pair(q, c, r), tok, template, 64) for q, c, r in QUESTIONS[:3]]
    batch = collate_pairs(rows, tok.pad_token_id)
    together, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    sequences = [(r.prompt + r.chosen, r.chosen_labels, len(r.prompt)) for r in rows] + \
                [(r.prompt + r.rejected, r.rejected_labels, len(r.prompt)) for r in rows]
    for i, (ids, answer_labels, n_prompt) in enumerate(sequences):
        # By hand: log-softmax of the next-token logits, gathered at each labelled token.
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        labels = [IGNORE_INDEX] * n_prompt + answer_labels
        expected = sum(logp[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX)
        assert together[i].item() == pytest.approx(expected, abs=1e-4)
        assert counts[i].item() == sum(lab != IGNORE_INDEX for lab in answer_labels)


# --- the reference model -------------------------------------------------------------------

def objective_on(tok, template, cfg, model, pairs):
    objective = objective_class(cfg.stage)(cfg, tok)
    rows = [encode_pair(p, tok, template, cfg.cutoff_len) for p in pairs]
    objective.rows = rows
    objective.setup(model, torch.device("cpu"))
    return objective, collate_pairs(objective.rows, tok.pad_token_id)


def test_fresh_lora_reference_is_the_disabled_adapter_and_first_dpo_loss_is_log_two(tmp_path, tok, template):
    cfg = cfg_for(tmp_path, "unused", "unused.jsonl")
    base = tiny_llama(tok, initializer_range=0.2)
    pairs = [pair(q, c, r) for q, c, r in QUESTIONS[:4]]
    rows = [encode_pair(p, tok, template, 64) for p in pairs]
    plain = collate_pairs(rows, tok.pad_token_id)
    with torch.no_grad():
        base_logps, _ = sequence_logps(base, plain["input_ids"], plain["attention_mask"], plain["labels"])
    model = prepare_for_training(base, cfg)
    objective, batch = objective_on(tok, template, cfg, model, pairs)
    assert objective.ref_source == "adapter_disabled" and objective.ref_model is None
    loss, metrics = objective.loss(model, batch)
    assert loss.item() / 4 == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # Once the adapter moves, the policy departs while the reference stays the base model.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    assert torch.allclose(objective.reference_logps(model, batch), base_logps, atol=1e-5)
    loss, _ = objective.loss(model, batch)
    assert abs(loss.item() / 4 - math.log(2)) > 1e-3
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_started_adapter_and_full_finetuning_get_the_model_at_setup_as_reference(tmp_path, tok, template):
    pairs = [pair(q, c, r) for q, c, r in QUESTIONS[:3]]
    lora_cfg = cfg_for(tmp_path, "unused", "unused.jsonl")
    model = prepare_for_training(tiny_llama(tok, initializer_range=0.2), lora_cfg)
    with torch.no_grad():  # as if loaded from an SFT adapter: the disabled adapter is not the reference
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    objective, batch = objective_on(tok, template, lora_cfg, model, pairs)
    assert objective.ref_source == "precomputed" and "ref_logps" in batch
    policy, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.allclose(batch["ref_logps"], policy.detach(), atol=1e-5)
    assert objective.loss(model, batch)[0].item() / 3 == pytest.approx(math.log(2), abs=1e-5)

    full_cfg = cfg_for(tmp_path, "unused", "unused.jsonl", finetuning_type="full")
    full = prepare_for_training(tiny_llama(tok, initializer_range=0.2), full_cfg)
    objective, batch = objective_on(tok, template, full_cfg, full, pairs)
    assert objective.ref_source == "frozen_copy"
    assert not any(p.requires_grad for p in objective.ref_model.parameters())
    assert objective.loss(full, batch)[0].item() / 3 == pytest.approx(math.log(2), abs=1e-5)

    precomputed_cfg = cfg_for(tmp_path, "unused", "unused.jsonl", finetuning_type="full",
                              precompute_ref_log_probs=True)
    objective, batch = objective_on(tok, template, precomputed_cfg, full, pairs)
    assert objective.ref_model is None and "ref_logps" in batch


# --- KTO -----------------------------------------------------------------------------------

def test_kto_mismatched_completions_come_from_other_examples(tok, template):
    examples = [KTOExample([Message("user", q)], Message("assistant", c), i % 2 == 0, f"k:{i}")
                for i, (q, c, _) in enumerate(QUESTIONS[:5])]
    rows = [encode_kto(e, tok, template, 64) for e in examples]
    assign_kl_completions(rows, seed=0, cutoff_len=64)
    completions = [r.completion for r in rows]
    assert all(r.kl_completion != r.completion and r.kl_completion in completions for r in rows)
    assert sorted(map(tuple, (r.kl_completion for r in rows))) == sorted(map(tuple, completions))
    batch = collate_kto(rows, tok.pad_token_id)
    assert batch["desirable"].tolist() == [True, False, True, False, True]
    # The mismatched batch keeps each row's own prompt.
    assert batch["kl_input_ids"][1, :len(rows[1].prompt)].tolist() == rows[1].prompt


def test_kto_balance_warnings(tmp_path, model_dir, tok, capsys):
    only_good = write_jsonl(tmp_path / "good.jsonl", [r for r in kto_records(4) if r["kto_tag"]])
    KTOObjective(cfg_for(tmp_path, model_dir, only_good, stage="kto"), tok).load_data()
    assert "all 4 KTO examples are desirable" in capsys.readouterr().err
    skewed = write_jsonl(tmp_path / "skewed.jsonl", kto_records(6) + [r for r in kto_records(6) if not r["kto_tag"]])
    KTOObjective(cfg_for(tmp_path, model_dir, skewed, stage="kto"), tok).load_data()
    err = capsys.readouterr().err
    assert "6 desirable and 12 undesirable" in err and "kto_desirable_weight=2" in err


# --- bad input -----------------------------------------------------------------------------

def load(tmp_path, model_dir, records, tok, **overrides):
    data = write_jsonl(tmp_path / "data.jsonl", records)
    cfg = cfg_for(tmp_path, model_dir, data, **overrides)
    return objective_class(cfg.stage)(cfg, tok).load_data()


def test_bad_pairs_name_the_line_and_skip_invalid_counts_them(tmp_path, model_dir, tok, capsys):
    good = pair_records(3)
    bad = good + [{"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}, {"prompt": "Hi?", "chosen": "Yes."}]
    with pytest.raises(TunelabError) as err:
        load(tmp_path, model_dir, bad, tok)
    assert "data.jsonl:4" in err.value.where and "same answer" in err.value.what
    train, _ = load(tmp_path, model_dir, bad, tok, skip_invalid=True)
    assert len(train) == 3 and "skipped 2 invalid record(s)" in capsys.readouterr().err


def test_bad_kto_tag_and_wrong_stage_are_user_errors(tmp_path, model_dir, tok):
    records = kto_records(2)
    records[1]["kto_tag"] = "yes"
    with pytest.raises(TunelabError, match="kto_tag must be true or false") as err:
        load(tmp_path, model_dir, records, tok, stage="kto")
    assert "data.jsonl:2" in err.value.where
    with pytest.raises(TunelabError, match="needs chosen/rejected pairs"):
        load(tmp_path, model_dir, kto_records(2), tok, stage="dpo")
    with pytest.raises(TunelabError, match="packing=true is not available for stage=dpo"):
        check_stage(cfg_for(tmp_path, model_dir, "data.jsonl", packing=True))


def test_kto_stage_trains_on_pairs_unpaired(tmp_path, model_dir, tok):
    train, _ = load(tmp_path, model_dir, pair_records(3), tok, stage="kto")
    assert len(train) == 6 and sum(r.desirable for r in train) == 3


# --- end to end through the CLI ------------------------------------------------------------

def run_cli(tmp_path, model_dir, stage, records, *extra) -> list[dict]:
    data = write_jsonl(tmp_path / f"{stage}.jsonl", records)
    out = tmp_path / f"run-{stage}"
    args = ["train", f"stage={stage}", f"model_name_or_path={model_dir}", f"dataset={data}",
            f"template={TEMPLATE}", "cutoff_len=64", "per_device_train_batch_size=4", "learning_rate=5e-3",
            "lora_rank=4", "lora_alpha=8", "lora_dropout=0", "logging_steps=1", "save_steps=1000",
            "report_to=jsonl", "disable_tqdm=true", "device=cpu", f"output_dir={out}", *extra]
    assert main(args) == 0
    assert (out / "adapter_model.safetensors").exists()
    return read_log(out / "trainer_log.jsonl")


def test_dpo_run_through_the_cli_logs_rewards_and_learns(tmp_path, model_dir):
    log = run_cli(tmp_path, model_dir, "dpo", pair_records(8), "max_steps=8", "pref_beta=0.5",
                  "val_size=4", "eval_strategy=steps", "eval_steps=8", "plot_loss=true")
    steps = [r for r in log if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert key in steps[-1]
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["rewards/margins"] > 0
    evals = [r for r in log if "eval_loss" in r]
    assert evals and "eval_rewards/accuracies" in evals[-1]
    assert (tmp_path / "run-dpo" / "training_loss.png").exists()


def test_kto_simpo_and_orpo_runs_through_the_cli(tmp_path, model_dir):
    kto = [r for r in run_cli(tmp_path, model_dir, "kto", kto_records(4), "max_steps=3") if "loss" in r]
    assert {"kl", "rewards/chosen", "rewards/rejected"} <= set(kto[-1])
    assert "count/chosen" not in kto[-1]
    simpo = [r for r in run_cli(tmp_path, model_dir, "simpo", pair_records(4), "max_steps=2", "pref_beta=2")
             if "loss" in r]
    assert "rewards/accuracies" in simpo[-1] and math.isfinite(simpo[-1]["loss"])
    orpo = [r for r in run_cli(tmp_path, model_dir, "orpo", pair_records(4), "max_steps=1") if "loss" in r]
    assert orpo[0]["loss"] > orpo[0]["nll"] > 0  # NLL of chosen plus the odds-ratio term


def test_training_from_an_sft_adapter_uses_it_as_reference(tmp_path, model_dir):
    first = run_cli(tmp_path, model_dir, "dpo", pair_records(4), "max_steps=3")
    adapter = tmp_path / "run-dpo"
    records = pair_records(4)
    data = write_jsonl(tmp_path / "again.jsonl", records)
    cfg = cfg_for(tmp_path, model_dir, data, adapter_name_or_path=str(adapter), max_steps=1,
                  output_dir=str(tmp_path / "run-again"))
    from tunelab.train.loop import train

    train(cfg)
    again = [r for r in read_log(tmp_path / "run-again" / "trainer_log.jsonl") if "loss" in r]
    # The started adapter is the reference: step 1 starts again at log 2, not at the first run's margin.
    assert first[-1]["loss"] != pytest.approx(math.log(2), abs=1e-3)
    assert again[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)

"""Dialogue folding keeps the training math: a folded run takes the unfolded run's optimizer steps
and learning-rate schedule, and each step's loss and gradient are those of the unfolded rows it
holds, on a tiny random model (CPU)."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import interrupted_after_step, tiny_llama
from tunelab.config import TunelabConfig, load_config
from tunelab.data.collate import batch_order
from tunelab.data.fold import fold_dialogues
from tunelab.data.templates import resolve_template
from tunelab.data.types import Conversation, Message
from tunelab.train import loop
from tunelab.train.dataset import encode_samples
from tunelab.train.distributed import rank_share
from tunelab.train.objectives.sft import SFTObjective
from tunelab.train.runlog import read_log

pytestmark = pytest.mark.usefixtures("one_thread")

TURNS = [3, 4, 2, 5, 1, 3]  # answers per dialogue: 18 rows stored as growing prefixes, as the hotel set


def dialogue_rows() -> list[list[tuple[str, str, bool]]]:
    """Row k of dialogue d: its first k exchanges, trained on the last answer only."""
    rows = []
    for d, turns in enumerate(TURNS):
        exchanges = [(f"dialogue {d} question {k}: " + "word " * (d + k), f"answer {d}.{k} " + "ok " * (3 * k + d))
                     for k in range(turns)]
        for k in range(1, turns + 1):
            rows.append([(role, text, i == 2 * k - 1) for i, (role, text) in
                         enumerate(m for pair in exchanges[:k] for m in zip(("user", "assistant"), pair))])
    return rows


def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "dialogues.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": r, "content": c, "weight": int(t)} for r, c, t in row]})
                            + "\n" for row in dialogue_rows()), encoding="utf-8")
    return path


def run(tmp_path, model_dir, name, **overrides):
    values = dict(model_name_or_path=str(model_dir), dataset=[str(data_file(tmp_path))], dataset_format="messages",
                  cutoff_len=512, num_train_epochs=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  learning_rate=5e-3, lr_scheduler_type="linear", warmup_ratio=0.2, lora_rank=4, lora_alpha=8,
                  lora_dropout=0.0, logging_steps=1, save_steps=3, val_size=0, eval_strategy="no",
                  report_to=["jsonl"], disable_tqdm=True, device="cpu", output_dir=str(tmp_path / name))
    values.update(overrides)
    cfg = load_config(None, values)
    loop.train(cfg)
    return [r for r in read_log(Path(cfg.output_dir) / "trainer_log.jsonl") if "loss" in r]


def test_a_folded_run_takes_the_unfolded_runs_steps_and_schedule(tmp_path, tiny_model_dir, capsys, monkeypatch):
    unfolded = run(tmp_path, tiny_model_dir, "unfolded", fold_dialogues=False)
    folded = run(tmp_path, tiny_model_dir, "folded")
    err = capsys.readouterr().err
    # At most a step's 4 rows per sequence: the 5-row dialogue folds into two sequences.
    assert "folded 18 rows into 7 sequences; a step takes 4 rows' answers as before (5 steps per epoch)" in err
    # 18 rows, 2 rows x 2 micro-batches a step, 2 epochs: 2 x ceil(9 / 2) = 10 steps either way
    # (counting the 7 folded sequences instead, it was 2 x ceil(4 / 2) = 4).
    assert [r["step"] for r in folded] == [r["step"] for r in unfolded] == list(range(1, 11))
    assert [r["learning_rate"] for r in folded] == pytest.approx([r["learning_rate"] for r in unfolded])
    assert [r["epoch"] for r in folded] == [r["epoch"] for r in unfolded]

    # Resumable: interrupted after step 4 and resumed, the folded run logs the same losses.
    with interrupted_after_step(monkeypatch, 4):
        run(tmp_path, tiny_model_dir, "resumed")
    resumed = run(tmp_path, tiny_model_dir, "resumed", resume_from_checkpoint="latest")
    assert [r["step"] for r in resumed] == list(range(1, 11))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in folded], rel=1e-5)


def test_each_folded_step_has_the_loss_of_the_rows_it_holds(qwen2_tokenizer):
    """Every optimizer step of a folded epoch: its loss (summed over its micro-batches, divided by
    its target tokens, as train/step.py does) equals the loss of the unfolded rows it holds."""
    torch.manual_seed(0)
    template = resolve_template("chatml", qwen2_tokenizer)
    cfg = TunelabConfig(cutoff_len=512)
    rows = [Conversation([Message(r, c, train=t) for r, c, t in row], source=f"row{i}")
            for i, row in enumerate(dialogue_rows())]
    batch, per_step = 2, 2
    folded, _ = fold_dialogues(rows, max_rows=batch * per_step)
    samples, _ = encode_samples(folded, qwen2_tokenizer, template, cfg)
    unfolded, _ = encode_samples(rows, qwen2_tokenizer, template, cfg)
    # A folded sequence holds its leaf row and the rows before it in its dialogue (the nearest ones).
    held = {}
    for i, conv in enumerate(folded):
        leaf = int(conv.source.removeprefix("row"))
        held[i] = list(range(leaf - samples[i].rows + 1, leaf + 1))
    assert sorted(r for ids in held.values() for r in ids) == list(range(len(rows)))

    model = tiny_llama(qwen2_tokenizer).eval()
    objective = SFTObjective(cfg, qwen2_tokenizer)

    def step_loss(micro_batches) -> tuple[float, torch.Tensor]:
        """The step's loss as train/step.py computes it, and its gradient (of the LM head)."""
        model.zero_grad()
        batches = [objective.collate(mb) for mb in micro_batches]
        weight = sum(objective.weight(b) for b in batches)
        total = 0.0
        for b in batches:
            loss_sum, _ = objective.loss(model, b)
            (loss_sum / weight).backward()
            total += float(loss_sum)
        return total / weight, model.lm_head.weight.grad.clone()

    order = batch_order([len(s) for s in samples], batch, seed=0, epoch=0, rows=[s.rows for s in samples],
                        per_step=per_step)
    steps = [order[s:s + per_step] for s in range(0, len(order), per_step)]
    assert len(steps) == math.ceil(math.ceil(len(rows) / batch) / per_step)  # the unfolded epoch's steps
    for step in steps:
        ids = [i for mb in step for i in mb]
        answers = [r for i in ids for r in held[i]]
        assert abs(len(answers) - batch * per_step) < max(TURNS) or step is steps[-1]
        folded_loss, folded_grad = step_loss([[samples[i] for i in mb] for mb in step if mb])
        # The unfolded rows, padded into one batch (padding never enters the loss).
        unfolded_loss, unfolded_grad = step_loss([[unfolded[r] for r in answers]])
        assert folded_loss == pytest.approx(unfolded_loss, rel=1e-5)
        assert torch.allclose(folded_grad, unfolded_grad, rtol=1e-4, atol=1e-7)
        assert sum(len(samples[i]) for i in ids) <= sum(len(unfolded[r]) for r in answers)
        # Under two processes each takes a part of the step, and together they take all of it.
        shares = [rank_share([mb for mb in step if mb], rank, 2) for rank in range(2)]
        assert sorted(i for share in shares for mb in share for i in mb) == sorted(ids)

"""Continued pre-training from a stream (`stage: pt`, `streaming: true`): read as the steps need it,
the same losses as the same blocks in memory, exact resume, hub datasets streamed offline."""

import json
import random
from pathlib import Path

import pytest

from conftest import hub_dataset_repo
from tunelab.config import load_config
from tunelab.data import readers
from tunelab.data.collate import batch_order
from tunelab.errors import TunelabError
from tunelab.train import loop
from tunelab.train.objectives import PTObjective
from tunelab.train.runlog import read_log
from tunelab.train.streaming import BlockStream
from tunelab.train.tracking import Tracker

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the hotel room breakfast guest night price view quiet staff garden city train".split()


def corpus(path: Path, n: int, seed: int = 0) -> Path:
    """`n` plain-text records of 8 to 30 words (about 10 to 40 tokens each) written to `path`."""
    rng = random.Random(seed)
    records = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def settings(tmp_path, model_dir, data, out, **overrides):
    values = dict(stage="pt", streaming=True, packing=True, model_name_or_path=str(model_dir), dataset=[str(data)],
                  cutoff_len=64, max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                  learning_rate=1e-2, lora_rank=4, lora_alpha=8, lora_dropout=0.0, logging_steps=1,
                  save_strategy="no", eval_strategy="no", val_size=0, output_dir=str(tmp_path / out),
                  report_to=["jsonl"], disable_tqdm=True, device="cpu")
    values.update(overrides)
    return load_config(None, values)


def losses(cfg) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_log(Path(cfg.output_dir) / "trainer_log.jsonl") if "loss" in r]


def test_the_stream_is_read_as_the_steps_need_it(tmp_path, tiny_model_dir, monkeypatch):
    data = tmp_path / "corpus.jsonl"
    corpus(data, 400)
    read, at_step = {"rows": 0}, []
    real_jsonl, real_step = readers.READERS[".jsonl"], loop.optimizer_step

    def counting_reader(path):
        for row in real_jsonl(path):
            read["rows"] += 1
            yield row

    def step(*args, **kwargs):
        at_step.append(read["rows"])  # rows read when each optimizer step starts
        return real_step(*args, **kwargs)

    monkeypatch.setitem(readers.READERS, ".jsonl", counting_reader)
    monkeypatch.setattr(loop, "optimizer_step", step)
    cfg = settings(tmp_path, tiny_model_dir, data, "run", max_steps=4, val_size=3, eval_strategy="steps",
                   eval_steps=2)
    assert loop.train(cfg).global_step == 4
    # A step takes 2 blocks of <= 64 tokens: a handful of 10-40-token records, never the whole corpus.
    assert at_step == sorted(at_step) and len(set(at_step)) == 4, at_step  # each step read its own rows
    assert at_step[1] <= 3 + 2 * 14, at_step  # after 2 steps' data: the 3 held out + about 2 steps' worth
    assert read["rows"] < 60  # of 400
    evals = [r for r in read_log(Path(cfg.output_dir) / "trainer_log.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]


def test_streamed_losses_equal_the_same_blocks_in_memory(tmp_path, tiny_model_dir, monkeypatch):
    data = tmp_path / "corpus.jsonl"
    corpus(data, 60)
    streamed = settings(tmp_path, tiny_model_dir, data, "streamed", gradient_accumulation_steps=2)
    loop.train(streamed)

    class BlocksInMemory(PTObjective):  # the stream's blocks, as a list, in the stream's order
        def load_data(self):
            return list(BlockStream(streamed, self.tokenizer).blocks()), []

    monkeypatch.setattr(loop, "batch_order", lambda lengths, size, seed, epoch, group_by_length, **rows: batch_order(
        lengths, size, seed, epoch, group_by_length=False, shuffle=False, **rows))
    in_memory = settings(tmp_path, tiny_model_dir, data, "in-memory", gradient_accumulation_steps=2, streaming=False)
    loop.train(in_memory, objective_factory=BlocksInMemory)
    a, b = losses(streamed), losses(in_memory)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    assert [x for _, x in a] == pytest.approx([y for _, y in b], rel=1e-6)


def test_blocks_are_packed_in_order_and_resume_skips_what_was_trained(tmp_path, qwen2_tokenizer):
    data = corpus(tmp_path / "corpus.jsonl", 30)
    cfg = settings(tmp_path, "unused", data, "run", val_size=2)
    stream = BlockStream(cfg, qwen2_tokenizer)
    blocks = list(stream.blocks())
    assert all(len(b) <= 64 and sum(b.seq_lens) == len(b) for b in blocks)
    eos = qwen2_tokenizer.eos_token_id
    texts = qwen2_tokenizer.decode([t for b in blocks for t in b.input_ids]).split(qwen2_tokenizer.eos_token)
    assert texts[:-1] == [r["text"] for r in records(data)[2:]] and [b.input_ids[-1] for b in blocks[:1]] == [eos]
    assert [r.input_ids for r in stream.blocks(skip=3)] == [b.input_ids for b in blocks[3:]]
    assert len(stream.validation()) == 2


def test_interrupted_stream_resumes_on_the_same_blocks(tmp_path, tiny_model_dir, monkeypatch):
    data = tmp_path / "corpus.jsonl"
    corpus(data, 14)  # about 5 blocks of 2 a step: the 6 steps read the stream at least twice
    straight = settings(tmp_path, tiny_model_dir, data, "straight", max_steps=6)
    loop.train(straight)

    def interrupt_at_step_3(self, row, log=Tracker.log):
        log(self, row)
        if row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Tracker, "log", interrupt_at_step_3)
        loop.train(settings(tmp_path, tiny_model_dir, data, "cut", max_steps=6))
    resumed = settings(tmp_path, tiny_model_dir, data, "cut", max_steps=6, resume_from_checkpoint="latest")
    loop.train(resumed)
    a, b = losses(straight), losses(resumed)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    assert [x for _, x in a] == pytest.approx([y for _, y in b], rel=1e-5)
    epochs = [r["epoch"] for r in read_log(Path(straight.output_dir) / "trainer_log.jsonl") if "loss" in r]
    assert epochs[0] == 0 and epochs[-1] >= 1  # the stream was read again from its start


def test_a_hub_dataset_streams_from_the_local_cache(tmp_path, tiny_model_dir, offline_hub):
    data = corpus(tmp_path / "corpus.jsonl", 40)
    hub_dataset_repo(offline_hub, "acme/corpus", {"train.jsonl": records(data)})
    local = settings(tmp_path, tiny_model_dir, data, "local", max_steps=3)
    hub = settings(tmp_path, tiny_model_dir, "acme/corpus", "from-hub", max_steps=3)
    loop.train(local)
    loop.train(hub)
    assert [s for s, _ in losses(hub)] == [1, 2, 3]
    assert [x for _, x in losses(hub)] == pytest.approx([x for _, x in losses(local)], rel=1e-6)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"max_steps": -1, "num_train_epochs": 2}, "set max_steps"),
    ({"val_size": 0.1}, "val_size=200"),
    ({"max_samples": 10}, "max_samples_strategy=head"),
    ({"group_by_length": True}, "drop group_by_length"),
    ({"dataset": ["a.jsonl", "b.jsonl"], "interleave_probs": [0.5, 0.5]}, "no weights"),
])
def test_what_a_stream_cannot_do_is_refused(tmp_path, qwen2_tokenizer, overrides, message):
    data = tmp_path / "corpus.jsonl"
    corpus(data, 4)
    with pytest.raises(TunelabError) as err:
        BlockStream(settings(tmp_path, "unused", data, "run", **overrides), qwen2_tokenizer)
    assert message in err.value.fix


def test_streaming_local_files_is_only_for_pretraining(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    cfg = load_config(None, {"dataset": [str(data)], "streaming": True})
    with pytest.raises(TunelabError, match="streaming"):
        readers.hub_options(cfg)

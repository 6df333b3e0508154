"""Online RL and reward models end to end on a tiny random model: the reward rises on a toy
verifiable task, PPO logs what it should, a reward model learns pairs and loads as a scorer."""

import json

import pytest
import torch

from conftest import shared_tokenizer, tiny_llama
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.train.loop import train
from tunelab.train.runlog import read_log

TEMPLATE = "phi3.5"
# The toy verifiable task: answer in capitals (the reward is the share of upper-case letters).
REWARD_MODULE = '''
def capitals(prompt, completion, reference):
    letters = [c for c in completion if c.isascii() and c.isalpha()]
    return sum(c.isupper() for c in letters) / max(len(letters), 1)
'''


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one intra-op thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model whose vocabulary has one learnable feature: the embeddings of tokens
    that start with a capital share a direction (in a random vocabulary no class of tokens
    does, and a policy can only learn token by token, far too slowly for a test)."""
    tok = shared_tokenizer("phi3")
    folder = tmp_path_factory.mktemp("tiny-phi3-rl")
    model = tiny_llama(tok, initializer_range=0.2)
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    capitals = [i for i, t in enumerate(pieces) if t and t.lstrip("\u2581")[:1].isascii()
                and t.lstrip("\u2581")[:1].isupper()]
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.get_input_embeddings().weight[capitals] += 2.0 * direction / direction.norm()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "toyreward.py").write_text(REWARD_MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "toyreward:capitals"


def prompts_file(tmp_path, n=8):
    rows = [{"messages": [{"role": "user", "content": f"Write word number {i}."},
                          {"role": "assistant", "content": f"word{i}"}]} for i in range(n)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rl_config(tmp_path, model_dir, stage, **overrides):
    values = dict(stage=stage, model_name_or_path=str(model_dir), dataset=[str(prompts_file(tmp_path))],
                  template=TEMPLATE, cutoff_len=64, max_completion_length=6, num_generations=4,
                  per_device_train_batch_size=4, learning_rate=2e-2, lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                  max_steps=30, logging_steps=1, save_strategy="no", report_to=["jsonl"], disable_tqdm=True,
                  device="cpu", output_dir=str(tmp_path / f"run-{stage}"), plot_loss=False, seed=0,
                  lr_scheduler_type="constant")
    if stage == "rm":  # the keys of sampling are refused by a stage that does not sample
        del values["max_completion_length"], values["num_generations"]
    values.update(overrides)
    return load_config(None, values)


def rows_of(run_dir) -> list[dict]:
    return [r for r in read_log(run_dir / "trainer_log.jsonl") if "loss" in r]


@pytest.mark.slow
def test_grpo_raises_the_reward_of_a_verifiable_task(tmp_path, model_dir, reward_module):
    cfg = rl_config(tmp_path, model_dir, "grpo", reward=reward_module)
    train(cfg)
    rows = rows_of(tmp_path / "run-grpo")
    rewards = [r["reward"] for r in rows]
    assert len(rewards) == 30
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > first + 0.15, rewards
    for key in ("reward_std", "kl", "clip_fraction", "completion_length", "samples_per_second",
                "generation_share"):
        assert key in rows[-1]
    assert 0 < rows[-1]["generation_share"] < 1
    assert rows[-1]["kl"] > 0  # the policy moved away from the reference (the adapter disabled)
    from tunelab.evaluate.report import run_report

    report = run_report(tmp_path / "run-grpo")
    assert report.summary["last_reward"] == rewards[-1] and report.summary["first_reward"] == rewards[0]
    assert (report.out_dir / "reward.png").is_file()


def test_ppo_trains_a_value_head_and_clips_on_its_second_epoch(tmp_path, model_dir, reward_module):
    cfg = rl_config(tmp_path, model_dir, "ppo", reward=reward_module, max_steps=3, num_ppo_epochs=2)
    train(cfg)
    rows = rows_of(tmp_path / "run-ppo")
    assert len(rows) == 3
    for key in ("reward", "value_loss", "kl", "clip_fraction", "completion_length"):
        assert key in rows[-1]
    assert any(r["clip_fraction"] > 0 for r in rows)  # the second pass over a rollout is off-policy


def test_a_reward_that_names_a_task_needs_the_lent_scorer_which_tunelab_train_lends(tmp_path, model_dir):
    cfg = rl_config(tmp_path, model_dir, "grpo", reward="generic", max_steps=1)
    with pytest.raises(TunelabError, match="names a task"):
        train(cfg)
    args = [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in cfg.to_dict().items()
            if v is not None and k not in ("rope_scaling",)]
    assert main(["train", *args]) == 0
    assert "reward" in rows_of(tmp_path / "run-grpo")[-1]


def test_a_reward_model_learns_pairs_and_scores_as_a_reward(tmp_path, model_dir, reward_module):
    from tunelab.model.value_head import load_reward_model

    pairs = [{"prompt": f"Say {w}.", "chosen": w, "rejected": "1234"} for w in ("yes", "no", "maybe", "ok")] * 2
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    cfg = rl_config(tmp_path, model_dir, "rm", dataset=[str(data)], max_steps=12, learning_rate=1e-2)
    train(cfg)
    rows = rows_of(tmp_path / "run-rm")
    assert rows[-1]["rewards/accuracies"] == 1.0 and rows[-1]["loss"] < rows[0]["loss"]
    scorer = load_reward_model(tmp_path / "run-rm", device="cpu")
    tok = scorer.tokenizer
    good, bad = (tok(tok.apply_chat_template([{"role": "user", "content": "Say yes."},
                                              {"role": "assistant", "content": a}], tokenize=False),
                     add_special_tokens=False)["input_ids"] for a in ("yes", "1234"))
    s_good, s_bad = scorer.score([good, bad])
    assert s_good > s_bad
    # `tunelab eval` reports its pairwise accuracy, and reranks sampled answers with it
    assert main(["eval", "--reward-model", str(tmp_path / "run-rm"), "--data", str(data), "--device", "cpu"]) == 0
    scores = json.loads((tmp_path / "run-rm" / "eval" / "scores.json").read_text())["scores"]
    assert scores["pairs"] == len(pairs) and scores["pairwise_accuracy"] == 100.0
    out = tmp_path / "rerank"
    assert main(["eval", "--model", str(model_dir), "--data", str(prompts_file(tmp_path, 3)), "--template", TEMPLATE,
                 "--reward-model", str(tmp_path / "run-rm"), "--rerank", "3", "--temperature", "1.0",
                 "--max-new-tokens", "4", "--device", "cpu", "--output-dir", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["rerank_scores"]) == 3 for r in rows)
    # ... and a grpo run takes the folder as its reward
    grpo = rl_config(tmp_path, model_dir, "grpo", reward=str(tmp_path / "run-rm"), max_steps=1)
    train(grpo)
    assert "reward" in rows_of(tmp_path / "run-grpo")[-1]

"""Online RL (GRPO, PPO): the policy samples completions, a reward scores them, the loop trains on them.

One optimizer step of the shared loop (`loop.py`, through `step.rollout_step`):

    prompts   the step's rows: a conversation's context, and the turn it should produce (the reference)
    rollout   sample completions with the batched decoder (model/generate.py)       generation
              score them: reward(prompt, completion, reference) -> float             reward
              GRPO: advantages normalised within each prompt's group of completions
              PPO:  per-token KL-penalised rewards, GAE over the value head's estimates
              reference log-probs with the adapter disabled (or a frozen copy)
    update    clipped policy loss (+ KL to the reference, GRPO; + value loss, PPO), num_ppo_epochs times

The reward (`reward:` in the config) is a task's score (hotel, generic: lent by the CLI from
the evaluate stage, see DEVELOPERS.md "Hooks between stages"), a reward model trained with
stage=rm (model/value_head.py), or a Python function `module:function` with the signature
reward(prompt, completion, reference) -> float. Validation generates greedily on the
validation prompts: eval_reward is the mean reward, eval_loss its negative.
"""

from __future__ import annotations

import copy
import importlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.config import TunelabConfig
from tunelab.data.collate import pad_id_for
from tunelab.data.types import Conversation, Message
from tunelab.errors import TunelabError
from tunelab.train.losses import IGNORE_INDEX, shifted_token_losses
from tunelab.train.objectives.preference import lora_adds_nothing
from tunelab.train.rl_losses import (
    clipped_policy_loss,
    gae,
    group_advantages,
    grpo_loss,
    masked_mean,
    ppo_token_rewards,
    value_loss,
    whiten,
)
from tunelab.train.step import autocast, to_device

RL_KEYS = frozenset({"reward", "max_completion_length", "temperature", "kl_coef", "cliprange", "num_ppo_epochs",
                     "judge_url", "judge_model", "judge_dimensions"})


@dataclass
class PromptRow:
    prompt_ids: list[int]
    prompt: str  # the rendered prompt, as the reward sees it
    reference: str  # the turn a perfect model would write (its role line included where the template leaves it open)
    source: str

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]  # sampled tokens, the stop token included when the completion ended on it
    reward: float
    advantage: float = 0.0  # GRPO: one value for the whole completion
    group_std: float = 0.0  # GRPO: the spread of the rewards of its prompt's group
    token: dict = field(default_factory=dict)  # per completion token: ref_logps, old_logps, values, advantages, returns

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


# --- rewards ---------------------------------------------------------------------------------

def reward_kind(spec: str | None) -> str:
    """What `reward:` names: "function" (module:function), "model" (a folder), "judge" (an
    OpenAI-compatible judge: judge_url, judge_model) or "task"."""
    if not spec:
        return "none"
    if spec == "judge":
        return "judge"
    if Path(spec).expanduser().is_dir():
        return "model"
    if ":" in spec:
        return "function"
    return "task"


def check_judge_keys(cfg: TunelabConfig) -> None:
    """The judge keys go with `reward: judge`, and it needs its endpoint and model."""
    if (cfg.judge_url or cfg.judge_model or cfg.judge_dimensions) and cfg.reward != "judge":
        raise TunelabError(f"judge_url / judge_model / judge_dimensions are set but reward is {cfg.reward!r}",
                           where="config", fix="set reward: judge, or drop the judge keys")
    if cfg.reward == "judge" and not (cfg.judge_url and cfg.judge_model):
        raise TunelabError("reward: judge needs judge_url and judge_model", where="config",
                           fix="e.g. judge_url: http://127.0.0.1:8001/v1 and judge_model: qwen2.5-72b-instruct "
                               "(an API key goes in $TUNELAB_JUDGE_API_KEY)")


def import_reward(spec: str):
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TunelabError(f"reward {spec}: cannot import {module_name} ({exc})", where="reward",
                           fix="put the module on PYTHONPATH (or next to where you run tunelab)") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise TunelabError(f"reward {spec}: {module_name} has no function {name}", where="reward",
                           fix="write reward: module:function, with reward(prompt, completion, reference) -> float")
    return fn


class Scorer:
    """Rewards of a batch of completions, whatever `reward:` names."""

    def __init__(self, cfg: TunelabConfig, lent, device):
        kind = reward_kind(cfg.reward)
        self.model = None
        if kind == "none":
            raise TunelabError(f"stage={cfg.stage} needs a reward", where="config",
                               fix="set reward: hotel (the task's score), a stage=rm run folder, or module:function")
        if kind == "model":
            from tunelab.model.value_head import load_reward_model

            self.model = load_reward_model(cfg.reward, device=device, dtype="bfloat16" if cfg.bf16 else "float32")
        elif kind == "function":
            self.fn = import_reward(cfg.reward)
        elif lent is None:
            raise TunelabError(f"reward={cfg.reward} names a {kind}, whose score the training stage cannot import",
                               where="config", fix="run `tunelab train`, or pass train(cfg, reward=lend_reward(cfg)) "
                                                   "(tunelab.evaluate.tasks)")
        else:
            self.fn = lent

    def __call__(self, prompts: list[PromptRow], completions: list[list[int]], texts: list[str]) -> list[float]:
        if self.model is not None:
            return self.model.score([p.prompt_ids + c for p, c in zip(prompts, completions)])
        if hasattr(self.fn, "batch"):  # e.g. the judge: one batch of requests, sent concurrently
            return [float(v) for v in self.fn.batch([p.prompt for p in prompts], texts, [p.reference for p in prompts])]
        out = []
        for prompt, text in zip(prompts, texts):
            value = self.fn(prompt.prompt, text, prompt.reference)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TunelabError(f"the reward returned {value!r} for {prompt.source}", where="reward",
                                   fix="return a float from reward(prompt, completion, reference)")
            out.append(float(value))
        return out


# --- the objective ---------------------------------------------------------------------------

class OnlineObjective:
    """What GRPO and PPO share: prompts, sampling, rewards, the reference, the per-token batch."""

    stage = ""
    keys = RL_KEYS
    speed_paths = frozenset()  # per-token log-probs of padded rows: the plain forward
    perplexity = False
    trains_on_conversations = True
    chat = True
    sharded = False
    multi_process = False  # one process: the rollouts are not split across ranks yet
    group_size = 1

    @staticmethod
    def first_sample(cfg: TunelabConfig, tokenizer, template) -> tuple[str, list[int], list[int]]:
        """The first conversation as its turns render (`tunelab train --dry-run`); a rollout samples
        the answer turn itself."""
        from tunelab.train.objectives.sft import first_conversation_sample

        return first_conversation_sample(cfg, tokenizer, template)

    def __init__(self, cfg: TunelabConfig, tokenizer, reward=None):
        check_judge_keys(cfg)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pad_id = pad_id_for(tokenizer)
        self.lent_reward = reward
        self.ref_model = None
        self.use_adapter_off = False
        self.updates_per_step = cfg.num_ppo_epochs
        self.generation_seconds = 0.0  # of the last rollout

    # -- data --------------------------------------------------------------------------------

    def load_data(self) -> tuple[list, list]:
        from tunelab.data.templates import lock_template
        from tunelab.data.tokenize import stop_token_ids
        from tunelab.train.dataset import read_conversations

        cfg = self.cfg
        train_convs, eval_convs, _ = read_conversations(cfg)
        self.template = lock_template(self.tokenizer, cfg.template, cfg.system_prompt)
        self.stop_ids = stop_token_ids(self.tokenizer, self.template)
        train, evals = self._prompts(train_convs), self._prompts(eval_convs)
        if not train:
            raise TunelabError("no training prompt is left", where=", ".join(cfg.dataset),
                               fix=f"raise cutoff_len above max_completion_length={cfg.max_completion_length} plus "
                                   "the prompts' length, or check the data with `tunelab data check`")
        print(f"{len(train)} training prompts, {len(evals)} validation", file=sys.stderr)
        return train, evals

    def _prompts(self, convs: list[Conversation]) -> list[PromptRow]:
        """Each conversation's context as the prompt, its last turn as the reference."""
        from tunelab.data.tokenize import encode_conversation, encode_prompt

        rows, too_long = [], 0
        budget = self.cfg.cutoff_len - self.cfg.max_completion_length
        for conv in convs:
            if conv.is_plain_text or len(conv.messages) < 2:
                raise TunelabError(f"stage={self.cfg.stage} needs conversations (a prompt and the turn to produce)",
                                   where=conv.source, fix="give chat records: a context and a final answer")
            *context, last = conv.messages
            prompt_ids = encode_prompt(context, self.tokenizer, self.template, tools=conv.tools)
            if len(prompt_ids) > budget:
                too_long += 1
                continue
            target = Conversation([Message(m.role, m.content, train=False) for m in context]
                                  + [Message(last.role, last.content, train=True)], source=conv.source,
                                  tools=conv.tools)
            encoded = encode_conversation(target, self.tokenizer, self.template, self.cfg.cutoff_len + 4096, "last")
            answer = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
            reference = self.tokenizer.decode(answer, skip_special_tokens=True).strip()
            rows.append(PromptRow(prompt_ids, self.tokenizer.decode(prompt_ids), reference, conv.source))
        if too_long:
            print(f"skipped {too_long} prompt(s) longer than cutoff_len - max_completion_length = {budget} tokens",
                  file=sys.stderr)
        return rows

    # -- reference and reward -------------------------------------------------------------------

    def setup(self, model, device) -> None:
        self.device = device
        self.score = Scorer(self.cfg, self.lent_reward, device)
        if self.cfg.kl_coef > 0:
            if self.cfg.finetuning_type == "lora" and lora_adds_nothing(model):
                self.use_adapter_off = True
            else:  # a started adapter or full weights: the policy as it is now, frozen
                self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
            print(f"reference model: {'adapter disabled' if self.use_adapter_off else 'frozen copy'}",
                  file=sys.stderr)

    @torch.no_grad()
    def _token_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs [rows, tokens - 1] (and values with a value head)."""
        logits, values = self._forward(model, batch)
        losses, _ = shifted_token_losses(logits, batch["labels"])
        return -losses, values

    def _forward(self, model, batch: dict):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return logits, None

    def _reference_logps(self, model, batch: dict) -> torch.Tensor:
        if self.ref_model is not None:
            return self._token_logps(self.ref_model, batch)[0]
        with model.disable_adapter():
            return self._token_logps(model, batch)[0]

    # -- rollouts -----------------------------------------------------------------------------

    def rollout(self, model, micro_rows: list[list[PromptRow]]) -> list[list[Rollout]]:
        """The step's prompts (per micro-batch) -> scored completions (per micro-batch)."""
        from tunelab.model.generate import GenerationOptions, generate_batch
        from tunelab.train.fast import eager_layers

        cfg = self.cfg
        prompts = [row for rows in micro_rows for row in rows for _ in range(self.group_size)]
        options = GenerationOptions(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature)
        started = time.perf_counter()
        with eager_layers(model):  # compiled layers would recompile for every cache length
            generations = generate_batch(model, self.tokenizer, [p.prompt_ids for p in prompts], options,
                                         stop_ids=self.stop_ids, batch_size=len(prompts), progress=False)
        self.generation_seconds = time.perf_counter() - started
        completions = [g.token_ids + ([self.stop_ids[0]] if g.finish_reason == "stop" else []) for g in generations]
        rewards = self.score(prompts, completions, [g.text for g in generations])
        rollouts = [Rollout(p.prompt_ids, c or [self.stop_ids[0]], r) for p, c, r in zip(prompts, completions, rewards)]
        self._advantages(rollouts)
        out, start = [], 0
        was_training = model.training
        model.eval()
        try:
            for rows in micro_rows:
                chunk = rollouts[start:start + len(rows) * self.group_size]
                start += len(chunk)
                self._score_tokens(model, chunk)
                out.append(chunk)
        finally:
            model.train(was_training)
        self._after_scoring([r for chunk in out for r in chunk])
        return out

    def _advantages(self, rollouts: list[Rollout]) -> None:
        """Sequence-level advantages from the rewards (GRPO); PPO's come after scoring the tokens."""

    def _after_scoring(self, rollouts: list[Rollout]) -> None:
        """Per-token advantages (PPO)."""

    def _score_tokens(self, model, chunk: list[Rollout]) -> None:
        """Reference (and behaviour-policy) per-token log-probs of one micro-batch, kept in the rollouts."""
        batch = to_device(self.collate(chunk, complete=False), self.device)
        with autocast(self.cfg, self.device):
            wanted = {}
            if self.cfg.kl_coef > 0:
                wanted["ref_logps"] = self._reference_logps(model, batch)
            if self.needs_old_logps():
                wanted["old_logps"], values = self._token_logps(model, batch)
                if values is not None:
                    wanted["values"] = values[:, :-1]
        for i, rollout in enumerate(chunk):
            start, n = len(rollout.prompt_ids) - 1, len(rollout.completion_ids)
            for key, tensor in wanted.items():
                rollout.token[key] = tensor[i, start:start + n].float().cpu()

    def needs_old_logps(self) -> bool:
        """The first update of a rollout is on-policy (ratio 1: the log-probs of the update's own
        forward, detached); later ones (num_ppo_epochs > 1) compare with the sampling policy's."""
        return self.updates_per_step > 1

    # -- batches and loss -----------------------------------------------------------------------

    def collate(self, rows: list[Rollout], complete: bool = True) -> dict:
        """Right-padded prompt + completion; per-token values aligned with the shifted labels."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            seq = r.prompt_ids + r.completion_ids
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, len(r.prompt_ids):len(seq)] = torch.tensor(r.completion_ids)
            mask[i, :len(seq)] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask,
                 "rewards": torch.tensor([r.reward for r in rows]),
                 "advantages": torch.tensor([r.advantage for r in rows]),
                 "group_std": torch.tensor([r.group_std for r in rows])}
        if complete:
            for key in rows[0].token:
                values = torch.zeros((len(rows), width - 1))
                for i, r in enumerate(rows):
                    start = len(r.prompt_ids) - 1
                    values[i, start:start + len(r.completion_ids)] = r.token[key]
                batch[key] = values
        return batch

    def weight(self, batch: dict) -> int:
        return len(batch["input_ids"])  # completions: each one's loss is the mean over its tokens

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits, values = self._forward(model, batch)
        token_losses, mask = shifted_token_losses(logits, batch["labels"])
        logps = -token_losses
        old = batch.get("old_logps", logps.detach())
        losses, stats = self.sequence_losses(logps, old, batch, mask, values)
        lengths = mask.sum(-1).float()
        metrics = {"reward": float(batch["rewards"].sum()), "completion_length": float(lengths.sum())}
        metrics |= {k: float(v.sum()) for k, v in stats.items()}
        return losses.sum(), metrics

    def sequence_losses(self, logps, old, batch, mask, values):
        raise NotImplementedError

    # -- validation -------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, model, rows: list[PromptRow]) -> tuple[float, dict[str, float]]:
        """Greedy completions of (up to eval_generate_samples) validation prompts, scored: the
        mean reward (eval_reward) and its negative as eval_loss (lower is better, as for losses)."""
        from tunelab.model.generate import GenerationOptions, generate_batch
        from tunelab.train.fast import eager_layers

        rows = rows[:self.cfg.eval_generate_samples]
        options = GenerationOptions(max_new_tokens=self.cfg.max_completion_length)
        with eager_layers(model):
            generations = generate_batch(model, self.tokenizer, [r.prompt_ids for r in rows], options,
                                         stop_ids=self.stop_ids, batch_size=self.cfg.per_device_eval_batch_size,
                                         progress=False)
        rewards = self.score(rows, [g.token_ids for g in generations], [g.text for g in generations])
        mean = sum(rewards) / max(len(rewards), 1)
        return -mean, {"reward": mean}


class GRPOObjective(OnlineObjective):
    """Group relative policy optimisation: num_generations completions per prompt, each one's
    advantage its reward against its group's; the KL to the reference is a loss term."""

    stage = "grpo"
    keys = RL_KEYS | {"num_generations"}

    def __init__(self, cfg: TunelabConfig, tokenizer, reward=None):
        super().__init__(cfg, tokenizer, reward)
        self.group_size = cfg.num_generations

    def _advantages(self, rollouts: list[Rollout]) -> None:
        rewards = torch.tensor([r.reward for r in rollouts])
        advantages = group_advantages(rewards, self.group_size)
        spread = rewards.view(-1, self.group_size).std(-1) if self.group_size > 1 else torch.zeros(
            len(rollouts))
        for i, r in enumerate(rollouts):
            r.advantage = float(advantages[i])
            r.group_std = float(spread[i // self.group_size])

    def sequence_losses(self, logps, old, batch, mask, values):
        losses, stats = grpo_loss(logps, old, batch.get("ref_logps"), batch["advantages"], mask,
                                  self.cfg.cliprange, self.cfg.kl_coef)
        return losses, stats | {"reward_std": batch["group_std"]}


class PPOObjective(OnlineObjective):
    """PPO with a value head on the policy: one completion per prompt, per-token rewards with
    the KL penalty, GAE advantages, clipped policy and value losses."""

    stage = "ppo"
    keys = RL_KEYS | {"vf_coef", "cliprange_value", "gamma", "lam"}

    def setup(self, model, device) -> None:
        from tunelab.model.value_head import attach_head

        attach_head(model)  # before the reference copy, whose forward then has the same outputs
        super().setup(model, device)

    def _forward(self, model, batch: dict):
        from tunelab.model.value_head import token_values

        return token_values(model, batch["input_ids"], batch["attention_mask"])

    def needs_old_logps(self) -> bool:
        return True  # the KL penalty of the rewards and the values come from the sampling policy

    def _after_scoring(self, rollouts: list[Rollout]) -> None:
        """Per-token rewards, GAE, advantages whitened over the step's tokens."""
        width = max(len(r.completion_ids) for r in rollouts)

        def padded(key: str) -> torch.Tensor:
            out = torch.zeros((len(rollouts), width))
            for i, r in enumerate(rollouts):
                out[i, :len(r.completion_ids)] = r.token[key] if key in r.token else 0.0
            return out

        mask = torch.zeros((len(rollouts), width))
        for i, r in enumerate(rollouts):
            mask[i, :len(r.completion_ids)] = 1
        old, values = padded("old_logps"), padded("values")
        ref = padded("ref_logps") if self.cfg.kl_coef > 0 else old
        scores = torch.tensor([r.reward for r in rollouts])
        rewards = ppo_token_rewards(scores, old, ref, mask, self.cfg.kl_coef)
        advantages, returns = gae(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
        advantages = whiten(advantages, mask)
        for i, r in enumerate(rollouts):
            n = len(r.completion_ids)
            r.token["advantages"], r.token["returns"] = advantages[i, :n], returns[i, :n]

    def sequence_losses(self, logps, old, batch, mask, values):
        policy, clipped = clipped_policy_loss(logps, old, batch["advantages"], mask, self.cfg.cliprange)
        v_loss = value_loss(values[:, :-1], batch["values"], batch["returns"], mask, self.cfg.cliprange_value)
        losses = masked_mean(policy, mask, dim=-1) + self.cfg.vf_coef * v_loss
        stats = {"clip_fraction": masked_mean(clipped, mask, dim=-1), "value_loss": v_loss.detach()}
        if "ref_logps" in batch:
            stats["kl"] = masked_mean((old - batch["ref_logps"]), mask, dim=-1)
        return losses, stats

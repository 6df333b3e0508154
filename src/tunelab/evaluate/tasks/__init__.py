"""Evaluation tasks by name (`tunelab eval --task NAME`).

A task says how to read a data file into prompts + references and how to score
predictions; see `base.py` for the interface. Adding one = one module + one line here.
"""

from __future__ import annotations

from tunelab.errors import TunelabError, nearest
from tunelab.evaluate.tasks.base import EvalSample, Task, perplexity_scores
from tunelab.evaluate.tasks.generic import GenericTask
from tunelab.evaluate.tasks.hotel import HotelTask

TASKS: dict[str, type[Task]] = {"generic": GenericTask, "hotel": HotelTask}

__all__ = ["TASKS", "EvalSample", "Task", "get_task", "lend_reward", "perplexity_scores"]


def get_task(name: str) -> Task:
    if name not in TASKS:
        hint = nearest(name, TASKS)
        raise TunelabError(f"unknown task {name!r}", where="--task",
                           fix=(f"did you mean --task {hint}? " if hint else "") + "tasks: " + ", ".join(TASKS))
    return TASKS[name]()


def lend_reward(cfg):
    """What `reward:` names for grpo / ppo when it lives here, above training: a task's own score
    of one completion (`reward: hotel`), or an OpenAI-compatible judge (`reward: judge`)."""
    if cfg.reward == "judge":
        from tunelab.evaluate.judge import JudgeReward

        return JudgeReward.from_config(cfg)
    return get_task(cfg.reward).reward

"""What an evaluation task is: how to read samples, and how to score predictions.

A task never touches a model. The runner turns each `EvalSample` into a prompt, generates,
and hands the task plain rows (`reference`, `prediction`, `meta`, and, when perplexity
was asked for, `ref_loss`/`ref_tokens`), so `--predictions FILE` can re-score a saved run
with exactly the same code.

To add a task, write one module in this package with a `Task` subclass and add it to
`TASKS` in `__init__.py`:

    class MyTask(Task):
        name = "mytask"
        default_template = None          # or a built-in template name the task needs
        default_metrics = ("bleu",)      # used when --metrics is not given
        def load(self, path, fmt="auto", limit=None) -> list[EvalSample]: ...
        def score_row(self, row, metrics) -> dict: ...      # per-sample scores
        def aggregate(self, rows, metrics) -> dict: ...     # the summary table
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from tunelab.data.types import Conversation, Message
from tunelab.errors import TunelabError
from tunelab.train.runlog import perplexity


@dataclass
class EvalSample:
    source: str  # "path:line", for error messages and the predictions file
    prompt: list[Message]  # the conversation the model continues
    target: Message  # the reference turn as the template renders it (for teacher-forced ppl)
    reference: str  # the text a perfect model would generate (what metrics compare against)
    meta: dict = field(default_factory=dict)  # JSON-able extras the task's scorer needs
    tools: list | None = None

    def conversation(self) -> Conversation:
        """Prompt + reference turn, the reference marked as the only target."""
        target = Message(self.target.role, self.target.content, train=True)
        context = [Message(m.role, m.content, train=False) for m in self.prompt]
        return Conversation(context + [target], source=self.source, tools=self.tools)


class Task(ABC):
    name: str = ""
    default_template: str | None = None  # None = the user's --template (default: the model's own)
    default_metrics: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()  # every name `--metrics` may pick for this task
    # `--constrain-json`: after this text a completion must be a JSON object ("" = from its
    # start), with keys from json_keys when given (see model/constrain.py).
    json_marker: str = ""
    json_keys: tuple[str, ...] = ()

    @abstractmethod
    def load(self, path, fmt: str = "auto", limit: int | None = None) -> list[EvalSample]:
        """Samples of a data file; raise TunelabError (naming path:line) for unusable rows."""

    @abstractmethod
    def samples_from(self, convs: list[Conversation]) -> list[EvalSample]:
        """Samples of conversations already read (training's validation split)."""

    @abstractmethod
    def score_row(self, row: dict, metrics: tuple[str, ...]) -> dict:
        """Per-sample scores of one predictions row (JSON-able)."""

    @abstractmethod
    def aggregate(self, rows: list[dict], metrics: tuple[str, ...]) -> dict:
        """The summary scores over all rows (each row already has its `scores`)."""

    def mistake(self, row: dict) -> str | None:
        """What is wrong with a scored prediction (e.g. "wrong slots"), or None if it is
        acceptable: `tunelab data mine-pairs` keeps the wrong ones as rejected answers."""
        return None

    def breakdown(self, rows: list[dict]) -> dict:
        """Where the score is lost (see evaluate/breakdown.py); rows already scored."""
        return {}

    def reward(self, prompt: str, completion: str, reference: str) -> float:
        """The task's score of one completion as a reward in [0, 1] for online RL (stage grpo /
        ppo with `reward: TASK`): what we measure is what we optimise."""
        raise TunelabError(f"the {self.name} task has no reward", where="reward",
                           fix="use reward: hotel or generic, a reward model folder, or module:function")


def is_empty(prediction: str | None) -> bool:
    return prediction is None or not prediction.strip()


def perplexity_scores(rows: list[dict]) -> dict:
    """Reference-token perplexity pooled over rows (token-weighted, as a loss over a set is)."""
    tokens = sum(r.get("ref_tokens", 0) for r in rows)
    if not tokens:
        return {"ppl": math.nan, "ref_loss": math.nan}
    loss = sum(r["ref_nll"] for r in rows if r.get("ref_tokens")) / tokens
    return {"ppl": perplexity(loss), "ref_loss": loss}

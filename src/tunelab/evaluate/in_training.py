"""Task metrics during training: at every evaluation, generate on a validation subset
and score it with the task (slot F1, BLEU-4, exact match...).

The training loop calls `TaskMetrics(model, tokenizer, step)` as one of its
`eval_callbacks`; the returned values are logged as `eval_<name>` (TensorBoard, the
JSONL log, `tunelab report`) and any of them can be `metric_for_best_model`, which then
picks the best checkpoint and drives early stopping. The loop never imports this module:
`tunelab/cli.py` hands the factory to `tunelab train` (imports still flow one way).

Each evaluation's predictions are kept in RUN_DIR/task_eval/step-N.jsonl, so the
errors behind a number can be read (`tunelab eval --predictions FILE` re-scores one).
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

from tunelab.config import TunelabConfig
from tunelab.data.readers import load_conversations
from tunelab.data.templates import resolve_template
from tunelab.errors import TunelabError
from tunelab.evaluate import runner
from tunelab.evaluate.tasks import get_task
from tunelab.io import write_jsonl_atomic
from tunelab.model.generate import GenerationOptions
from tunelab.train.dataset import read_conversations
from tunelab.train.fast import eager_layers
from tunelab.train.fast.varlen import ATTN_NAME, base_model
from tunelab.train.objectives import objective_class
from tunelab.train.tracking import TASK_EVAL_DIR

# Counts, not scores: kept out of the training log.
COUNT_KEYS = ("samples", "search_rows", "assistant_rows", "slot_correct", "slot_predicted", "slot_expected")


def task_metric_callbacks(cfg: TunelabConfig) -> list:
    """The callbacks `tunelab train` passes to the loop: the task on the validation split, and on
    each of `eval_sets` (earlier stages' data: forgetting, logged as eval_NAME_METRIC)."""
    if not cfg.eval_task:
        return []
    return [TaskMetrics(cfg)] + [TaskMetrics(cfg, eval_set=(name, ref)) for name, ref in cfg.eval_sets.items()]


class TaskMetrics:
    def __init__(self, cfg: TunelabConfig, eval_set: tuple[str, str] | None = None):
        self.cfg = cfg
        self.eval_set = eval_set  # (name, file or earlier run folder): scored instead of the validation split
        self.task = get_task(cfg.eval_task)
        self.metrics = runner.parse_metrics(self.task, ",".join(cfg.eval_metrics))
        if "ppl" in self.metrics:  # the loop already reports eval_loss / eval_perplexity
            self.metrics = tuple(m for m in self.metrics if m != "ppl") or self.task.default_metrics
        self.samples = None
        self.template_src = None
        if not objective_class(cfg.stage).trains_on_conversations and not cfg.eval_task_dataset and not eval_set:
            raise TunelabError(f"eval_task={cfg.eval_task} with stage={cfg.stage} needs conversations to generate on",
                               where="config", fix="set eval_task_dataset=path/to/validation.jsonl "
                                                   "(rows of the task, e.g. hotel context/response rows)")

    def _prepare(self, tokenizer) -> None:
        if self.eval_set:
            from tunelab.train.dataset import earlier_conversations

            name, ref = self.eval_set
            val, _ = earlier_conversations(ref, "validation", f"eval_sets.{name}")
        elif self.cfg.eval_task_dataset:
            val = load_conversations(self.cfg.eval_task_dataset, system_prompt=self.cfg.system_prompt)
        else:
            _, val, _ = read_conversations(self.cfg)  # the same split the validation loss uses, unfolded
        rng = random.Random(self.cfg.seed)
        chosen = sorted(rng.sample(range(len(val)), min(self.cfg.eval_generate_samples, len(val))))
        self.samples = self.task.samples_from([val[i] for i in chosen])
        self.template_src = resolve_template(self.cfg.template, tokenizer)

    def __call__(self, model, tokenizer, step: int) -> dict[str, float]:
        if self.samples is None:
            self._prepare(tokenizer)
        if not self.samples:
            return {}
        options = GenerationOptions(max_new_tokens=self.cfg.eval_max_new_tokens)
        with plain_attention(model):
            generated = runner.predict(model, tokenizer, self.samples, self.template_src, options,
                                       task=self.task.name, batch_size=self.cfg.per_device_eval_batch_size,
                                       progress=False)
        summary = runner.score(self.task, generated.rows, self.metrics)
        folder = Path(self.cfg.output_dir) / TASK_EVAL_DIR / (self.eval_set[0] if self.eval_set else "")
        write_jsonl_atomic(folder / f"step-{step}.jsonl", generated.rows)
        prefix = f"{self.eval_set[0]}_" if self.eval_set else ""
        return {prefix + k: float(v) for k, v in summary.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in COUNT_KEYS}


@contextlib.contextmanager
def plain_attention(model):
    """Generate with SDPA and uncompiled layers while training runs padding-free and compiled: the
    varlen kernel takes only flattened batches, not a padded batch with a KV cache
    (`padding_free=true`), and a KV cache would make compiled layers recompile every token."""
    inner = base_model(model)
    current = getattr(inner.config, "_attn_implementation", None)
    with eager_layers(model):
        if current != ATTN_NAME:
            yield
            return
        inner.set_attn_implementation("sdpa")
        try:
            yield
        finally:
            inner.set_attn_implementation(current)

"""Forgetting probes: the loss on earlier stages' data (`eval_sets`) at every evaluation.

Each named set is a conversation file or an earlier run folder (its held-out validation
rows, rebuilt from its config.yaml, and tokenized as that run did: its cutoff_len, template,
truncation and folding, so the number is the same quantity as that run's eval_loss). The loss is next-token loss on the target turns,
whatever this stage optimises, so a DPO stage still says how much of the SFT stage's task
it keeps. Logged as `eval_NAME_loss` beside `eval_loss`.
"""

from __future__ import annotations

import dataclasses
import sys

from tunelab.config import TunelabConfig
from tunelab.train.objectives.sft import SFTObjective

# How an earlier run turned its conversations into tokens: a probe of its data does the same.
ENCODING_KEYS = ("stage", "cutoff_len", "template", "system_prompt", "train_on", "truncation", "fold_dialogues")


class EvalSets:
    def __init__(self, cfg: TunelabConfig, tokenizer):
        from tunelab.data.templates import resolve_template, with_default_system
        from tunelab.train.dataset import earlier_conversations, encode_side

        self.cfg = cfg
        self.objective = SFTObjective(cfg, tokenizer)
        self.rows = {}
        for name, ref in cfg.eval_sets.items():
            convs, earlier = earlier_conversations(ref, "validation", f"eval_sets.{name}")
            enc = cfg if earlier is None else dataclasses.replace(
                cfg, **{k: getattr(earlier, k) for k in ENCODING_KEYS if k != "stage" or earlier.stage == "sft"})
            template = with_default_system(resolve_template(enc.template, tokenizer), enc.system_prompt)
            self.rows[name], _ = encode_side(convs, tokenizer, template, enc, f"eval set {name}")
            print(f"eval set {name}: {len(self.rows[name])} samples from {ref}", file=sys.stderr)

    def losses(self, model, device, dist) -> dict[str, float]:
        from tunelab.train.step import evaluate

        return {f"eval_{name}_loss": evaluate(model, self.objective, rows, self.cfg, device, dist)[0]
                for name, rows in self.rows.items()}

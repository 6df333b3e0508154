"""Forgetting probes: the loss on earlier stages' data (`eval_sets`) at every evaluation.

Each named set is a conversation file or an earlier run folder (its held-out validation
rows, rebuilt from its config.yaml). The loss is next-token loss on the target turns,
whatever this stage optimises, so a DPO stage still says how much of the SFT stage's task
it keeps. Logged as `eval_NAME_loss` beside `eval_loss`.
"""

from __future__ import annotations

import sys

from tunelab.config import TunelabConfig
from tunelab.train.objective import SFTObjective


class EvalSets:
    def __init__(self, cfg: TunelabConfig, tokenizer):
        from tunelab.data.templates import resolve_template, with_default_system
        from tunelab.train.dataset import earlier_conversations, encode_side

        self.cfg = cfg
        self.objective = SFTObjective(cfg, tokenizer)
        template = with_default_system(resolve_template(cfg.template, tokenizer), cfg.system_prompt)
        self.rows = {}
        for name, ref in cfg.eval_sets.items():
            convs = earlier_conversations(ref, "validation", f"eval_sets.{name}")
            self.rows[name], _ = encode_side(convs, tokenizer, template, cfg, f"eval set {name}")
            print(f"eval set {name}: {len(self.rows[name])} samples from {ref}", file=sys.stderr)

    def losses(self, model, device, dist) -> dict[str, float]:
        from tunelab.train.loop import evaluate

        return {f"eval_{name}_loss": evaluate(model, self.objective, rows, self.cfg, device, dist)[0]
                for name, rows in self.rows.items()}

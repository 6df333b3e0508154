"""Preference training (DPO, SimPO, KTO, ORPO): one objective class per stage, one loop.

The loop (`loop.py`) is shared with SFT; this file says what a preference step computes:

    rows    pairs (or KTO examples) tokenized with one shared prompt      preference_tokenize.py
    batch   chosen and rejected stacked, scored in one forward pass
    loss    sum over pairs of the stage's loss on sequence log-probs      pref_losses.py
    weight  the number of pairs (examples for KTO): the loop averages over them

The reference model is the policy as it stands at `setup()` (the base, or the SFT model
given by `adapter_name_or_path`), obtained without a second copy whenever possible:
- LoRA whose fresh adapter adds nothing yet: the same weights with the adapter disabled;
- `precompute_ref_log_probs`, or LoRA starting from non-zero adapter weights (a loaded
  adapter, PiSSA): reference log-probs computed once in `setup()`, stored in the rows;
- full / freeze fine-tuning: a frozen copy (or precomputed log-probs, which free it).
SimPO and ORPO need no reference at all.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import torch

from tunelab.config import TunelabConfig
from tunelab.data.collate import pad_id_for
from tunelab.data.preference_tokenize import (
    KTORow,
    PairRow,
    assign_kl_completions,
    collate_kto,
    collate_pairs,
    encode_kto,
    encode_pair,
    encode_preferences,
    unpair,
)
from tunelab.data.types import KTOExample, PreferencePair
from tunelab.errors import TunelabError
from tunelab.train.losses import shifted_token_losses
from tunelab.train.pref_losses import dpo_loss, kto_kl_estimate, kto_loss, orpo_loss, simpo_loss
from tunelab.train.step import autocast, to_device

# KTO paper, section 4: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3].
KTO_BALANCE = (1.0, 4 / 3)


# --- log-probs -------------------------------------------------------------------------

def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of the labelled tokens' log-probs (fp32), and how many there are."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    token_losses, mask = shifted_token_losses(logits, labels)
    return -token_losses.sum(-1), mask.sum(-1)


def batch_logps(model, batch: dict, cfg: TunelabConfig, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of the batch's rows (`prefix`: KTO's `kl_` rows), through the speed levers
    (padding-free attention, chunked LM head) when the run takes them."""
    ids, mask, labels = (batch[f"{prefix}{k}"] for k in ("input_ids", "attention_mask", "labels"))
    if cfg.padding_free or cfg.fused_loss:
        from tunelab.train.fast import fast_sequence_logps

        return fast_sequence_logps(model, {"input_ids": ids, "attention_mask": mask, "labels": labels},
                                   bool(cfg.padding_free), bool(cfg.fused_loss))
    return sequence_logps(model, ids, mask, labels)


def lora_adds_nothing(model) -> bool:
    """True when every LoRA B matrix is zero: the adapter-disabled model *is* the model
    (a fresh adapter). A loaded adapter or PiSSA's initialisation is not."""
    found = False
    for name, param in model.named_parameters():
        if "lora_B" in name:
            found = True
            weight = param.detach()
            if hasattr(weight, "full_tensor"):  # FSDP2 shard: every rank must see (and decide on) all of it
                weight = weight.full_tensor()
            if torch.count_nonzero(weight):
                return False
    return found and hasattr(model, "disable_adapter")


class PreferenceObjective:
    """What the pairwise preference stages share: pairs read and tokenized with one prompt,
    chosen and rejected scored in one forward, a reference model where the loss needs one.
    A stage subclasses it with `pair_loss` (or `loss`, KTO)."""

    stage = ""
    keys = frozenset({"pref_beta"})
    speed_paths = frozenset({"padding_free", "fused_loss"})  # packing: a row pairs two answers to one prompt
    perplexity = False
    trains_on_conversations = False
    sharded = True  # the reference set-up runs with the root's weights gathered (distributed.DistributedObjective)
    uses_reference = True
    unit = "pairs"
    chat = True  # prompts and answers rendered with the chat template

    def __init__(self, cfg: TunelabConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pad_id = pad_id_for(tokenizer)
        self.ref_model = None  # a frozen copy (full fine-tuning without precomputed log-probs)
        self.ref_source = "adapter_disabled" if self.uses_reference else "none"
        self.rows: list = []
        self.mixture: dict | None = None  # what each dataset source gave (RUN_DIR/data_mixture.json)

    # -- data ----------------------------------------------------------------------------

    @staticmethod
    def first_sample(cfg: TunelabConfig, tokenizer, template) -> tuple[str, list[int], list[int]]:
        """(source, input ids, labels) of the first record as training encodes it: the chosen side
        of a pair (prompt masked), or a KTO example (`tunelab train --dry-run`)."""
        from tunelab.data.collate import IGNORE_INDEX
        from tunelab.data.readers import load_preferences

        item = load_preferences(cfg.dataset, cfg.dataset_format, max_samples=1, dataset_dir=cfg.dataset_dir)[0]
        if isinstance(item, KTOExample):
            row = encode_kto(item, tokenizer, template, cfg.cutoff_len)
            return item.source, row.prompt + row.completion, [IGNORE_INDEX] * len(row.prompt) + row.completion_labels
        row = encode_pair(item, tokenizer, template, cfg.cutoff_len)
        return f"{item.source} (chosen side)", row.prompt + row.chosen, [IGNORE_INDEX] * len(row.prompt) + row.chosen_labels

    def load_data(self) -> tuple[list, list]:
        from tunelab.data.readers import hub_options, load_preferences
        from tunelab.data.templates import lock_template
        from tunelab.train.dataset import no_validation_data, read_training_data

        cfg = self.cfg
        if not cfg.dataset:
            raise TunelabError("no training data given", where="config",
                               fix="set dataset: path/to/pairs.jsonl (prompt / chosen / rejected records)")
        read = dict(fmt=cfg.dataset_format, skip_invalid=cfg.skip_invalid, dataset_dir=cfg.dataset_dir,
                    hub=hub_options(cfg))

        def load(paths, limit):
            loaded = load_preferences(paths, max_samples=limit, **read)
            return self._for_stage(loaded, paths), loaded.skipped

        data = read_training_data(cfg, load)  # mixtures and max_samples as for SFT (train/dataset.py)
        train_items, eval_items, self.mixture = data.train, data.eval, data.mixture
        if cfg.eval_strategy != "no" and not eval_items:
            raise no_validation_data(cfg, train_items)
        template = lock_template(self.tokenizer, cfg.template)  # the saved tokenizer carries it
        train, _ = encode_preferences(train_items, self.tokenizer, template, cfg.cutoff_len, cfg.skip_invalid)
        evals, _ = encode_preferences(eval_items, self.tokenizer, template, cfg.cutoff_len, cfg.skip_invalid)
        if not train:
            raise TunelabError("no training pair is left after tokenization", where=", ".join(cfg.dataset_paths),
                               fix="check the data with `tunelab data check`, or raise cutoff_len")
        self._prepare_rows(train, evals)
        print(f"{len(train)} training {self.unit}, {len(evals)} validation", file=sys.stderr)
        self.rows = train + evals
        return train, evals

    def _prepare_rows(self, train: list, evals: list) -> None:
        """What a stage adds to its tokenized rows (KTO: mismatched completions for its KL estimate)."""

    def _for_stage(self, items: list, paths: list[str]) -> list:
        """The pairwise stages refuse KTO examples (KTO itself unpairs pairs)."""
        kto = [i for i in items if isinstance(i, KTOExample)]
        if kto:
            raise TunelabError(f"stage={self.stage} needs chosen/rejected pairs, but {kto[0].source} is a "
                               "KTO example (one answer with a kto_tag)", where=", ".join(paths),
                               fix="train KTO data with stage=kto, or give pairs (prompt, chosen, rejected)")
        return items

    # -- reference -----------------------------------------------------------------------

    def setup(self, model, device) -> None:
        """Choose how the reference is scored; precompute its log-probs where that is the way."""
        cfg = self.cfg
        if not self.uses_reference:
            return
        if cfg.precompute_ref_log_probs:
            self.ref_source = "precomputed"
        elif cfg.finetuning_type == "lora":
            self.ref_source = "adapter_disabled" if lora_adds_nothing(model) else "precomputed"
        else:
            self.ref_source = "frozen_copy"
        if self.ref_source == "precomputed":
            precompute_reference(model, self, device)
        elif self.ref_source == "frozen_copy":
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        print(f"reference model: {self.ref_source.replace('_', ' ')}", file=sys.stderr)

    @contextlib.contextmanager
    def reference(self, model):
        """The model that scores the reference log-probs (under no_grad)."""
        with torch.no_grad():
            if self.ref_model is not None:
                yield self.ref_model
            else:
                with model.disable_adapter():
                    yield model

    def reference_logps(self, model, batch: dict, prefix: str = "") -> torch.Tensor:
        if f"ref_{prefix}logps" in batch:
            return batch[f"ref_{prefix}logps"].float()
        if self.ref_source == "precomputed":
            raise RuntimeError("a batch without precomputed reference log-probs")  # rows come from load_data
        with self.reference(model) as ref:
            return batch_logps(ref, batch, self.cfg, prefix)[0]

    # -- batches and loss ----------------------------------------------------------------

    def collate(self, rows: list) -> dict:
        return collate_pairs(rows, self.pad_id)

    def weight(self, batch: dict) -> int:
        return batch["n_examples"]

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logps, counts = batch_logps(model, batch, self.cfg)  # one forward: chosen rows, then rejected rows
        n = batch["n_examples"]
        losses, r_chosen, r_rejected, extra = self.pair_loss(model, batch, logps, counts, n)
        return losses.sum(), pair_metrics(r_chosen, r_rejected, logps[:n].detach(), logps[n:].detach()) | extra

    def pair_loss(self, model, batch: dict, logps: torch.Tensor, counts: torch.Tensor, n: int):
        """Per-pair losses, chosen and rejected rewards, extra summed metrics (rows: chosen, then rejected)."""
        raise NotImplementedError


class DPOObjective(PreferenceObjective):
    stage = "dpo"
    keys = frozenset({"pref_beta", "pref_loss", "pref_label_smoothing", "precompute_ref_log_probs"})

    def pair_loss(self, model, batch, logps, counts, n):
        cfg = self.cfg
        ref = self.reference_logps(model, batch)
        losses, r_chosen, r_rejected = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], cfg.pref_beta,
                                                cfg.pref_loss, cfg.pref_label_smoothing)
        return losses, r_chosen, r_rejected, {}


class SimPOObjective(PreferenceObjective):
    stage = "simpo"
    keys = frozenset({"pref_beta", "pref_label_smoothing", "simpo_gamma"})
    uses_reference = False

    def pair_loss(self, model, batch, logps, counts, n):
        avg = logps / counts.clamp(min=1)
        losses, r_chosen, r_rejected = simpo_loss(avg[:n], avg[n:], self.cfg.pref_beta, self.cfg.simpo_gamma,
                                                  self.cfg.pref_label_smoothing)
        return losses, r_chosen, r_rejected, {}


class ORPOObjective(PreferenceObjective):
    stage = "orpo"
    uses_reference = False

    def pair_loss(self, model, batch, logps, counts, n):
        avg = logps / counts.clamp(min=1)
        losses, r_chosen, r_rejected, log_odds = orpo_loss(avg[:n], avg[n:], self.cfg.pref_beta)
        return losses, r_chosen, r_rejected, {"nll": float(-avg[:n].detach().sum()),
                                              "log_odds_ratio": float(log_odds.sum())}


class KTOObjective(PreferenceObjective):
    """Unpaired: each example is one answer marked desirable or not; pairs are unpaired."""

    stage = "kto"
    keys = frozenset({"pref_beta", "kto_desirable_weight", "kto_undesirable_weight", "precompute_ref_log_probs"})
    unit = "examples"

    def _for_stage(self, items: list, paths: list[str]) -> list:
        kto = [i for i in items if isinstance(i, KTOExample)]
        return kto + unpair([i for i in items if isinstance(i, PreferencePair)])

    def _prepare_rows(self, train: list, evals: list) -> None:
        warn_kto_balance(train, self.cfg)
        assign_kl_completions(train, self.cfg.seed, self.cfg.cutoff_len)
        if evals:
            assign_kl_completions(evals, self.cfg.seed, self.cfg.cutoff_len)

    def collate(self, rows: list) -> dict:
        return collate_kto(rows, self.pad_id)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        logps, _ = batch_logps(model, batch, cfg)
        with torch.no_grad():
            policy_kl, _ = batch_logps(model, batch, cfg, "kl_")
        ref = self.reference_logps(model, batch)
        kl = kto_kl_estimate(policy_kl, self.reference_logps(model, batch, "kl_"))
        desirable = batch["desirable"]
        losses, rewards = kto_loss(logps, ref, desirable, kl, cfg.pref_beta,
                                   cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
        return losses.sum(), kto_metrics(rewards, logps.detach(), desirable, kl)


def pair_metrics(r_chosen, r_rejected, logps_chosen, logps_rejected) -> dict[str, float]:
    """Sums over the batch (the loop divides by the number of pairs)."""
    return {
        "rewards/chosen": float(r_chosen.sum()),
        "rewards/rejected": float(r_rejected.sum()),
        "rewards/margins": float((r_chosen - r_rejected).sum()),
        "rewards/accuracies": float((r_chosen > r_rejected).float().sum()),
        "logps/chosen": float(logps_chosen.sum()),
        "logps/rejected": float(logps_rejected.sum()),
    }


def kto_metrics(rewards, logps, desirable, kl) -> dict[str, float]:
    """Sums; chosen / rejected metrics come with `count/...` so they average over their own class."""
    d = desirable.bool()
    return {
        "rewards/chosen": float(rewards[d].sum()), "rewards/rejected": float(rewards[~d].sum()),
        "logps/chosen": float(logps[d].sum()), "logps/rejected": float(logps[~d].sum()),
        "count/chosen": float(d.sum()), "count/rejected": float((~d).sum()),
        "kl": float(kl) * len(rewards),
    }


def warn_kto_balance(rows: list[KTORow], cfg: TunelabConfig) -> None:
    """Say when the desirable / undesirable balance is off the KTO paper's advice, and which weights fix it."""
    n_good = sum(r.desirable for r in rows)
    n_bad = len(rows) - n_good
    if not n_good or not n_bad:
        kind, other = ("desirable", "undesirable") if n_good else ("undesirable", "desirable")
        print(f"tunelab: warning: all {len(rows)} KTO examples are {kind}; KTO then only moves their "
              f"likelihood against the reference and kto_{other}_weight has no effect. Add {other} examples "
              f"(kto_tag={str(not n_good).lower()}) for a contrastive signal.", file=sys.stderr)
        return
    ratio = cfg.kto_desirable_weight * n_good / (cfg.kto_undesirable_weight * n_bad)
    low, high = KTO_BALANCE
    if not low <= ratio <= high:
        if n_good < n_bad:
            fix = f"kto_desirable_weight={n_bad / n_good:.3g} kto_undesirable_weight=1"
        else:
            fix = f"kto_desirable_weight=1 kto_undesirable_weight={n_good / n_bad:.3g}"
        print(f"tunelab: warning: {n_good} desirable and {n_bad} undesirable KTO examples give "
              f"desirable_weight*n_desirable / (undesirable_weight*n_undesirable) = {ratio:.3g}; the KTO paper "
              f"advises 1 to 4/3 so that neither class dominates the loss; e.g. set {fix}", file=sys.stderr)


@torch.no_grad()
def precompute_reference(model, objective: PreferenceObjective, device) -> None:
    """Score every row once with the model as it stands (the reference) and store the log-probs."""
    was_training = model.training
    model.eval()
    rows = sorted(objective.rows, key=len)  # similar lengths together: little padding
    size = objective.cfg.per_device_eval_batch_size
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        batch = to_device(objective.collate(chunk), device)
        with autocast(objective.cfg, device):
            logps = batch_logps(model, batch, objective.cfg)[0].float().cpu()
            if isinstance(chunk[0], KTORow):
                kl_logps = batch_logps(model, batch, objective.cfg, "kl_")[0].float().cpu()
        for i, row in enumerate(chunk):
            if isinstance(row, PairRow):
                row.ref_logps = (float(logps[i]), float(logps[len(chunk) + i]))
            else:
                row.ref_logps = (float(logps[i]), float(kl_logps[i]))
    print(f"precomputed reference log-probs of {len(rows)} rows", file=sys.stderr)
    model.train(was_training)

"""Held-out pairwise accuracy of a reward model (stage rm) against the raw log-prob baseline.

Rebuilds the run's own validation pairs (its config.yaml: dataset, val_size, seed), scores
chosen and rejected with the reward model, and with a policy's summed log-probs (the base, or
--adapter): accuracy = share of pairs where chosen scores higher.
  python bench/rm_pairs.py --run runs/hotel_rm --model smollm2-135m-instruct --adapter runs/hotel_lora
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tunelab.config import load_config
from tunelab.data.collate import pad_id_for
from tunelab.data.preference_tokenize import collate_pairs
from tunelab.model.adapters import load_adapter
from tunelab.model.loader import load_model
from tunelab.model.value_head import load_reward_model, sequence_scores
from tunelab.train.objectives.preference import sequence_logps
from tunelab.train.objectives.rm import RMObjective


@torch.no_grad()
def accuracy(score, rows, pad, device, batch=16) -> float:
    wins = 0
    for start in range(0, len(rows), batch):
        b = collate_pairs(rows[start:start + batch], pad)
        b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        s = score(b)
        n = b["n_examples"]
        wins += int((s[:n] > s[n:]).sum())
    return 100.0 * wins / max(len(rows), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    cfg = load_config(Path(args.run) / "config.yaml", {"eval_strategy": "no"})
    rm = load_reward_model(args.run, device=args.device)
    _, held_out = RMObjective(cfg, rm.tokenizer).load_data()
    pad = pad_id_for(rm.tokenizer)
    rm_acc = accuracy(lambda b: sequence_scores(rm.model, b["input_ids"], b["attention_mask"]), held_out, pad,
                      args.device)
    policy = load_model(args.model, device=args.device)
    if args.adapter:
        policy = load_adapter(policy, args.adapter)
    policy.eval()
    base_acc = accuracy(lambda b: sequence_logps(policy, b["input_ids"], b["attention_mask"], b["labels"])[0],
                        held_out, pad, args.device)
    print(f"held-out pairs: {len(held_out)}")
    print(f"reward model pairwise accuracy: {rm_acc:.2f}%")
    print(f"log-prob baseline ({'adapter ' + args.adapter if args.adapter else args.model}): {base_acc:.2f}%")


if __name__ == "__main__":
    main()

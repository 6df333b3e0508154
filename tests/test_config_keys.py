"""No key accepted and ignored: every TunelabConfig key is read by some stage, and a key only
some stages read is refused for the others (each objective's `keys`, train/objectives)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from tunelab.config import TunelabConfig, load_config
from tunelab.errors import TunelabError
from tunelab.train.objectives import STAGE_KEYS, STAGES, check_stage

SRC = Path(__file__).resolve().parents[1] / "src" / "tunelab"
KEYS = [f.name for f in dataclasses.fields(TunelabConfig)]

# A valid value other than the default for each stage-specific key.
NON_DEFAULT = {"pref_beta": 0.5, "pref_loss": "ipo", "pref_label_smoothing": 0.1, "simpo_gamma": 1.0,
               "kto_desirable_weight": 2.0, "kto_undesirable_weight": 2.0, "precompute_ref_log_probs": True,
               "train_on": "last", "truncation": "end", "fold_dialogues": True, "cliprange": 0.3,
               "cliprange_value": 0.3, "gamma": 0.9, "kl_coef": 0.1, "lam": 0.9, "max_completion_length": 64,
               "num_generations": 8, "num_ppo_epochs": 2, "reward": "hotel", "temperature": 0.7, "vf_coef": 0.2,
               "judge_url": "http://127.0.0.1:8001/v1", "judge_model": "judge-1", "judge_dimensions": "fact:is it true"}


def keys_read_outside_config() -> set[str]:
    """Attributes read on a config object (`cfg.x`, `self.cfg.x`, `user_cfg.x`) anywhere but
    config.py, and `getattr(cfg, "x")`: what some stage does with a key."""
    read = set()
    for path in SRC.rglob("*.py"):
        if path == SRC / "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and ast.unparse(node.value).split(".")[-1].endswith("cfg"):
                read.add(node.attr)
            elif (isinstance(node, ast.Call) and ast.unparse(node.func) == "getattr" and len(node.args) > 1
                  and isinstance(node.args[1], ast.Constant)):
                read.add(node.args[1].value)
    return read


# Keys the stages read through a config property or helper (train/dataset.py calls them).
READ_THROUGH_CONFIG = {"mix_strategy": "config.mix_strategy(cfg)", "interleave_probs": "cfg.dataset_sources",
                       "replay": "cfg.replay_spec"}


def test_every_key_is_read_by_some_stage():
    read = keys_read_outside_config()
    assert {"dataset_sources", "replay_spec"} <= read  # the helpers are used (mix_strategy(cfg): train/dataset.py)
    unread = [key for key in KEYS if key not in read and key not in READ_THROUGH_CONFIG]
    assert not unread, f"config keys no stage reads (accepted and ignored): {unread}"


@pytest.mark.parametrize("key", sorted(STAGE_KEYS))
def test_a_stage_specific_key_is_refused_where_it_would_be_ignored(key):
    assert NON_DEFAULT[key] != TunelabConfig.__dataclass_fields__[key].default
    for stage, objective in STAGES.items():
        cfg = TunelabConfig(stage=stage, **{key: NON_DEFAULT[key]})
        if key in objective.keys:
            check_stage(cfg)
        else:
            with pytest.raises(TunelabError, match=f"stage={stage} does not use {key}"):
                check_stage(cfg)
    for stage in STAGES:  # the default is never in the way
        check_stage(TunelabConfig(stage=stage))


def test_trust_remote_code_reaches_the_loaders(tmp_path, monkeypatch):
    from tunelab.model import loader
    from tunelab.train.loop import train

    seen = {}

    class Loaded(Exception):
        pass

    def fake_tokenizer(name_or_path, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(loader, "load_tokenizer", fake_tokenizer)
    cfg = load_config(None, {"trust_remote_code": True, "dataset": ["x.jsonl"], "device": "cpu",
                             "output_dir": str(tmp_path / "run"), "report_to": ["jsonl"]})
    with pytest.raises(Loaded):
        train(cfg)
    assert seen == {"trust_remote_code": True}

"""The stage table: one objective class per stage, each refusing the keys it would ignore."""

import subprocess
import sys

import pytest

from tunelab.config import CHOICES, TOKEN_STAGES, TunelabConfig
from tunelab.errors import TunelabError
from tunelab.train.objectives import STAGES, check_stage, objective_class, restrict_speed


def test_every_stage_has_one_objective_class_and_its_defaults_pass():
    assert set(STAGES) == set(CHOICES["stage"])
    for stage in STAGES:
        assert objective_class(stage).stage == stage
        check_stage(TunelabConfig(stage=stage))


def test_the_token_stages_are_the_objectives_with_a_perplexity():
    """config.TOKEN_STAGES (read by `tunelab report` and replay without importing torch) matches the objectives."""
    assert {stage for stage, cls in STAGES.items() if cls.perplexity} == set(TOKEN_STAGES)


@pytest.mark.parametrize("stage, key, value, reader", [
    ("dpo", "fold_dialogues", False, "sft"),
    ("dpo", "fold_dialogues", True, "sft"),  # auto (unset) is fine: only sft folds
    ("grpo", "fold_dialogues", True, "sft"),
    ("sft", "pref_beta", 0.5, "dpo"),
    ("dpo", "simpo_gamma", 1.0, "simpo"),
    ("simpo", "precompute_ref_log_probs", True, "dpo"),
    ("orpo", "kto_desirable_weight", 2.0, "kto"),
    ("pt", "fold_dialogues", False, "sft"),
])
def test_a_key_the_stage_would_ignore_is_refused_naming_the_stage_that_reads_it(stage, key, value, reader):
    with pytest.raises(TunelabError) as err:
        check_stage(TunelabConfig(stage=stage, **{key: value}))
    assert f"stage={stage} does not use {key}" in err.value.what and reader in err.value.what


def test_a_key_the_stage_reads_is_accepted():
    check_stage(TunelabConfig(stage="simpo", simpo_gamma=1.0, pref_label_smoothing=0.1))
    check_stage(TunelabConfig(stage="kto", kto_desirable_weight=2.0, precompute_ref_log_probs=True))
    check_stage(TunelabConfig(stage="sft", fold_dialogues=False, packing=True, padding_free=True))


def test_a_speed_path_the_stage_cannot_take_is_refused_forced_and_off_when_auto():
    with pytest.raises(TunelabError, match="packing=true is not available for stage=dpo"):
        check_stage(TunelabConfig(stage="dpo", packing=True))
    check_stage(TunelabConfig(stage="dpo", padding_free=True, fused_loss=True))  # preference logps take both
    sft = restrict_speed(TunelabConfig(), objective_class("sft"))
    assert sft.padding_free is None and sft.fused_loss is None  # auto: the speed plan decides


def test_the_train_loop_refuses_before_reading_anything(tmp_path):
    from tunelab.train.loop import train

    cfg = TunelabConfig(stage="dpo", fold_dialogues=False, dataset=[str(tmp_path / "missing.jsonl")],
                        output_dir=str(tmp_path / "run"))
    with pytest.raises(TunelabError, match="does not use fold_dialogues"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_objectives_do_not_reach_into_the_loop():
    """Preference and online stages use the public train/step.py, never loop internals."""
    code = ("import sys, tunelab.train.objectives; "
            "print('tunelab.train.loop' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""Fast by default: levers decided per device, micro-batches by token budget, out-of-memory back-off.

None of these may change what a step trains: the loss is averaged over the step's target
tokens however the step is split, and a retried step draws the same dropout masks.
"""

import pytest
import torch
from test_loop import config, losses

from tunelab.cli import main
from tunelab.config import describe_keys, load_config
from tunelab.data.collate import split_by_tokens
from tunelab.train.fast.plan import resolve_precision, resolve_speed
from tunelab.train.objectives.sft import SFTObjective
from tunelab.train.runlog import read_log

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only spin on a shared CPU


# --- the config -------------------------------------------------------------------------

def test_levers_default_to_auto_and_take_auto_true_false():
    cfg = load_config(None, ["padding_free=auto", "fused_loss=true", "max_tokens_per_batch=auto"])
    assert cfg.padding_free is None and cfg.fused_loss is True and cfg.max_tokens_per_batch is None
    assert load_config(None, []).torch_compile is None and load_config(None, []).bf16 is None
    assert "padding_free" in describe_keys() and "default: auto" in describe_keys()
    with pytest.raises(Exception, match="speed"):
        load_config(None, ["speed=fast"])
    with pytest.raises(Exception, match="max_tokens_per_batch"):
        load_config(None, ["max_tokens_per_batch=0"])


def test_cpu_takes_the_plain_path_and_says_why(tiny_model_dir, tmp_path):
    from tunelab.model.adapters import prepare_for_training
    from tunelab.model.loader import load_model

    cfg = resolve_precision(config(tmp_path, tiny_model_dir), torch.device("cpu"))
    assert cfg.bf16 is False and cfg.gradient_checkpointing is False
    model = prepare_for_training(load_model(str(tiny_model_dir), dtype="float32", device=torch.device("cpu")), cfg)
    plan = resolve_speed(cfg, model, torch.device("cpu"))
    assert (plan.cfg.padding_free, plan.cfg.fused_loss, plan.cfg.torch_compile) == (False, False, False)
    assert plan.cfg.max_tokens_per_batch is None and plan.cfg.group_by_length is True
    assert "padding-free off (plain path on cpu)" in plan.describe()
    forced = resolve_speed(cfg.__class__(**{**cfg.to_dict(), "fused_loss": True}), model, torch.device("cpu"))
    assert forced.cfg.fused_loss is True and "fused loss on (fused_loss=true)" in forced.describe()


def test_compiling_is_left_out_of_runs_too_short_to_repay_it(tiny_model_dir, tmp_path, monkeypatch):
    """Measured on an H100: the hotel recipe on SmolLM2-135M took 192 s compiled (98 s of it the first
    step) and 58 s eager. Auto compiles only when the eager run would take COMPILE_PAYS_AFTER_SECONDS."""
    from tunelab.model.adapters import prepare_for_training
    from tunelab.model.loader import load_model
    from tunelab.train.fast import plan

    cfg = resolve_precision(config(tmp_path, tiny_model_dir), torch.device("cpu"))
    model = prepare_for_training(load_model(str(tiny_model_dir), dtype="float32", device=torch.device("cpu")), cfg)
    monkeypatch.setattr(plan, "matmul_peak_flops", lambda device: 1e12)
    per_token = plan.training_flops_per_token(model)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert per_token == 4 * total + 2 * trained and trained < total / 10  # LoRA: ~4N a token
    pays_after = plan.COMPILE_PAYS_AFTER_SECONDS * plan.EAGER_MFU * 1e12 / per_token  # tokens
    cpu = torch.device("cpu")
    assert "short run" in plan.too_short_to_compile(model, int(pays_after * 0.9), cpu)
    assert plan.too_short_to_compile(model, int(pays_after * 1.1), cpu) is None
    # several processes decide on the smallest estimate: all compile, or none does
    assert "short run" in plan.too_short_to_compile(model, int(pays_after * 1.1), cpu, agree=lambda s: s // 2)
    # on the compiled path the decision shows in the speed line; torch_compile=true is honoured as given
    monkeypatch.setattr(plan, "_auto", lambda cfg, device: True)
    monkeypatch.setattr(plan, "triton_installed", lambda: True)
    monkeypatch.setattr(plan, "token_budget", lambda cfg, model, device: (4096, 2**30))
    short = plan.resolve_speed(cfg, model, cpu, train_tokens=1000)
    assert short.cfg.torch_compile is False and "compiled layers off (a short run" in short.describe()
    assert plan.resolve_speed(cfg, model, cpu, train_tokens=int(pays_after * 2)).cfg.torch_compile is True
    forced = plan.resolve_speed(cfg.__class__(**{**cfg.to_dict(), "torch_compile": True}), model, cpu,
                                train_tokens=1000)
    assert forced.cfg.torch_compile is True and "(torch_compile=true)" in forced.describe()


def test_deepspeed_zero3_leaves_the_layers_uncompiled_and_refuses_a_forced_compile(tiny_model_dir, tmp_path,
                                                                                      monkeypatch):
    """On 2 x H100 inductor failed to compile a decoder layer under ZeRO-3 (its weight gathers use
    aten.set_); ZeRO-2 compiled and trained. Auto leaves ZeRO-3 runs eager and says why."""
    from tunelab.errors import TunelabError
    from tunelab.model.adapters import prepare_for_training
    from tunelab.model.loader import load_model
    from tunelab.train.fast import plan

    cfg = resolve_precision(config(tmp_path, tiny_model_dir), torch.device("cpu"))
    model = prepare_for_training(load_model(str(tiny_model_dir), dtype="float32", device=torch.device("cpu")), cfg)
    monkeypatch.setattr(plan, "_auto", lambda cfg, device: True)
    monkeypatch.setattr(plan, "triton_installed", lambda: True)
    monkeypatch.setattr(plan, "token_budget", lambda cfg, model, device: (4096, 2**30))
    cpu, long_run = torch.device("cpu"), None  # train_tokens unknown: no short-run blocker
    with_keys = lambda **keys: cfg.__class__(**{**cfg.to_dict(), **keys})  # noqa: E731
    assert plan.resolve_speed(with_keys(deepspeed="zero2"), model, cpu, long_run).cfg.torch_compile is True
    zero3 = plan.resolve_speed(with_keys(deepspeed="zero3"), model, cpu, long_run)
    assert zero3.cfg.torch_compile is False and "DeepSpeed ZeRO-3" in zero3.describe()
    with pytest.raises(TunelabError, match="ZeRO-3"):
        plan.resolve_speed(with_keys(deepspeed="zero3", torch_compile=True), model, cpu, long_run)


def test_the_fast_path_trains_lora_through_the_lean_forward_and_dora_and_zero3_through_peft(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    from tunelab.model.adapters import prepare_for_training
    from tunelab.model.loader import load_model
    from tunelab.train.fast import apply_speed_levers, plan

    monkeypatch.setattr(plan, "_auto", lambda cfg, device: True)
    # ZeRO-3 gathers lora_A's weights in a hook on lora_A's own call, which the lean forward skips
    for keys, lean_expected in (({}, True), ({"use_dora": True}, False), ({"deepspeed": "zero3"}, False),
                                ({"deepspeed": "zero2"}, True)):
        cfg = resolve_precision(config(tmp_path, tiny_model_dir, **keys), torch.device("cpu"))
        model = prepare_for_training(load_model(str(tiny_model_dir), dtype="float32", device=torch.device("cpu")), cfg)
        apply_speed_levers(model, cfg.__class__(**{**cfg.to_dict(), "padding_free": False, "torch_compile": False}),
                           "cpu")
        lean = [hasattr(m, "_peft_forward") for m in model.modules() if type(m).__name__ == "Linear"
                and hasattr(m, "lora_A")]
        assert lean and all(flag is lean_expected for flag in lean), keys


def test_planned_tokens_count_epochs_steps_folded_rows_and_processes(tmp_path, tiny_model_dir):
    from tunelab.data.collate import Sample
    from tunelab.train.loop import planned_tokens

    rows = [Sample(input_ids=[1] * 100, labels=[1] * 100, rows=3), Sample(input_ids=[1] * 50, labels=[1] * 50)]
    cfg = config(tmp_path, tiny_model_dir, max_steps=-1, num_train_epochs=2)
    assert planned_tokens(rows, cfg, world=1) == 300
    assert planned_tokens(rows, cfg, world=2) == 150
    # max_steps: a step takes batch x accumulation x processes rows of the data (a folded sample holds several)
    cfg = config(tmp_path, tiny_model_dir, max_steps=10, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert planned_tokens(rows, cfg, world=1) == 10 * 4 * 150 // 4
    assert planned_tokens([], cfg, world=1) is None


# --- micro-batches by tokens --------------------------------------------------------------

def test_split_by_tokens_fills_budgets_and_never_cuts_a_sample():
    lengths = [5, 90, 30, 30, 10, 200]
    batches = split_by_tokens(range(6), lengths, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert [5] in batches  # the 200-token sample goes alone
    assert all(sum(lengths[i] for i in b) <= 100 for b in batches if b != [5])
    padded = split_by_tokens(range(6), lengths, max_tokens=100, padded=True)  # cost: samples x longest
    assert all(len(b) * max(lengths[i] for i in b) <= 100 for b in padded if len(b) > 1)
    assert split_by_tokens([], lengths, 100) == []


def test_token_budget_changes_nothing_but_the_split(tmp_path, tiny_model_dir):
    from tunelab.train.loop import train

    common = dict(eval_strategy="no", save_strategy="no", max_steps=4, per_device_train_batch_size=3,
                  gradient_accumulation_steps=2, lora_dropout=0.0)
    train(config(tmp_path, tiny_model_dir, out="by_count", **common))
    train(config(tmp_path, tiny_model_dir, out="by_tokens", max_tokens_per_batch=40, **common))
    by_count, by_tokens = losses(tmp_path / "by_count"), losses(tmp_path / "by_tokens")
    assert len(by_count) == 4 and [s for s, _ in by_count] == [s for s, _ in by_tokens]
    for (_, a), (_, b) in zip(by_count, by_tokens):
        assert a == pytest.approx(b, rel=1e-5)


# --- out of memory ----------------------------------------------------------------------------

def _oom_above(monkeypatch, limit: int):
    """Make every micro-batch with more than `limit` real tokens fail as a GPU would."""
    calls = []
    real_loss = SFTObjective.loss

    def loss(self, model, batch):
        tokens = int(batch["attention_mask"].sum())
        calls.append(tokens)
        if model.training and tokens > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return real_loss(self, model, batch)

    monkeypatch.setattr(SFTObjective, "loss", loss)
    return calls


def test_out_of_memory_retries_the_step_smaller_and_trains_the_same(tmp_path, tiny_model_dir, monkeypatch,
                                                                     capsys):
    from tunelab.train.loop import train

    common = dict(eval_strategy="no", save_strategy="no", max_steps=3, per_device_train_batch_size=4,
                  gradient_accumulation_steps=1, lora_dropout=0.0, cutoff_len=64)
    train(config(tmp_path, tiny_model_dir, out="fits", **common))
    calls = _oom_above(monkeypatch, limit=120)
    train(config(tmp_path, tiny_model_dir, out="backoff", **common))
    err = capsys.readouterr().err
    assert "out of memory at step 1: retrying the step with" in err
    assert max(calls) > 120 and any(c <= 120 for c in calls)  # it failed, then went on in smaller pieces
    fits, backoff = losses(tmp_path / "fits"), losses(tmp_path / "backoff")
    assert len(fits) == len(backoff) == 3
    for (_, a), (_, b) in zip(fits, backoff):  # same samples, same math: the same step (to float reordering)
        assert a == pytest.approx(b, rel=1e-5)


def test_out_of_memory_with_nothing_left_is_one_clear_message(tmp_path, tiny_model_dir, monkeypatch, capsys):
    _oom_above(monkeypatch, limit=0)
    cfg = config(tmp_path, tiny_model_dir, eval_strategy="no", save_strategy="no", max_steps=2)
    args = [f"{k}={v if not isinstance(v, list) else ','.join(map(str, v))}" for k, v in cfg.to_dict().items()
            if v is not None and k in ("model_name_or_path", "dataset", "cutoff_len", "max_steps", "device",
                                       "output_dir", "report_to", "disable_tqdm", "eval_strategy", "save_strategy")]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "error: training: out of memory at step 1" in err and "gradient checkpointing on" in err
    assert "fix:" in err and "Traceback" not in err


def test_logged_throughput_counts_training_time_only(tmp_path, tiny_model_dir, monkeypatch):
    """An evaluation that takes long must not lower the next window's tokens_per_second."""
    import time as real_time

    from tunelab.train import loop

    clock = {"t": 0.0}
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock["t"])
    real_step = loop.optimizer_step

    def step(*a, **k):  # every optimizer step takes exactly one (fake) second
        clock["t"] += 1.0
        return real_step(*a, **k)

    real_eval = loop.evaluate

    def slow_eval(*a, **k):  # every evaluation takes 1000 (fake) seconds
        clock["t"] += 1000.0
        return real_eval(*a, **k)

    monkeypatch.setattr(loop, "optimizer_step", step)
    monkeypatch.setattr(loop, "evaluate", slow_eval)
    loop.train(config(tmp_path, tiny_model_dir, max_steps=4, logging_steps=2, eval_steps=2, save_strategy="no"))
    rows = [r for r in read_log(tmp_path / "run" / "trainer_log.jsonl") if "tokens_per_second" in r]
    assert len(rows) == 2 and real_time  # a window of 2 steps: real tokens over 2 seconds
    for row in rows:
        assert row["tokens_per_second"] > 5  # with the evaluation counted it would be < 1 token/s

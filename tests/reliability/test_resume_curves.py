"""An interrupted and resumed run logs exactly what an uninterrupted one does (train rows,
evaluation rows, TensorBoard events) and ends with the same weights; SIGTERM acts as Ctrl-C."""

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from runs_helpers import config_maker, eval_steps, train_rows
from safetensors.torch import load_file

from tunelab.train import loop


def _interrupt_at_step(monkeypatch, at: int, sig=signal.SIGINT):
    """Send `sig` to ourselves during optimizer step `at` (it lands after the step)."""
    real_step = loop.optimizer_step
    calls = []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), sig)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "optimizer_step", step)


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def run_config(tmp_path, tiny_model_dir):
    return config_maker(tmp_path, tiny_model_dir)


def test_sigterm_mid_window_resumes_to_the_same_curve_evals_and_weights(run_config, monkeypatch):
    """save_steps (3) is not a multiple of logging_steps (2): the open window survives the resume."""
    torch.set_num_threads(1)
    settings = dict(logging_steps=2, save_steps=3, max_steps=8, report_to=["jsonl", "tensorboard"])
    straight = run_config("straight", **settings)
    loop.train(straight)

    cut = run_config("cut", **settings)
    _interrupt_at_step(monkeypatch, 5, signal.SIGTERM)  # step 5: in the middle of the window 5-6
    with pytest.raises(KeyboardInterrupt):
        loop.train(cut)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    assert (Path(cut.output_dir) / "checkpoints" / "checkpoint-5").is_dir()
    loop.train(run_config("cut", resume_from_checkpoint="latest", **settings))

    assert train_rows(cut.output_dir) == train_rows(straight.output_dir)
    assert [s for s, _ in train_rows(cut.output_dir)] == [2, 4, 6, 8]
    assert eval_steps(cut.output_dir) == eval_steps(straight.output_dir) == [0, 4, 8]
    assert _same_weights(Path(cut.output_dir), Path(straight.output_dir))
    assert _tensorboard_steps(Path(cut.output_dir)) == [2, 4, 6, 8]

    # A kill -9 after step 8 was logged whose last checkpoint is step 5: steps 6-8 are trained and
    # logged again, yet neither the JSONL log nor TensorBoard holds any step twice.
    shutil.rmtree(Path(cut.output_dir) / "checkpoints" / "checkpoint-6")
    loop.train(run_config("cut", resume_from_checkpoint="latest", **settings))
    assert train_rows(cut.output_dir) == train_rows(straight.output_dir)
    assert eval_steps(cut.output_dir) == [0, 4, 8]
    assert _tensorboard_steps(Path(cut.output_dir)) == [2, 4, 6, 8]
    assert _same_weights(Path(cut.output_dir), Path(straight.output_dir))


def test_interrupt_during_an_evaluation_keeps_its_row_after_resume(run_config, monkeypatch):
    torch.set_num_threads(1)
    straight = run_config("straight", max_steps=4, save_steps=100, eval_steps=2)
    loop.train(straight)

    cut = run_config("cut", max_steps=4, save_steps=100, eval_steps=2)
    real_evaluate = loop.evaluate
    calls = []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the evaluation of step 2
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cut)
    monkeypatch.undo()
    loop.train(run_config("cut", max_steps=4, save_steps=100, eval_steps=2, resume_from_checkpoint="latest"))
    assert eval_steps(cut.output_dir) == eval_steps(straight.output_dir) == [0, 2, 4]
    assert train_rows(cut.output_dir) == train_rows(straight.output_dir)


def _tensorboard_steps(run_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars("train/loss")]

"""kill -9 at random points of a real training process (mid-save included), then resume:
weights bit-identical and the logged curve identical to the uninterrupted run."""

import pytest
from kill_resume import run_trial, small_data


@pytest.mark.slow
def test_killed_at_random_points_then_resumed_equals_the_uninterrupted_run(tmp_path, tiny_model_dir):
    result = run_trial(tiny_model_dir, small_data(tmp_path / "train.jsonl"), tmp_path, kills=3, seed=1)
    assert any(e.startswith("killed") for e in result["events"]), result
    assert result["identical"], result

"""The memory keys reach a real training run: offload (a no-op on CPU), tiled MLP, optim, rope_scaling."""

import math
from pathlib import Path

import yaml
from test_loop import config, losses

from tunelab.train import loop


def test_training_with_memory_keys(tmp_path, tiny_model_dir, capsys):
    cfg = config(tmp_path, tiny_model_dir, max_steps=6, eval_strategy="no", save_strategy="no", lora_dropout=0.0,
                 learning_rate=3e-2, activation_offload=True, tiled_mlp=True, optim="adafactor",
                 rope_scaling={"rope_type": "linear", "factor": 2.0})
    result = loop.train(cfg)
    err = capsys.readouterr().err
    assert "activation_offload: nothing to do on cpu" in err and "rope_scaling: linear x2" in err
    history = losses(Path(cfg.output_dir))
    assert result.global_step == 6 and all(math.isfinite(loss) for _, loss in history)
    assert history[-1][1] < history[0][1]  # Adafactor trains the adapter (MLPs tiled: plain below 8k tokens)
    saved = yaml.safe_load((Path(cfg.output_dir) / "config.yaml").read_text())
    assert saved["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and saved["optim"] == "adafactor"
    assert saved["activation_offload"] is True

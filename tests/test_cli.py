"""The top-level CLI: starts without torch, completes in the shell, says as much as --log-level asks."""

from __future__ import annotations

import json
import subprocess
import sys

from tunelab.cli import build_parser, completion_script, main

HEAVY = ("torch", "transformers", "numpy", "peft", "datasets", "fastapi")


def test_building_every_subcommand_imports_no_heavy_package():
    # A fresh interpreter: this test process has long imported torch.
    code = ("import sys, tunelab.cli as c; c.build_parser(); "
            f"print(__import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_every_help_exits_cleanly_without_heavy_imports():
    code = ("import sys, contextlib, io, tunelab.cli as c\n"
            "for argv in (['--help'], ['train', '--help'], ['eval', '--help'], ['data', 'check', '--help'],\n"
            "             ['serve', '--help'], ['config', 'convert', '--help'], ['completion', '--help']):\n"
            "    try:\n"
            "        with contextlib.redirect_stdout(io.StringIO()): c.main(argv)\n"
            "    except SystemExit as e: assert e.code == 0, argv\n"
            f"print(__import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_completion_scripts_know_commands_and_options(capsys):
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete -o filenames -F _tunelab_complete tunelab" in script
    assert '"data") words="' in script and '"config convert") words="' in script
    assert "--dry-run" in script and "--help-config" in script
    assert completion_script(build_parser(), "zsh").startswith("autoload -U +X bashcompinit")


def test_completion_script_completes_in_bash(tmp_path):
    script = tmp_path / "c.sh"
    script.write_text(completion_script(build_parser(), "bash"))
    probe = (f"source {script}; COMP_WORDS=(tunelab data ch); COMP_CWORD=2; _tunelab_complete; "
             "echo ${COMPREPLY[@]}; COMP_WORDS=(tunelab train x.yaml --dry); COMP_CWORD=3; _tunelab_complete; "
             "echo ${COMPREPLY[@]}")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True).stdout.split("\n")
    assert out[0] == "check" and out[1] == "--dry-run"


def test_quiet_hides_the_notes_and_log_level_shows_them(capsys, tmp_path):
    cfg = tmp_path / "trl.yaml"
    cfg.write_text("max_length: 128\nlearning_rate: -1\n")  # a note, then an error: no training starts
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "tunelab: max_length: 128 (TRL) -> cutoff_len" in err and "learning_rate must be > 0" in err
    assert main(["--quiet", "train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "tunelab:" not in err and "learning_rate must be > 0" in err
    assert main(["--log-level", "error", "train", str(cfg)]) == 2
    assert "tunelab:" not in capsys.readouterr().err

"""No traceback, ever: every bad input ends with one clear message (where, what, fix) and a
non-zero exit code. Each case here is one row of the counts in docs/reliability.md."""

import errno
import json
import os
from pathlib import Path

import pytest

from tunelab import io
from tunelab.cli import main

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


def _surrogate_file(tmp_path) -> Path:
    bad = '{"messages": [{"role": "user", "content": "cut emoji \\ud83d"}, {"role": "assistant", "content": "x"}]}'
    return _write(tmp_path / "surrogate.jsonl", json.dumps(GOOD) + "\n" + bad + "\n")


def _nested_file(tmp_path) -> Path:
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    return _write(tmp_path / "nested.jsonl", json.dumps(GOOD) + "\n" + deep + "\n")


def _run(capsys, argv) -> tuple[int, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


DATA_TOOLS = {
    "check": lambda src, tmp: ["data", "check", str(src)],
    "dedup": lambda src, tmp: ["data", "dedup", str(src), str(tmp / "out.jsonl")],
    "split": lambda src, tmp: ["data", "split", str(src), str(tmp / "splits")],
    "convert": lambda src, tmp: ["data", "convert", str(src), str(tmp / "out.jsonl"), "--to", "sharegpt"],
    "stats": lambda src, tmp: ["data", "stats", str(src)],
}


@pytest.mark.parametrize("tool", DATA_TOOLS)
@pytest.mark.parametrize("kind", ["lone surrogate", "deep nesting"])
def test_data_tools_report_bad_records_with_file_and_line(tmp_path, capsys, tool, kind):
    src = _surrogate_file(tmp_path) if kind == "lone surrogate" else _nested_file(tmp_path)
    code, out = _run(capsys, DATA_TOOLS[tool](src, tmp_path))
    assert code != 0 and "Traceback" not in out
    assert f"{src}:2" in out and ("surrogate" in out if kind == "lone surrogate" else "nested too deeply" in out)


def test_check_with_a_model_reports_the_surrogate_too(tmp_path, capsys, tiny_model_dir):
    src = _surrogate_file(tmp_path)
    code, out = _run(capsys, ["data", "check", str(src), "--model", str(tiny_model_dir)])
    assert code == 1 and "surrogate" in out and f"{src}:2" in out and "Traceback" not in out


def test_train_stops_on_a_surrogate_before_loading_the_model(tmp_path, capsys, tiny_model_dir, monkeypatch):
    import tunelab.model.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    src = _surrogate_file(tmp_path)
    code, out = _run(capsys, ["train", f"model_name_or_path={tiny_model_dir}", f"dataset={src}", "device=cpu",
                              f"output_dir={tmp_path / 'run'}", "disable_tqdm=true"])
    assert code == 2 and "surrogate" in out and "Traceback" not in out


CONFIG_VALUES = ["seed=-1", "learning_rate=nan", "lora_dropout=2", "adam_beta1=1.5", "adam_epsilon=-1",
                 "max_steps=-5", "lora_alpha=0", "lora_dropout=-1", "weight_decay=-5", "val_size=-1",
                 "output_dir=", "num_train_epochs=inf", "adam_beta2=1"]


@pytest.mark.parametrize("value", CONFIG_VALUES)
def test_out_of_range_config_values_are_refused_with_the_nearest_sensible_value(capsys, value):
    code, out = _run(capsys, ["train", "dataset=x.jsonl", value])
    key = value.split("=")[0]
    assert code == 2 and "Traceback" not in out and key in out and "fix: " in out


def test_yaml_that_is_not_utf8_or_an_alias_bomb(tmp_path, capsys):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"learning_rate: 1e-4\nsystem_prompt: caf\xe9\n")
    code, out = _run(capsys, ["train", str(latin)])
    assert code == 2 and f"{latin}:2" in out and "UTF-8" in out and "Traceback" not in out
    bomb = tmp_path / "bomb.yaml"
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    bomb.write_text("\n".join(levels) + "\ndataset: [" + ",".join(["*i"] * 9) + "]\n")
    code, out = _run(capsys, ["train", str(bomb)])
    assert code == 2 and "alias" in out and "Traceback" not in out[:5000]


@pytest.mark.parametrize("argv, says", [
    (["data", "split", "{src}", "{tmp}/s", "--ratios", "nan,0.5"], "--ratios"),
    (["data", "split", "{src}", "{tmp}/s", "--ratios", "inf,-inf"], "--ratios"),
    (["data", "dedup", "{src}", "{tmp}/o.jsonl", "--num-perm", "0"], "--num-perm"),
    (["data", "dedup", "{src}", "{tmp}/o.jsonl", "--ngram", "0"], "--ngram"),
])
def test_data_tool_arguments_out_of_range(tmp_path, capsys, argv, says):
    src = _write(tmp_path / "d.jsonl", json.dumps(GOOD) + "\n")
    code, out = _run(capsys, [a.format(src=src, tmp=tmp_path) for a in argv])
    assert code == 2 and says in out and "Traceback" not in out


OS_ERRORS = {
    "unreadable input": (errno.EACCES, "permissions"),
    "read-only output folder": (errno.EROFS, "read-only"),
    "full disk": (errno.ENOSPC, "disk space"),
}


@pytest.mark.parametrize("problem", OS_ERRORS)
@pytest.mark.parametrize("tool", ["dedup", "split", "convert"])
def test_os_errors_in_data_tools_are_one_clear_message(tmp_path, capsys, monkeypatch, problem, tool):
    src = _write(tmp_path / "d.jsonl", json.dumps(GOOD) + "\n")
    number, says = OS_ERRORS[problem]
    if problem == "unreadable input":
        import tunelab.data.readers as readers

        def refuse(path, *args, **kwargs):
            raise PermissionError(number, os.strerror(number), str(path))

        monkeypatch.setattr(readers, "open", refuse, raising=False)
    else:
        def fail(parent, name):
            raise OSError(number, os.strerror(number), str(parent))

        monkeypatch.setattr(io, "temp_dir", fail)
    code, out = _run(capsys, DATA_TOOLS[tool](src, tmp_path))
    assert code == 2 and says in out and "Traceback" not in out
    assert not (tmp_path / "out.jsonl").exists()


def test_train_into_a_read_only_folder_stops_before_the_model_loads(tmp_path, capsys, tiny_model_dir, monkeypatch):
    import tunelab.model.loader as loader

    src = _write(tmp_path / "d.jsonl", json.dumps(GOOD) + "\n")
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    real_write = Path.write_text

    def read_only(self, *args, **kwargs):
        if "run" in self.parts:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    code, out = _run(capsys, ["train", f"model_name_or_path={tiny_model_dir}", f"dataset={src}", "device=cpu",
                              f"output_dir={tmp_path / 'run'}", "disable_tqdm=true"])
    assert code == 2 and "read-only" in out and "Traceback" not in out


def test_a_json_file_of_lines_whose_first_record_holds_a_surrogate_names_that_record(tmp_path, capsys):
    src = _surrogate_file(tmp_path)
    lines = src.read_text(encoding="utf-8", errors="surrogatepass").splitlines()
    first = _write(tmp_path / "lines.json", lines[1] + "\n" + lines[0] + "\n")
    code, out = _run(capsys, ["data", "check", str(first)])
    assert code == 1 and f"{first}:1" in out and "surrogate" in out and "Traceback" not in out

"""Optional dependencies (pyproject's extras) missing: a clear message naming the extra, not an ImportError."""

from __future__ import annotations

import importlib.util

import pytest

from tunelab.cli import main
from tunelab.errors import TunelabError, require_extra


def hide(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_require_extra_names_the_missing_modules_and_the_extra(monkeypatch):
    hide(monkeypatch, "uvicorn")
    with pytest.raises(TunelabError) as info:
        require_extra(("fastapi", "uvicorn"), "serve", "tunelab serve")
    assert "uvicorn" in info.value.what and "fastapi" not in info.value.what
    assert info.value.fix == "pip install 'tunelab[serve]'"
    require_extra(("json",), "serve", "anything")  # present: no error


@pytest.mark.parametrize("argv", [["serve", "--model", "x"], ["board"]])
def test_serve_and_board_without_the_serve_extra(monkeypatch, capsys, argv):
    hide(monkeypatch, "fastapi", "uvicorn")
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "tunelab[serve]" in err and "Traceback" not in err


def test_chinese_rouge_without_jieba_says_to_install_the_zh_extra(monkeypatch):
    from tunelab.evaluate.metrics.rouge import JiebaTokenizer

    hide(monkeypatch, "jieba")
    with pytest.raises(TunelabError, match=r"tunelab\[zh\]"):
        JiebaTokenizer().tokenize("你好世界")

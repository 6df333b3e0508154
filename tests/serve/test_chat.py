"""`tunelab chat` with scripted stdin: streaming, commands, history kept within the context."""

from __future__ import annotations

import io

from conftest import tiny_lora_adapter
from tunelab.cli import main
from tunelab.data.types import Message
from tunelab.model.generate import GenerationOptions, generate_batch
from tunelab.serve.engine import load_engine

CONTEXT = 96


def replies(transcript: str) -> list[str]:
    """Each streamed reply: from its `assistant> ` to the newline the chat prints after it."""
    return [part.split("\n\nyou> ", 1)[0].removesuffix("\n") for part in transcript.split("assistant> ")[1:]]


def test_scripted_chat_session(tiny_model_dir, tmp_path, monkeypatch, capsys):
    adapter = tiny_lora_adapter(tiny_model_dir, tmp_path / "adapter")
    script = "\n".join([
        "Hello there",
        "/system You are terse.",
        "Tell me a long story about a hotel by the sea with many rooms, gardens, a pool, a quiet library "
        "and a restaurant that serves fresh fish every evening",
        "And another one about mountains, rivers, forests and lakes, with a village, a bridge, a mill "
        "and an old inn where travellers rest",
        "/reset",
        "Hello there",
        "word " * 200,  # cannot fit at all
        "/nonsense",
        "/exit",
        "never read",
    ]) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    code = main(["chat", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--device", "cpu",
                 "--temperature", "0", "--max-new-tokens", "5", "--context-length", str(CONTEXT)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"context {CONTEXT} tokens" in out
    assert "(system prompt set)" in out
    assert "(dropped the 4 oldest turn(s)" in out  # both earlier exchanges, to fit the third message
    assert "(conversation cleared)" in out
    assert "that message is too long" in out
    assert "unknown command /nonsense" in out
    assert out.count("you> ") == 9  # the line after /exit is never read
    assert out.count("(dropped") == 1  # a message that cannot fit drops nothing

    # The streamed replies are the adapter's greedy answers; after /reset the history is gone,
    # so the same first message gets the same answer.
    engine = load_engine(str(tiny_model_dir), {"adapter": adapter}, device="cpu", context_length=CONTEXT)
    prompt = engine.encode([Message("user", "Hello there")])
    with engine.using("adapter"):
        [want] = generate_batch(engine.model, engine.tokenizer, [prompt], GenerationOptions(max_new_tokens=5),
                                stop_ids=engine.stop_ids, progress=False)
    got = replies(out)
    assert len(got) == 4
    assert got[0] == got[3] == want.text


def test_quantized_loading_on_cpu_says_what_to_do(tiny_model_dir, capsys):
    code = main(["chat", "--model", str(tiny_model_dir), "--quantization-bit", "4", "--device", "cpu"])
    assert code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err

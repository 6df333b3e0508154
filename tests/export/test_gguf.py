"""`tunelab export --format gguf`: the file loads back in transformers with the same logits,
tokenizer and chat template; Q8_0 keeps the top-1 token; unsupported models are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import shared_tokenizer
from conftest import tiny_lora_adapter as make_adapter
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.export.gguf import architecture_of, export_gguf, pre_tokenizer_name

TEXT = "Hello 你好 12345 <|im_start|>user\nhi<|im_end|>\n"


def gguf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def qwen2_arch_dir(tmp_path_factory):
    """A tiny random Qwen2 (q/k/v biases, untied head) with the real Qwen2 tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = shared_tokenizer("qwen2")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                 max_position_embeddings=512)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cli_exports_llama_with_adapter_tokenizer_and_template(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "exports" / "tiny-f16.gguf"
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--format", "gguf",
                 "--outtype", "f16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loaded back with transformers' GGUF loader" in printed
    assert [p.name for p in out.parent.iterdir()] == ["tiny-f16.gguf"]  # no merge folder left over

    # The file's logits equal base + adapter merged, rounded to f16 (f16 weights: small logit noise).
    main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "merged"),
          "--dtype", "fp32"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = hf_tok(TEXT, add_special_tokens=False)["input_ids"]
    want, got = logits(merged, ids), logits(gguf_model(out), ids)
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert (logits(base, ids) - want).abs().max() > 0.1  # the adapter is in the file

    tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == ids
    assert tok.chat_template == hf_tok.chat_template


@pytest.mark.parametrize("outtype", ["bf16", "q8_0"])
def test_qwen2_architecture_round_trips(tmp_path, qwen2_arch_dir, outtype):
    report = export_gguf(str(qwen2_arch_dir), tmp_path / f"q-{outtype}.gguf", outtype=outtype)
    assert report.architecture == "qwen2"
    assert report.roundtrip_max_diff <= 1e-4  # the file holds exactly the rounded weights
    from transformers import AutoModelForCausalLM

    reloaded = gguf_model(report.out_file)
    assert not reloaded.config.tie_word_embeddings
    assert reloaded.model.layers[0].self_attn.q_proj.bias is not None
    original = AutoModelForCausalLM.from_pretrained(qwen2_arch_dir, dtype=torch.float32).eval()
    ids = list(range(100, 160))
    agree = (logits(reloaded, ids).argmax(-1) == logits(original, ids).argmax(-1)).float().mean()
    assert agree >= 0.9  # a random model's logits are near ties; the embedded model is held to 99%


def test_unsupported_models_are_refused_before_any_work(tmp_path, tiny_model_dir):
    with pytest.raises(TunelabError, match="supports LlamaForCausalLM"):
        architecture_of({"architectures": ["GPT2LMHeadModel"]}, tmp_path)
    with pytest.raises(TunelabError, match="rope_scaling"):
        architecture_of({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn"}}, tmp_path)
    with pytest.raises(TunelabError, match="q4_k"):
        export_gguf(str(tiny_model_dir), tmp_path / "x.gguf", outtype="q4_k")
    with pytest.raises(TunelabError, match="does not end in .gguf"):
        export_gguf(str(tiny_model_dir), tmp_path / "x.bin")


def test_pre_tokenizer_names(qwen2_tokenizer, llama3_tokenizer):
    assert pre_tokenizer_name(qwen2_tokenizer) == "qwen2"
    assert pre_tokenizer_name(llama3_tokenizer) == "llama-bpe"


def test_trained_end_of_turn_token_is_written(tmp_path, tiny_model_dir):
    from gguf import GGUFReader

    from tunelab.data.templates import LOCK_FILE

    folder = tmp_path / "locked"
    shutil.copytree(tiny_model_dir, folder)
    (folder / LOCK_FILE).write_text(json.dumps({"chat_template": "{{ 'x' }}", "stop_tokens": ["<|im_end|>"]}))
    report = export_gguf(str(folder), tmp_path / "l.gguf", outtype="f32", verify=False)
    field = GGUFReader(report.out_file).fields["tokenizer.ggml.eot_token_id"]
    assert int(field.parts[field.data[0]][0]) == shared_tokenizer("qwen2").convert_tokens_to_ids("<|im_end|>")


@pytest.mark.slow
def test_embedded_model_bf16_close_and_q8_0_keeps_top1(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data.templates import render, resolve_template
    from tunelab.model.loader import resolve_model_path

    torch.set_num_threads(2)
    # The real model (a random adapter would flatten its logits into near ties; the adapter
    # path is checked exactly on the tiny model above).
    merged_dir = resolve_model_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(merged_dir)
    chat = [{"role": "user", "content": "I need a hotel in Beijing with a rating above 4 and free wifi."},
            {"role": "assistant", "content": "Sure. What price range would you like, and for how many nights?"},
            {"role": "user", "content": "Between 300 and 500 yuan a night, for three nights starting on Friday. "
                                        "It should be close to a subway station and have breakfast included."},
            {"role": "assistant", "content": "Thank you. I found two hotels that match: the first is near the "
                                             "Dongzhimen subway station, rated 4.6, and costs 420 yuan a night "
                                             "with breakfast; the second is in Sanlitun, rated 4.3, 380 yuan."}]
    ids = tok(render(chat, resolve_template("auto", tok), tok), add_special_tokens=False)["input_ids"]
    assert len(ids) >= 60
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    want = logits(merged, ids)
    for outtype in ("bf16", "q8_0"):
        out = tmp_path / f"e-{outtype}.gguf"
        assert main(["export", "--model", str(merged_dir), "--format", "gguf", "--outtype", outtype,
                     "--out", str(out)]) == 0
        got = logits(gguf_model(out), ids)
        if outtype == "bf16":
            assert (got - want).abs().max() <= 0.05 * want.abs().max()
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        assert agree >= 0.99, (outtype, agree)

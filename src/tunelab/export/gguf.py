"""`tunelab export --format gguf`: one GGUF file for llama.cpp, Ollama and LM Studio.

Llama- and Qwen2-architecture models (SmolLM2, Llama 3.x, Qwen2/2.5, ...) are written
with the `gguf` package's writer, the way llama.cpp's `convert_hf_to_gguf.py` writes
them: llama.cpp's tensor names (`gguf.get_tensor_name_map`), Llama's q/k rows permuted
to GGML's rotary layout, norms and biases kept in f32, the byte-level BPE vocabulary
with its merges, special tokens and the (trained) chat template.

Before the file is moved into place it is loaded back with transformers' own GGUF
loader and its logits are compared on a probe with those of the HF model whose weights
went through the same rounding (`stored`): they must agree to float noise, whatever the
type, so a wrong name, permutation or shape never ships. How far the rounding itself
moves the logits (f16/bf16: max |diff|; Q8_0: top-1 agreement) is reported.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunelab.data.templates import read_lock
from tunelab.errors import TunelabError
from tunelab.export.merge import compare_logits, merge_adapter, probe_logits
from tunelab.io import atomic_path
from tunelab.model.loader import resolve_model_path

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
# The file agrees with the equally rounded HF model to float noise (both fp32 compute).
ROUNDTRIP_TOLERANCE = 1e-4
PROBE_TEXT = ("GGUF check: the exported file must answer like the model it came from. "
              "Hotel search: 评分4分以上的经济型酒店, price 200-300 yuan, wake-up call; "
              "def f(x): return x * 2  # numbers 12345 and symbols <>{}[]")


@dataclass
class GGUFReport:
    out_file: Path
    outtype: str
    architecture: str
    tensors: int
    roundtrip_max_diff: float | None  # file (via transformers) vs the rounded HF model
    rounding_max_diff: float | None  # file vs the unrounded model: what the type costs
    top1_agreement: float | None  # share of probe positions with the same argmax
    probe_tokens: int = 0

    def summary(self) -> str:
        lines = [f"GGUF written to {self.out_file} ({self.architecture}, {self.outtype}, {self.tensors} tensors, "
                 f"{self.out_file.stat().st_size / 2**20:.1f} MiB)"]
        if self.roundtrip_max_diff is not None:
            lines.append(f"check: loaded back with transformers' GGUF loader, logits on a {self.probe_tokens}-token "
                         f"probe vs the model with the same rounding: max |diff| {self.roundtrip_max_diff:.2e}")
            lines.append(f"{self.outtype} vs the unrounded model: max |diff| {self.rounding_max_diff:.3g}, "
                         f"top-1 agreement {100 * self.top1_agreement:.1f}%")
        return "\n".join(lines)


def qtype_of(outtype: str):
    import gguf

    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    files = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    key = outtype.lower()
    if key not in types:
        raise TunelabError(f"--outtype {outtype} is not supported", where="--outtype",
                           fix=f"use one of {', '.join(OUT_TYPES)} (q8_0: ~1 byte per weight, near-lossless)")
    return types[key], files[key]


# --- public API ------------------------------------------------------------------------

def export_gguf(model: str, out_file: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
                outtype: str = "q8_0", verify: bool = True, force_base: bool = False) -> GGUFReport:
    """Write `model` (+ `adapter`, merged first) as a GGUF file at `out_file`."""
    qtype_of(outtype)  # a bad type fails before any work
    out_file = Path(out_file).expanduser()
    if out_file.suffix != ".gguf":
        raise TunelabError(f"--out {out_file} does not end in .gguf", where="--out",
                           fix="name the file, e.g. --out exports/hotel-q8_0.gguf")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if adapter is None:
        return convert_folder(resolve_model_path(model), out_file, outtype, verify)

    # fp32 merge: the one rounding happens when the GGUF type is applied.
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=out_file.parent) as tmp:
        merge_adapter(model, adapter, Path(tmp) / "merged", dtype="fp32", force_base=force_base)
        return convert_folder(Path(tmp) / "merged", out_file, outtype, verify)


def convert_folder(folder: Path, out_file: Path, outtype: str, verify: bool = True) -> GGUFReport:
    """Convert an HF model folder (config, safetensors, tokenizer) into `out_file`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = architecture_of(config, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    qtype, _ = qtype_of(outtype)
    with atomic_path(out_file) as tmp:
        tensors, stored = write_gguf(model, tokenizer, folder, arch, Path(tmp), outtype)
        report = GGUFReport(out_file, outtype.lower(), arch, tensors, None, None, None)
        if verify:
            verify_file(Path(tmp), model, stored, tokenizer, report)
    return report


def architecture_of(config: dict, folder: Path) -> str:
    names = config.get("architectures") or []
    arch = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    if arch is None:
        raise TunelabError(f"GGUF export supports {', '.join(ARCHITECTURES)}; {folder} is {', '.join(names) or '?'}",
                           where=str(folder / "config.json"),
                           fix="export --format hf and convert with llama.cpp's convert_hf_to_gguf.py")
    if config.get("rope_scaling") and (config["rope_scaling"].get("rope_type") or "default") != "default":
        raise TunelabError("GGUF export of a model with rope_scaling is not supported yet",
                           where=str(folder / "config.json"), fix="export --format hf and convert with llama.cpp")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise TunelabError("GGUF export of a Llama with attention/MLP biases is not supported",
                           where=str(folder / "config.json"), fix="export --format hf and convert with llama.cpp")
    return arch


# --- writing ---------------------------------------------------------------------------

def write_gguf(model, tokenizer, folder: Path, arch: str, path: Path, outtype: str) -> tuple[int, dict]:
    """Write the file; return the tensor count and the HF state dict as stored (rounded)."""
    import gguf

    cfg = model.config
    qtype, file_type = qtype_of(outtype)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(folder.name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(rope_theta(cfg)))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    add_vocabulary(writer, tokenizer, folder, cfg.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     cfg.num_hidden_layers)
    stored, count = {}, 0
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise TunelabError(f"no GGUF name for tensor {name}", where=str(folder),
                               fix="export --format hf and convert with llama.cpp's convert_hf_to_gguf.py")
        data = tensor.detach().float().cpu().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            data = permute_rotary(data, heads)
        tensor_type = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if tensor_type == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            tensor_type = gguf.GGMLQuantizationType.F16  # Q8_0 blocks are 32 wide
        packed = gguf.quants.quantize(data, tensor_type)
        writer.add_tensor(gguf_name, packed, raw_dtype=tensor_type)
        # Rounding is per element (f16/bf16) or per 32-wide row block (Q8_0): it commutes
        # with the row permutation, so the stored values in HF layout are this.
        stored[name] = torch.from_numpy(
            gguf.quants.dequantize(gguf.quants.quantize(tensor.detach().float().cpu().numpy(), tensor_type),
                                   tensor_type).reshape(tensor.shape).copy())
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return count, stored


def rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0


def permute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """HF Llama rotates the two halves of each head; GGML rotates interleaved pairs (as in
    llama.cpp's convert_hf_to_gguf.py, and undone by transformers' GGUF loader)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def add_vocabulary(writer, tokenizer, folder: Path, vocab_size: int) -> None:
    """The byte-level BPE vocabulary, merges, special tokens and chat template."""
    import gguf

    if tokenizer.backend_tokenizer.model.__class__.__name__ != "BPE":
        raise TunelabError("GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2)",
                           where=str(folder), fix="export --format hf and convert with llama.cpp")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None and tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    end_of_turn = trained_end_of_turn(tokenizer, folder)
    if end_of_turn is not None:
        writer.add_eot_token_id(end_of_turn)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for how this vocabulary splits text before BPE (`tokenizer.ggml.pre`)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    state = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    regexes = _regexes(state)
    for name in ("qwen2", "llama-bpe"):
        if GGUF_PRE_TOKENIZER_SPLITS[name] in regexes:
            return name
    if '"individual_digits": true' in json.dumps(state):
        return "smollm"  # digits split one by one, then GPT-2 byte level (SmolLM/StarCoder)
    return "gpt-2"


def _regexes(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["pattern"]["Regex"]] if isinstance(node.get("pattern"), dict) and "Regex" in node["pattern"] else []
        return found + [r for v in node.values() for r in _regexes(v)]
    if isinstance(node, list):
        return [r for v in node for r in _regexes(v)]
    return []


def trained_end_of_turn(tokenizer, folder: Path) -> int | None:
    """The trained template's end-of-turn token (`<|im_end|>`...), where it is not EOS."""
    lock = read_lock(folder)
    if lock is None or not lock.stop_tokens:
        return None
    token_id = tokenizer.convert_tokens_to_ids(lock.stop_tokens[0])
    return token_id if token_id != tokenizer.eos_token_id else None


# --- checking --------------------------------------------------------------------------

@torch.inference_mode()
def verify_file(path: Path, model, stored: dict, tokenizer, report: GGUFReport) -> None:
    """Load `path` with transformers' GGUF loader; compare logits (see the module doc)."""
    from transformers import AutoModelForCausalLM

    probe = tokenizer(PROBE_TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    original = probe_logits(model, probe)
    model.load_state_dict(stored, strict=False)  # the weights as the file holds them
    rounded = probe_logits(model, probe)
    # The loader wants a folder and a file name; it dequantizes everything to fp32.
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    got = probe_logits(loaded, probe)
    del loaded
    diff, _ = compare_logits(got, rounded, ROUNDTRIP_TOLERANCE, what="the GGUF file does not reproduce the model",
                             where=str(report.out_file))
    report.roundtrip_max_diff = diff
    report.rounding_max_diff = (got - original).abs().max().item()
    report.top1_agreement = (got.argmax(-1) == original.argmax(-1)).float().mean().item()
    report.probe_tokens = probe.shape[1]

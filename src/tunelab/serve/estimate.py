"""GPU memory estimate for full, LoRA, QLoRA training and inference, from a config alone.

Nothing here loads weights: the architecture comes from a `config.json` (a file, a
model folder, or a known alias shipped below), parameters are counted from the layer
shapes, and every line of the result carries the formula that produced it.

Activation coefficients are bytes per token per decoder layer for bf16 training with
SDPA / flash attention (which keep q, k, v, the output and a log-sum-exp, never the
s x s scores), as in Korthikanti et al. 2022 but counted for SwiGLU MLPs, GQA, fp32
RMSNorm statistics and PEFT's fp32 adapters. They were measured by counting the
tensors autograd saves (`tests/serve/test_estimate.py` re-measures them on a tiny
model), not guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError, nearest

GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
METHODS = ("full", "lora", "qlora", "inference")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
TILE_TOKENS = 8192  # train/fast/tiled_mlp.DEFAULT_TILE_TOKENS (serve may not import train)
CHUNK_TOKENS = 4096  # train/fast/chunked_ce.DEFAULT_CHUNK_TOKENS
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Decoder-only families whose layers are Llama-shaped (attention + SwiGLU MLP + 2 RMSNorms).
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")

# Real config.json values of common base models, so `--model qwen2.5-7b-instruct` needs no download.
KNOWN_CONFIGS: dict[str, dict] = {
    "qwen2.5-7b-instruct": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
        max_position_embeddings=32768),
    "qwen2.5-0.5b-instruct": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=32768),
    "llama-3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=8192),
    "llama-3.1-8b-instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072),
    "smollm2-135m-instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192),
}
ALIASES = {
    "qwen/qwen2.5-7b-instruct": "qwen2.5-7b-instruct", "qwen2.5-7b": "qwen2.5-7b-instruct",
    "qwen/qwen2.5-7b": "qwen2.5-7b-instruct", "qwen/qwen2.5-0.5b-instruct": "qwen2.5-0.5b-instruct",
    "meta-llama/meta-llama-3-8b": "llama-3-8b", "meta-llama/meta-llama-3-8b-instruct": "llama-3-8b",
    "llama-3-8b-instruct": "llama-3-8b", "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b-instruct",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct", "smollm2-135m": "smollm2-135m-instruct",
}


@dataclass(frozen=True)
class Architecture:
    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 puts biases on q, k and v only
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3 normalises q and k per head
    max_position_embeddings: int

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def architecture_from_config(cfg: dict, name: str = "model", where: str = "config.json") -> Architecture:
    model_type = cfg.get("model_type", "llama")
    if model_type not in SUPPORTED_TYPES:
        raise TunelabError(f"model_type {model_type!r} is not one the estimate knows how to count",
                           where=where, fix=f"the estimate covers {', '.join(SUPPORTED_TYPES)} (Llama-shaped layers)")
    try:
        h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        arch = Architecture(
            name=name, model_type=model_type, hidden_size=h,
            intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or h // heads), vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type != "qwen2")),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
        )
    except KeyError as exc:
        raise TunelabError(f"config has no {exc.args[0]!r}", where=where,
                           fix="point --model at the model's own config.json") from None
    return arch


def load_architecture(model: str) -> Architecture:
    """A known alias, a config.json file, or a model folder (resolved, never loaded)."""
    key = model.lower().strip()
    key = ALIASES.get(key, key)
    if key in KNOWN_CONFIGS:
        return architecture_from_config(KNOWN_CONFIGS[key], name=key, where=f"known model {key}")
    path = Path(model)
    if not path.exists():
        path = _resolve_with_loader(model)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        hint = nearest(key, list(KNOWN_CONFIGS) + list(ALIASES))
        raise TunelabError(f"no config.json for {model!r}", where="--model",
                           fix=f"did you mean {hint!r}?" if hint else
                           f"give a model folder, a config.json, or one of {', '.join(KNOWN_CONFIGS)}")
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TunelabError(f"not valid JSON ({exc})", where=str(config_file),
                           fix="point --model at the model's config.json") from None
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the language model's shape here
    return architecture_from_config(cfg, name=path.name if path.is_dir() else path.parent.name,
                                    where=str(config_file))


def _resolve_with_loader(model: str) -> Path:
    """Let the model loader map aliases / hub-cache names to a folder, if it is installed."""
    try:
        from tunelab.model.loader import resolve_model_path
    except ImportError:
        return Path(model)
    try:
        return Path(resolve_model_path(model))
    except TunelabError:
        return Path(model)


# --- parameters ------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterCount:
    embedding: int
    attention: int  # all layers
    mlp: int
    norms: int
    lm_head: int  # 0 when tied to the embedding
    not_quantized: int  # biases and q/k norms inside attention and MLP: bitsandbytes leaves them alone

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norms + self.lm_head

    @property
    def quantizable(self) -> int:
        """Weights of the decoder's linear layers: what bitsandbytes quantizes."""
        return self.attention + self.mlp - self.not_quantized


def architecture_parameters(arch: Architecture) -> ParameterCount:
    shapes = arch.linear_shapes()
    weights = {name: fan_in * fan_out for name, (fan_in, fan_out) in shapes.items()}
    attn_bias = (arch.q_dim + 2 * arch.kv_dim if arch.qkv_bias else 0) + (arch.hidden_size if arch.o_bias else 0)
    mlp_bias = 2 * arch.intermediate_size + arch.hidden_size if arch.mlp_bias else 0
    attention = sum(weights[n] for n in LINEAR_MODULES[:4]) + attn_bias + (2 * arch.head_dim if arch.qk_norm else 0)
    mlp = sum(weights[n] for n in LINEAR_MODULES[4:]) + mlp_bias
    layers = arch.num_layers
    return ParameterCount(
        embedding=arch.vocab_size * arch.hidden_size,
        attention=layers * attention,
        mlp=layers * mlp,
        norms=layers * 2 * arch.hidden_size + arch.hidden_size,  # two per layer + the final one
        lm_head=0 if arch.tie_word_embeddings else arch.vocab_size * arch.hidden_size,
        not_quantized=layers * (attn_bias + mlp_bias) + (layers * 2 * arch.head_dim if arch.qk_norm else 0),
    )


def lora_targets(arch: Architecture, targets: list[str]) -> list[str]:
    if targets in (["all-linear"], ["all"]):
        return list(LINEAR_MODULES)
    unknown = [t for t in targets if t not in LINEAR_MODULES]
    if unknown:
        raise TunelabError(f"unknown LoRA target {unknown[0]!r}", where="--lora-target",
                           fix=f"use all-linear or some of {', '.join(LINEAR_MODULES)}")
    return targets


def architecture_lora_parameters(arch: Architecture, rank: int, targets: list[str]) -> int:
    shapes = arch.linear_shapes()
    return arch.num_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in lora_targets(arch, targets))


# --- memory ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    method: str = "lora"
    seq_len: int = 2048
    batch: int = 4
    dtype: str = "bf16"
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    lora_rank: int = 8
    lora_target: list[str] = field(default_factory=lambda: ["all-linear"])
    padded: bool = True  # an attention mask (padded batches) makes SDPA repeat k/v and keep the mask
    quantization_bit: int | None = None  # inference only; qlora is always 4-bit
    # tunelab's memory levers (train/fast): offload implies checkpointing (it recomputes each layer)
    activation_offload: bool = False  # checkpointed layer inputs in pinned host memory, 2 on the GPU
    tiled_mlp: bool = False  # MLP intermediates of one TILE_TOKENS tile at a time
    fused_loss: bool = False  # LM head + loss in CHUNK_TOKENS chunks: never the full logits


@dataclass(frozen=True)
class Line:
    name: str
    bytes: float
    formula: str
    # When the bytes are alive: "static" (always), "forward" (from the forward pass to the
    # start of backward), "step" (end of backward and optimizer.step()) or "host" (pinned CPU memory).
    phase: str = "static"


@dataclass(frozen=True)
class Estimate:
    arch: Architecture
    settings: Settings
    params: ParameterCount
    trainable: int
    lines: list[Line]
    total: float
    total_formula: str


def quantized_bytes_per_weight(bits: int) -> tuple[float, str]:
    """Bytes per weight of bitsandbytes storage, quantization constants included."""
    if bits == 4:
        # NF4 packs two weights a byte; double quant keeps one 8-bit absmax per 64 weights
        # plus one fp32 constant per 256 of those blocks.
        return 0.5 + 1 / 64 + 4 / (64 * 256), "(0.5 + 1/64 + 4/(64*256)) B (NF4, double quant)"
    # LLM.int8: one byte per weight plus one fp32 scale per output row (negligible)
    return 1.0, "1 B (int8)"


def optimizer_state_bytes(optimizer: str, param_bytes: int) -> tuple[float, str]:
    if optimizer.endswith("8bit"):
        # bitsandbytes: two 8-bit states and one fp32 absmax per 256-value block each
        return 2 * (1 + 4 / 256), "2 x (1 + 4/256) B (8-bit blockwise)"
    # torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype
    return 2 * param_bytes, f"2 x {param_bytes} B"


def layer_activation_bytes(arch: Architecture, settings: Settings) -> tuple[float, str]:
    """Bytes autograd keeps per token for one decoder layer in 16-bit training."""
    h, i, q, kv, nh = arch.hidden_size, arch.intermediate_size, arch.q_dim, arch.kv_dim, arch.num_heads
    pad, pad_f = (4 * (q - kv) + 2 * settings.seq_len, " + 4(q-kv) + 2s") if settings.padded else (0, "")
    scale = DTYPE_BYTES[settings.dtype] / 2
    if settings.method == "full":
        per_token = 16 * h + 8 * i + 4 * q + 4 * kv + 4 * nh + 8 + pad
        formula = f"16h + 8i + 4q + 4kv + 4nh + 8{pad_f}"
    else:
        shapes = arch.linear_shapes()
        targets = lora_targets(arch, settings.lora_target)
        adapters = sum(4 * shapes[t][0] + 4 * settings.lora_rank for t in targets)
        per_token = 8 * h + 6 * i + 4 * q + 4 * kv + 4 * nh + 8 + pad + adapters
        formula = f"8h + 6i + 4q + 4kv + 4nh + 8{pad_f} + sum over adapted modules (4 d_in + 4r)"
    if settings.tiled_mlp:  # the MLP keeps only its input; its intermediates live one tile at a time
        mlp, mlp_f = mlp_activation_bytes(arch, settings)
        if settings.method == "full":  # the input is already saved for gate/up's weight gradients
            return per_token * scale - mlp, f"{formula} - ({mlp_f})"
        return per_token * scale - mlp + 2 * h * scale, f"{formula} - ({mlp_f}) + 2h (the MLP input)"
    return per_token * scale, formula


def mlp_activation_bytes(arch: Architecture, settings: Settings) -> tuple[float, str]:
    """The part of `layer_activation_bytes` that the MLP's intermediates take (what tiling bounds)."""
    scale = DTYPE_BYTES[settings.dtype] / 2
    if settings.method == "full":
        return 8 * arch.intermediate_size * scale, "8i"
    shapes = arch.linear_shapes()
    mlp = [t for t in lora_targets(arch, settings.lora_target) if t in ("gate_proj", "up_proj", "down_proj")]
    adapters = sum(4 * shapes[t][0] + 4 * settings.lora_rank for t in mlp)
    return (6 * arch.intermediate_size + adapters) * scale, "6i + MLP adapters"


def activation_lines(arch: Architecture, s: Settings, tokens: int) -> list[Line]:
    layer, layer_f = layer_activation_bytes(arch, s)
    L, h2 = arch.num_layers, 2 * arch.hidden_size
    fixed, fixed_f = 0.0, ""
    if s.tiled_mlp:  # one tile's intermediates while backward recomputes it
        mlp, _ = mlp_activation_bytes(arch, s)
        tile = min(tokens, TILE_TOKENS)
        fixed, fixed_f = mlp * tile, f" + one MLP tile: {tile:,} x {mlp:,.0f} B"
    if s.activation_offload:
        return [Line("activations (offload: 2 layer inputs + one layer recomputed)", 2 * h2 * tokens + layer * tokens
                     + fixed, f"b*s*(2 x 2h + {layer_f}) = {tokens:,} x ({2 * h2:,} + {layer:,.0f}) B{fixed_f}",
                     "forward"),
                Line("host memory (pinned): offloaded layer inputs", L * h2 * tokens,
                     f"b*s*L*2h = {tokens:,} x {L * h2:,} B", "host")]
    if s.gradient_checkpointing:
        return [Line("activations (gradient checkpointing)", L * h2 * tokens + layer * tokens + fixed,
                     f"b*s*(L*2h + one layer recomputed: {layer_f}) = {tokens:,} x ({L * h2:,} + {layer:,.0f}) B"
                     f"{fixed_f}", "forward")]
    return [Line("activations", L * (layer * tokens + fixed),
                 f"L*(b*s*({layer_f}){fixed_f}) = {L} x ({tokens:,} x {layer:,.0f} B{fixed_f})", "forward")]


def logits_line(arch: Architecture, s: Settings, tokens: int) -> Line:
    if s.fused_loss:
        chunk = min(tokens, CHUNK_TOKENS)
        # per chunk: bf16 logits, their fp32 copy turned into the gradient in place, its bf16 cast;
        # for every token: the bf16 gradient of the hidden state, kept for backward
        return Line("chunked LM head + loss", 8 * chunk * arch.vocab_size + 2 * arch.hidden_size * tokens,
                    f"chunk*V*(2 + 4 + 2) + b*s*2h, chunk = {chunk:,}", "forward")
    return Line("logits and loss (peak at backward start)", 14 * tokens * arch.vocab_size,
                "b*s*V*(2 bf16 logits + 4 fp32 log-softmax + 2 x 4 fp32 gradients)", "forward")


def training_lines(arch: Architecture, settings: Settings, params: ParameterCount) -> tuple[list[Line], int]:
    s = settings
    wbytes = DTYPE_BYTES[s.dtype]
    tokens = s.batch * s.seq_len
    n = params.total
    lines = []
    if s.method == "qlora":
        qb, qf = quantized_bytes_per_weight(4)
        # peft's prepare_model_for_kbit_training (our QLoRA set-up) upcasts everything it
        # cannot quantize (embeddings, norms, lm_head) to fp32; training in 16 bits, tunelab
        # stores an untied frozen head back in 16 bits (train/fast/memory.py).
        head = params.lm_head if s.dtype != "fp32" else 0
        rest = n - params.quantizable - head
        lines.append(Line(f"weights (4-bit linear + fp32 rest{f' + {s.dtype} head' if head else ''})",
                          params.quantizable * qb + rest * 4 + head * wbytes,
                          f"{params.quantizable:,} x {qf} + {rest:,} x 4 B" + (f" + {head:,} x {wbytes} B" if head else "")))
    else:
        lines.append(Line(f"weights ({s.dtype})", n * wbytes, f"{n:,} params x {wbytes} B"))
    if s.method == "full":
        trainable, grad_bytes = n, wbytes
        lines.append(Line("gradients", n * wbytes, f"{n:,} x {wbytes} B", "step"))
    else:
        trainable = architecture_lora_parameters(arch, s.lora_rank, s.lora_target)
        grad_bytes = 4  # PEFT keeps adapters (and so their gradients) in fp32
        lines.append(Line(f"LoRA parameters (r={s.lora_rank}, fp32)", trainable * 4,
                          f"L x sum r(d_in + d_out) = {trainable:,} x 4 B"))
        lines.append(Line("LoRA gradients", trainable * 4, f"{trainable:,} x 4 B", "step"))
    ob, of = optimizer_state_bytes(s.optimizer, grad_bytes)
    paged = " (paged: may spill to CPU)" if s.optimizer.startswith("paged") else ""
    lines.append(Line(f"optimizer states ({s.optimizer}){paged}", trainable * ob, f"{trainable:,} x {of}"))
    if not s.optimizer.endswith("8bit"):
        # torch's foreach AdamW allocates one state-sized temporary (sqrt of exp_avg_sq) in step()
        lines.append(Line("optimizer step scratch", trainable * grad_bytes, f"{trainable:,} x {grad_bytes} B", "step"))

    lines += activation_lines(arch, s, tokens)
    extra = 4 * arch.head_dim + (8 * arch.hidden_size if s.method == "full" else 0)
    lines.append(Line("embeddings, final norm, rotary tables", extra * tokens,
                      f"b*s*({'8h + ' if s.method == 'full' else ''}4*head_dim)", "forward"))
    lines.append(logits_line(arch, s, tokens))
    if s.method == "qlora":
        biggest = max(a * b for a, b in arch.linear_shapes().values())
        lines.append(Line("dequantized weight buffer", biggest * wbytes, f"largest linear {biggest:,} x {wbytes} B", "forward"))
    return lines, trainable


def inference_lines(arch: Architecture, settings: Settings, params: ParameterCount) -> list[Line]:
    s = settings
    wbytes = DTYPE_BYTES[s.dtype]
    tokens = s.batch * s.seq_len
    n = params.total
    if s.quantization_bit:
        qb, qf = quantized_bytes_per_weight(s.quantization_bit)
        rest = n - params.quantizable
        weights = Line(f"weights ({s.quantization_bit}-bit linear + 16-bit rest)",
                       params.quantizable * qb + rest * wbytes, f"{params.quantizable:,} x {qf} + {rest:,} x {wbytes} B")
    else:
        weights = Line(f"weights ({s.dtype})", n * wbytes, f"{n:,} params x {wbytes} B")
    kv_per_token = 2 * arch.num_layers * arch.kv_dim * wbytes
    h, i = arch.hidden_size, arch.intermediate_size
    return [
        weights,
        Line("KV cache", kv_per_token * tokens,
             f"2 (k,v) x L x kv_heads x head_dim x {wbytes} B x b*s = {kv_per_token:,} B x {tokens:,}"),
        # During prefill one layer at a time holds its input, the residual and the MLP's
        # three intermediate-sized tensors; logits are computed for the last token only.
        Line("prefill working set", (4 * h + 6 * i) * tokens * wbytes / 2 + s.batch * arch.vocab_size * 4,
             "b*s*(4h + 6i) B + b*V*4 B (last-token logits)"),
    ]


def estimate_memory(arch: Architecture, settings: Settings) -> Estimate:
    check_settings(settings)
    params = architecture_parameters(arch)
    if settings.method == "inference":
        lines = inference_lines(arch, settings, params)
        return Estimate(arch, settings, params, 0, lines, sum(x.bytes for x in lines), "sum of the lines")
    lines, trainable = training_lines(arch, settings, params)
    # Gradients are freed between steps (zero_grad(set_to_none=True)) and appear during
    # backward as the activations are released, so the forward and step peaks do not add.
    # "host" lines (offloaded activations) live in pinned CPU memory: not part of the GPU peak.
    static, forward, step = (sum(x.bytes for x in lines if x.phase == phase) for phase in ("static", "forward", "step"))
    total = static + max(forward, step)
    formula = "weights + optimizer states + max(activations + logits, gradients + step scratch)"
    return Estimate(arch, settings, params, trainable, lines, total, formula)


def check_settings(s: Settings) -> None:
    for key, value, allowed in (("method", s.method, METHODS), ("optimizer", s.optimizer, OPTIMIZERS),
                                ("dtype", s.dtype, tuple(DTYPE_BYTES))):
        if value not in allowed:
            hint = nearest(value, allowed)
            raise TunelabError(f"{key} {value!r} is not one of {', '.join(allowed)}", where=f"--{key}",
                               fix=f"use --{key} {hint}" if hint else f"pick one of {', '.join(allowed)}")
    for key, value in (("seq-len", s.seq_len), ("batch", s.batch), ("lora-rank", s.lora_rank)):
        if value <= 0:
            raise TunelabError(f"{key} must be > 0, got {value}", where=f"--{key}", fix=f"give a positive --{key}")
    if s.quantization_bit not in (None, 4, 8):
        raise TunelabError(f"quantization bit {s.quantization_bit} is not 4 or 8", where="--quantization-bit",
                           fix="use 4 (NF4) or 8 (int8)")
    if s.quantization_bit and s.method != "inference":
        raise TunelabError("--quantization-bit applies to inference; training with 4-bit weights is --method qlora",
                           where="--quantization-bit", fix="use --method qlora, or drop --quantization-bit")


def format_estimate(est: Estimate) -> str:
    a, s, p = est.arch, est.settings, est.params
    head = (f"{a.name}: {p.total:,} parameters ({p.total / 1e9:.2f} B), {a.num_layers} layers, hidden {a.hidden_size}, "
            f"heads {a.num_heads}/{a.num_kv_heads} kv, intermediate {a.intermediate_size}, vocab {a.vocab_size}, "
            f"{'tied' if a.tie_word_embeddings else 'untied'} embeddings")
    setup = (f"method {s.method}, batch {s.batch} x seq {s.seq_len}, {s.dtype}"
             + (f", optimizer {s.optimizer}" if s.method != "inference" else "")
             + (f", LoRA r={s.lora_rank} on {','.join(s.lora_target)} ({est.trainable:,} trainable)"
                if s.method in ("lora", "qlora") else "")
             + (", gradient checkpointing" if s.gradient_checkpointing else "")
             + "".join(f", {name}" for name, on in (("activation offload", s.activation_offload),
                                                     ("tiled MLP", s.tiled_mlp), ("fused loss", s.fused_loss)) if on)
             + ("" if s.padded or s.method == "inference" else ", unpadded (packed) batches"))
    width = max(len(line.name) for line in est.lines)
    rows = [f"  {line.name:<{width}}  {line.bytes / GIB:9.2f} GiB   {line.formula}" for line in est.lines]
    rule = "  " + "-" * (width + 15)
    total = f"  {'estimated peak':<{width}}  {est.total / GIB:9.2f} GiB   {est.total_formula}"
    note = ("  (torch.cuda.max_memory_allocated; nvidia-smi shows ~0.5-1 GiB more for the CUDA context "
            "and allocator caching)")
    return "\n".join([head, setup, *rows, rule, total, note])

"""LoRA / QLoRA training throughput: the seed recipe (HF Trainer + PEFT) against tunelab, one run.

    # on any machine: tokenize the hotel set with tunelab's own pipeline (real tokenizers)
    python bench/train_throughput.py prepare --tokenizer qwen2 --out bench_data/hotel-qwen2.json
    # on the GPU: every configuration on the same samples, same optimizer steps
    python bench/train_throughput.py run --model qwen2.5-7b --samples bench_data/hotel-qwen2.json

Both sides train the same LoRA (r=16, alpha=32, all linear layers, dropout 0) on the same
samples in the same order: 16 samples per optimizer step, AdamW (fused), lr 1e-4 constant,
clip 1.0, bf16. The baseline is HF Trainer with micro-batches of 4 (x4 accumulation), SDPA,
gradient checkpointing and per-batch dynamic padding; `baseline_packed` gives it
pre-packed (flattened) micro-batches instead. tunelab runs `train.step.optimizer_step`
with `SFTObjective` and the model prepared by `model.adapters.prepare_for_training`.

Model FLOPs per real token (LoRA: frozen weights need no weight gradient):
    4 * N  +  12 * n_layers * n_heads * head_dim * (mean attended length)
N = parameters of every matmul (attention, MLP, LM head; no embeddings); 4N = forward (2N) +
input-gradient backward (2N); attention = forward QK^T and PV (4 * d * L per token per layer,
L the causal context) times 3 for forward + backward. MFU = FLOPs / time / measured peak.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

SAMPLES_PER_STEP = 16
BASELINE_MICRO = 4
LORA = dict(lora_rank=16, lora_alpha=32, lora_dropout=0.0, learning_rate=1e-4)

SHAPES = {  # the real configs (weights random: speed does not depend on their values)
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                                 rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=131072,
                                 tie_word_embeddings=False)),
    "llama3-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                rope_theta=5e5, rms_norm_eps=1e-5, max_position_embeddings=131072,
                                tie_word_embeddings=False)),
    "tiny": ("qwen2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=152064, max_position_embeddings=131072)),
}


# --- data -------------------------------------------------------------------------------------

def prepare(args) -> None:
    """Hotel train set -> token ids + labels with tunelab's reader, template and masking."""
    from conftest import shared_tokenizer
    from tunelab.config import TunelabConfig
    from tunelab.io import write_json_atomic
    from tunelab.train.dataset import load_sft_data

    tokenizer = shared_tokenizer(args.tokenizer)
    cfg = TunelabConfig(dataset=[args.data], dataset_format="hotel", template="hotel", cutoff_len=4096)
    data = load_sft_data(cfg, tokenizer)
    write_json_atomic(args.out, {"tokenizer": args.tokenizer, "samples": [[s.input_ids, s.labels] for s in data.train]})
    print(f"{len(data.train)} samples, {sum(len(s) for s in data.train)} tokens -> {args.out}")


def load_samples(path: str, n: int, seed: int = 0):
    import random

    from tunelab.data.collate import Sample

    rows = json.loads(Path(path).read_text())["samples"]
    random.Random(seed).shuffle(rows)
    while len(rows) < n:  # repeat the set if more steps are asked than it has
        rows = rows + rows
    return [Sample(ids, labels) for ids, labels in rows[:n]]


# --- model ------------------------------------------------------------------------------------

def build_model(name: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    arch, shape = SHAPES[name]
    config = (Qwen2Config if arch == "qwen2" else LlamaConfig)(**shape)
    cls = Qwen2ForCausalLM if arch == "qwen2" else LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model


def linear_params(model) -> int:
    """N of the MFU formula: every matmul weight (decoder linears and the LM head)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
               and "lora_" not in type(m).__name__.lower())


def flops_per_step(model_cfg, n_params: int, lengths: list[int]) -> float:
    head_dim = getattr(model_cfg, "head_dim", None) or model_cfg.hidden_size // model_cfg.num_attention_heads
    attn_width = model_cfg.num_hidden_layers * model_cfg.num_attention_heads * head_dim
    attended = sum(n * (n + 1) / 2 for n in lengths)  # causal: token t sees t + 1 tokens
    return 4 * n_params * sum(lengths) + 12 * attn_width * attended


def quantize_nf4(model) -> None:
    """Swap every decoder linear for a bitsandbytes NF4 Linear4bit (QLoRA: double quant, bf16 compute)."""
    import bitsandbytes as bnb

    decoder = model.get_decoder()
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4").to(child.weight.device)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
    model.is_loaded_in_4bit = True
    torch.cuda.empty_cache()


# --- measurement ------------------------------------------------------------------------------

@dataclass
class Result:
    name: str
    real_tokens: int = 0
    seconds: float = 0.0
    flops: float = 0.0
    peak_gib: float = 0.0
    estimate_gib: float = 0.0  # `tunelab estimate` for the step's largest micro-batch
    losses: list = field(default_factory=list)  # per optimizer step, every step (warm-up too)
    note: str = ""

    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds if self.seconds else 0.0


def reset_base(model) -> None:
    """Undo what a configuration switched on, so the shared base model starts the next one plain."""
    model.set_attn_implementation("sdpa")
    model.gradient_checkpointing_disable()
    if hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()
    for layer in model.get_decoder().layers:  # compiled (or offloaded) layers back to eager
        layer._compiled_call_impl = None
    from tunelab.train.fast.tiled_mlp import untile_mlps

    untile_mlps(model)
    torch._dynamo.reset()
    reset_memory()


def reset_memory():
    gc.collect()
    if torch.cuda.is_available():  # (bench/long_context.py smoke-runs on CPU)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def step_groups(samples, micro: int):
    """Optimizer steps, each a list of micro-batches of sample objects."""
    steps = [samples[i:i + SAMPLES_PER_STEP] for i in range(0, len(samples), SAMPLES_PER_STEP)]
    return [[step[j:j + micro] for j in range(0, len(step), micro)] for step in steps]


def initial_lora_state(peft_model) -> dict:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}


def load_lora_state(peft_model, state: dict) -> None:
    params = dict(peft_model.named_parameters())
    missing = set(state) ^ {n for n in params if "lora_" in n}
    if missing:
        raise RuntimeError(f"LoRA parameters differ between the two set-ups: {sorted(missing)[:4]}")
    with torch.no_grad():
        for n, value in state.items():
            params[n].copy_(value)


def run_baseline(model, samples, warmup: int, packed: bool, lora_init: dict | None,
                 micro: int = BASELINE_MICRO, checkpointing: bool = True, name: str | None = None,
                 peft_model=None) -> tuple[Result, dict]:
    """The seed recipe: HF Trainer + PEFT LoRA, bf16, SDPA, checkpointing, dynamic padding.

    `peft_model` given: a model another library already wrapped (Unsloth), trained the same way."""
    import tempfile

    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

    name = name or ("baseline_packed" if packed else "baseline") + ("" if micro == BASELINE_MICRO else f"_mb{micro}")
    torch.manual_seed(1)
    peft_model = peft_model or get_peft_model(model, LoraConfig(
        r=LORA["lora_rank"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
        target_modules="all-linear", task_type="CAUSAL_LM"))
    init = initial_lora_state(peft_model)
    if lora_init is not None:
        load_lora_state(peft_model, lora_init)
    rows = [{"input_ids": s.input_ids, "labels": s.labels} for s in samples]

    def pad_collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), 0, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    class InOrder(Trainer):  # the same sample order for every configuration
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    n_steps = len(samples) // SAMPLES_PER_STEP
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=micro,
            gradient_accumulation_steps=SAMPLES_PER_STEP // micro, max_steps=n_steps,
            learning_rate=LORA["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, optim="adamw_torch_fused", bf16=True, gradient_checkpointing=checkpointing,
            logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=True, seed=1)
        collate = DataCollatorWithFlattening() if packed else pad_collate
        trainer = InOrder(model=peft_model, args=args, train_dataset=rows, data_collator=collate)
        trainer.add_callback(StepTimer())
        reset_memory()
        trainer.train()
        peak = torch.cuda.max_memory_allocated() / 2**30
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    measured = [s for s in samples[warmup * SAMPLES_PER_STEP:n_steps * SAMPLES_PER_STEP]]
    result = Result(name, sum(len(s) for s in measured), sum(times[warmup:]), 0.0, peak, losses)
    if model is not None:
        peft_model.unload()  # drops the LoRA layers: the base model is shared by the next configuration
        reset_base(model)
    del trainer, peft_model
    return result, init


@contextlib.contextmanager
def profiled(enabled: bool):
    """torch.profiler around one step (BENCH_PROFILE=<config>): where the time goes, on stdout."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))


def run_tunelab(model, samples, warmup: int, name: str, lora_init: dict, micro: int = SAMPLES_PER_STEP,
                lora: dict | None = None, **levers) -> Result:
    """tunelab's own pieces: prepare_for_training, SFTObjective (+ levers), step.optimizer_step."""
    from types import SimpleNamespace

    from tunelab.config import TunelabConfig
    from tunelab.model.adapters import prepare_for_training
    from tunelab.train.fast import apply_speed_levers
    from tunelab.train.objectives.sft import SFTObjective
    from tunelab.train.optim import build_optimizer, build_scheduler
    from tunelab.train.step import optimizer_step, settle_steps

    levers = dict(padding_free=False, fused_loss=False, torch_compile=False, gradient_checkpointing=False) | levers
    cfg = TunelabConfig(bf16=True, per_device_train_batch_size=micro, lr_scheduler_type="constant",
                        max_grad_norm=1.0, **(LORA | (lora or {})), **levers)
    device = torch.device("cuda")
    peft_model = prepare_for_training(model, cfg)
    load_lora_state(peft_model, lora_init)
    objective = SFTObjective(cfg, SimpleNamespace(pad_token_id=0, eos_token_id=0))
    apply_speed_levers(peft_model, cfg, device)
    objective.setup(peft_model, device)
    peft_model.train()
    optimizer = build_optimizer(peft_model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10**6)
    result = Result(name)
    reset_memory()
    for i, step in enumerate(step_groups(samples, micro)):
        batches = [objective.collate(rows) for rows in step]
        torch.cuda.synchronize()
        start = time.perf_counter()
        with profiled(os.environ.get("BENCH_PROFILE") == name and i == warmup):
            stats = optimizer_step(peft_model, objective, batches, optimizer, scheduler, None, cfg, device)
            torch.cuda.synchronize()
        result.losses.append(settle_steps([stats], device)[0][0] / stats.weight)
        if i >= warmup:
            result.seconds += time.perf_counter() - start
            result.real_tokens += stats.real_tokens
    result.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    base = peft_model.unload()
    del optimizer, peft_model
    reset_base(base)
    return result


def estimate_gib(model_cfg, name: str, samples) -> float:
    """serve/estimate.py for this configuration at its largest micro-batch (where the peak is)."""
    from tunelab.serve.estimate import Settings, architecture_from_config, estimate_memory

    if name.startswith("baseline"):
        levers, micro = dict(gradient_checkpointing=True), 16 if name.endswith("_mb16") else BASELINE_MICRO
    else:
        levers = dict(TUNELAB_CONFIGS[name])
        micro = levers.pop("micro", SAMPLES_PER_STEP)
    packed = levers.get("padding_free", False) or name.startswith("baseline_packed")
    groups = [g for step in step_groups(samples, micro) for g in step]
    if packed:  # one stream of real tokens
        batch, seq_len = 1, max(sum(len(s) for s in g) for g in groups)
    else:
        batch, seq_len = max(((len(g), max(len(s) for s in g)) for g in groups), key=lambda bs: bs[0] * bs[1])
    settings = Settings(method="qlora" if levers.get("quantization_bit") else "lora", seq_len=seq_len, batch=batch,
                        lora_rank=LORA["lora_rank"], padded=not packed,
                        gradient_checkpointing=levers.get("gradient_checkpointing", name.startswith("baseline")),
                        fused_loss=levers.get("fused_loss", False))
    return estimate_memory(architecture_from_config(model_cfg.to_dict(), name="bench"), settings).total / 2**30


# --- longest trainable sequence ---------------------------------------------------------------

def fits(model, length: int, tunelab: bool, vocab: int) -> bool:
    """One forward + backward on one sample of `length` tokens, both with checkpointing."""
    from peft import LoraConfig, get_peft_model

    from tunelab.data.collate import Sample
    from tunelab.train.fast import fast_causal_lm_loss_sum
    from tunelab.train.fast.varlen import use_varlen_attention

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ids = torch.randint(0, vocab, (length,)).tolist()
    ok = True
    reset_memory()
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if tunelab:
                use_varlen_attention(peft_model)
                from tunelab.data.collate import pad_batch
                batch = {k: v.cuda() for k, v in pad_batch([Sample(ids, ids)], 0).items()}
                loss, count = fast_causal_lm_loss_sum(peft_model, batch)
                loss = loss / count
            else:
                x = torch.tensor([ids], device="cuda")
                loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        ok = False
    finally:
        loss = None
        reset_base(peft_model.unload())
    return ok


def longest_sequence(model, tunelab: bool, start: int, limit: int, vocab: int) -> int:
    """Largest power-of-two multiple of `start` that trains (doubling; stops at `limit`)."""
    best, length = 0, start
    while length <= limit and fits(model, length, tunelab, vocab):
        best, length = length, length * 2
    return best


# --- the run ----------------------------------------------------------------------------------

def measured_peak_tflops() -> float:
    import triton.testing

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def check_varlen_kernel() -> float:
    """Relative error of the CUDA varlen kernel against per-sample SDPA (bf16, GQA 28/4)."""
    from tunelab.model.attention import varlen_attention

    lengths = [700, 1, 33, 1500, 257]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    n = sum(lengths)
    q = torch.randn(n, 28, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(n, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    got = varlen_attention(q, k, v, cu, max(lengths), 128**-0.5, use_kernel=True)
    ref = varlen_attention(q.double(), k.double(), v.double(), cu, max(lengths), 128**-0.5, use_kernel=False)
    return float(torch.linalg.norm(got.double() - ref) / torch.linalg.norm(ref))


def draw_lora_init(model) -> dict:
    """The adapter's initial weights, drawn once so every configuration starts from the same."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=LORA["lora_rank"], lora_alpha=LORA["lora_alpha"],
                                                  target_modules="all-linear", task_type="CAUSAL_LM"))
    init = initial_lora_state(peft_model)
    peft_model.unload()
    return init


def run(args) -> None:
    torch._dynamo.config.recompile_limit = 64  # every configuration recompiles the same layer code
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
            "steps": args.steps, "warmup": args.warmup}
    info["peak_tflops"] = measured_peak_tflops()
    info["varlen_rel_err"] = check_varlen_kernel()
    print(json.dumps(info), flush=True)
    samples = load_samples(args.samples, (args.steps + args.warmup) * SAMPLES_PER_STEP)
    model = build_model(args.model, "cuda")
    n_params = linear_params(model)
    measured = samples[args.warmup * SAMPLES_PER_STEP:]
    flops = flops_per_step(model.config, n_params, [len(s) for s in measured])
    info["n_params"] = n_params
    longest = {}
    if args.longest:  # first: the tunelab_qlora* configs quantize the shared model
        vocab = model.config.vocab_size
        longest["baseline"] = longest_sequence(model, False, 4096, args.longest, vocab)
        longest["tunelab"] = longest_sequence(model, True, max(4096, longest["baseline"]), args.longest, vocab)
        print(json.dumps({"longest": longest}), flush=True)
    results = []
    lora_init = None
    for name in args.configs.split(","):
        if name.startswith("tunelab_qlora") and not getattr(model, "is_loaded_in_4bit", False):
            quantize_nf4(model)  # last: quantizing changes the shared base model for good
        t0 = time.perf_counter()
        if name.startswith("baseline"):
            res, init = run_baseline(model, samples, args.warmup, packed=name.startswith("baseline_packed"),
                                     lora_init=lora_init, micro=16 if name.endswith("_mb16") else BASELINE_MICRO)
            lora_init = lora_init or init
        else:
            lora_init = lora_init or draw_lora_init(model)
            res = run_tunelab(model, samples, args.warmup, name, lora_init, **TUNELAB_CONFIGS[name])
        res.flops = flops
        res.estimate_gib = estimate_gib(model.config, name, samples)
        res.note = f"{time.perf_counter() - t0:.0f}s wall"
        results.append(res)
        print(json.dumps(vars(res)), flush=True)
    report = {"info": info, "results": [vars(r) for r in results], "longest": longest}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(report))


TUNELAB_CONFIGS = {  # name -> config keys (micro = samples per micro-batch)
    "tunelab": dict(padding_free=True, fused_loss=True, torch_compile=True),
    "tunelab_eager": dict(padding_free=True, fused_loss=True),
    "tunelab_mb8": dict(padding_free=True, fused_loss=True, torch_compile=True, micro=8),  # 2 x 8 per step
    "tunelab_ckpt": dict(padding_free=True, fused_loss=True, gradient_checkpointing=True),
    "tunelab_ckpt_mb4": dict(padding_free=True, fused_loss=True, gradient_checkpointing=True, micro=BASELINE_MICRO),
    "tunelab_plain_loss": dict(padding_free=True),
    "tunelab_padded": dict(fused_loss=True, micro=BASELINE_MICRO),
    "tunelab_qlora": dict(padding_free=True, fused_loss=True, gradient_checkpointing=True),  # vs tunelab_ckpt
    # the recipe's lora_dropout 0.1: masks recomputed in backward (train/fast/lora_dropout.py) vs PEFT's dropout
    "tunelab_dropout": dict(padding_free=True, fused_loss=True, torch_compile=True, lora=dict(lora_dropout=0.1)),
    "tunelab_dropout_peft": dict(padding_free=True, fused_loss=True, torch_compile=True, speed="off",
                                 lora=dict(lora_dropout=0.1)),
    # NF4 dequantized in torch ops inside the compiled layers (train/fast/nf4.py): vs `tunelab`
    "tunelab_qlora_compiled": dict(padding_free=True, fused_loss=True, torch_compile=True, quantization_bit=4),
    # the baseline's micro-batches (equal tokens per micro-batch): peak memory vs `baseline`
    "tunelab_qlora_mb4": dict(padding_free=True, fused_loss=True, gradient_checkpointing=True, quantization_bit=4,
                              micro=BASELINE_MICRO),
}


def table(report: dict) -> str:
    info, rows = report["info"], report["results"]
    base = next((r for r in rows if r["name"] == "baseline"), rows[0])
    base_tps = base["real_tokens"] / base["seconds"] if base["seconds"] else 0
    lines = [f"{info['model']} on {info['device']} (torch {info['torch']}); peak bf16 matmul measured "
             f"{info['peak_tflops']:.0f} TFLOP/s; N = {info['n_params'] / 1e9:.2f}B; "
             f"{info['steps']} steps x {SAMPLES_PER_STEP} samples after {info['warmup']} warm-up; "
             f"varlen kernel rel. err {info['varlen_rel_err']:.1e}",
             "| config | real tok/s | x baseline | MFU (measured peak) | MFU (989 TF) | peak GiB | x baseline "
             "| estimate GiB | loss step 1 | final loss | max abs loss diff vs baseline |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        tps = r["real_tokens"] / r["seconds"] if r["seconds"] else 0
        flops_per_s = r["flops"] / r["seconds"] if r["seconds"] else 0
        diff = max((abs(a - b) for a, b in zip(r["losses"], base["losses"])), default=float("nan"))
        lines.append(f"| {r['name']} | {tps:,.0f} | {tps / base_tps if base_tps else 0:.2f} | "
                     f"{100 * flops_per_s / 1e12 / info['peak_tflops']:.1f}% | {100 * flops_per_s / 989e12:.1f}% | "
                     f"{r['peak_gib']:.1f} | {r['peak_gib'] / base['peak_gib']:.2f} | {r.get('estimate_gib', 0):.1f} | "
                     f"{r['losses'][0]:.4f} | "
                     f"{r['losses'][-1]:.4f} | {diff:.4f} |")
    if report.get("longest"):
        lines.append(f"longest trainable single sequence (doubling from 4096): {report['longest']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--tokenizer", default="qwen2", help="a name from tests/conftest.py GGUF_VOCABS")
    p.add_argument("--data", default=str(REPO.parent / "shared/data/hotel/train.jsonl"))
    p.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="qwen2.5-7b", choices=sorted(SHAPES))
    r.add_argument("--samples", required=True)
    r.add_argument("--steps", type=int, default=12, help="measured optimizer steps")
    r.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing (compilation)")
    r.add_argument("--configs", default="baseline,baseline_packed,tunelab,tunelab_eager,tunelab_ckpt")
    r.add_argument("--longest", type=int, default=0, help="probe the longest sequence up to this many tokens")
    r.add_argument("--out", default=None)
    args = parser.parse_args()
    prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()

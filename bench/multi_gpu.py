"""Several GPUs: LoRA on 1 vs 2 GPUs (same global batch), and FSDP2 full fine-tuning across 2.

    # on any machine (needs ../shared): the hotel set tokenized with the real Qwen2 tokenizer
    python bench/train_throughput.py prepare --tokenizer qwen2 --out bench_data/hotel-qwen2.json
    # on a 2-GPU machine, one command: three torchrun launches, a table at the end
    python bench/multi_gpu.py run --samples bench_data/hotel-qwen2.json --out bench_data/multi_gpu.json
    # LoRA on the Qwen2.5-32B shape (65 GB of bf16 weights) sharded by FSDP2 across 2 GPUs
    python bench/multi_gpu.py run --samples bench_data/hotel-qwen2.json --modes lora_fsdp_32b_2gpu \
        --out bench_data/multi_gpu_32b.json
    # QLoRA (NF4, bitsandbytes) on 1 GPU vs FSDP2 across 2 (same global batch)
    python bench/multi_gpu.py run --samples bench_data/hotel-qwen2.json --modes qlora_1gpu,qlora_fsdp_2gpu \
        --out bench_data/multi_gpu_qlora.json
    # smoke test of this script on CPU (gloo), no GPU needed
    python bench/multi_gpu.py run --samples bench_data/hotel-qwen2.json --model tiny --steps 1 --warmup 1 --no-compile

Every launch trains tunelab's own pieces: `prepare_for_training`, `SFTObjective` with the
fast path (padding-free, chunked loss, compiled layers), `distributed.wrap` (DDP or FSDP2),
`rank_share` and `step.optimizer_step` - the code `tunelab train` runs under torchrun.
Weights are random (speed does not depend on their values) in the real Qwen2.5-7B shape.

- lora_1gpu / lora_2gpu: LoRA r=16 on all linear layers, 32 samples per optimizer step in
  micro-batches of 16 (one GPU: 2 accumulated; two GPUs: 1 each), same samples, same adapter
  init: real tokens/s and the per-step loss curves, which must agree within bf16 noise.
- full_fsdp_2gpu: every weight trains (fp32 master weights + AdamW state sharded by FSDP2,
  bf16 compute, fp32 gradient reduction), gradient checkpointing, 64 samples per step
  (2 GPUs x 2 micro-batches of 16). MFU counts 6N FLOPs per token (forward + both
  backward matmuls; recomputation not counted) + attention, against the measured peak.
- lora_ds_zero2_2gpu, lora_ds_zero3_2gpu, full_ds_zero3_2gpu (asked for by name; need deepspeed):
  the LoRA 2-GPU run and the full fine-tuning run through DeepSpeed ZeRO-2/3 instead of DDP/FSDP2.
- lora_fsdp_2gpu (asked for by name): lora_2gpu with FSDP2 instead of DDP, to compare its loss curve
  with lora_1gpu (FSDP2 gathers the LoRA weights in bf16 and reduces gradients in fp32).
- lora_fsdp_32b_2gpu (asked for by name): the 32B model is built on the meta device, sharded,
  and only each GPU's shards are allocated and filled with random values.
- qlora_1gpu / qlora_fsdp_2gpu (asked for by name; need bitsandbytes): the LoRA runs on the base
  quantized to NF4 (train_throughput.quantize_nf4), with gradient checkpointing; under FSDP2 each GPU
  keeps the whole 4-bit base and the float weights (LoRA, norms, embeddings, head) are sharded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

LORA = dict(finetuning_type="lora", lora_rank=16, lora_alpha=32, lora_dropout=0.0, learning_rate=1e-4)
MODES = {  # name -> (processes, shape, config keys, samples per micro-batch, samples per optimizer step)
    "lora_1gpu": (1, "qwen2.5-7b", LORA, 16, 32),
    "lora_2gpu": (2, "qwen2.5-7b", LORA, 16, 32),
    "lora_4gpu": (4, "qwen2.5-7b", LORA, 8, 32),  # the same 32-sample global step, 8 a GPU
    "lora_fsdp_2gpu": (2, "qwen2.5-7b", dict(LORA, distributed_strategy="fsdp"), 16, 32),  # FSDP2's math vs 1 GPU
    "full_fsdp_2gpu": (2, "qwen2.5-7b", dict(finetuning_type="full", learning_rate=1e-5, gradient_checkpointing=True),
                       16, 64),
    # DeepSpeed (pip install 'tunelab[deepspeed]'): the same runs through accelerate's DeepSpeed plugin.
    "lora_ds_zero2_2gpu": (2, "qwen2.5-7b", dict(LORA, deepspeed="zero2"), 16, 32),
    "lora_ds_zero3_2gpu": (2, "qwen2.5-7b", dict(LORA, deepspeed="zero3"), 16, 32),
    "full_ds_zero3_2gpu": (2, "qwen2.5-7b", dict(finetuning_type="full", learning_rate=1e-5, gradient_checkpointing=True,
                                                 deepspeed="zero3"), 16, 64),
    # QLoRA (pip install bitsandbytes): the 4-bit base whole on each GPU, the rest sharded by FSDP2.
    "qlora_1gpu": (1, "qwen2.5-7b", dict(LORA, quantization_bit=4, gradient_checkpointing=True), 16, 32),
    "qlora_fsdp_2gpu": (2, "qwen2.5-7b", dict(LORA, quantization_bit=4, gradient_checkpointing=True,
                                              distributed_strategy="fsdp"), 16, 32),
    # Not in the default set: LoRA on a model whose bf16 weights (65 GB) exceed one card.
    "lora_fsdp_32b_2gpu": (2, "qwen2.5-32b", dict(LORA, distributed_strategy="fsdp", gradient_checkpointing=True),
                           16, 32),
}
DEFAULT_MODES = "lora_1gpu,lora_2gpu,full_fsdp_2gpu"
EXTRA_SHAPES = {  # the real config of Qwen2.5-32B
    "qwen2.5-32b": ("qwen2", dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                                  num_key_value_heads=8, intermediate_size=27648, vocab_size=152064,
                                  rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=32768,
                                  tie_word_embeddings=False)),
}


# --- one launch (runs under torchrun) -----------------------------------------------------------

def worker(args) -> None:
    from types import SimpleNamespace

    from train_throughput import (
        build_model,
        flops_per_step,
        linear_params,
        load_samples,
        measured_peak_tflops,
        quantize_nf4,
    )

    from tunelab.config import TunelabConfig
    from tunelab.model.adapters import prepare_for_training
    from tunelab.train import distributed
    from tunelab.train.fast import apply_speed_levers
    from tunelab.train.fast.plan import zero3_gathers_in_layers
    from tunelab.train.objectives.sft import SFTObjective
    from tunelab.train.optim import build_optimizer, build_scheduler
    from tunelab.train.step import optimizer_step, settle_steps

    launched = time.perf_counter()
    torch._dynamo.config.recompile_limit = 64
    world, shape, keys, micro, per_step = MODES[args.mode]
    shape = args.model or shape
    cfg = TunelabConfig(bf16=torch.cuda.is_available(), per_device_train_batch_size=micro, lr_scheduler_type="constant",
                        max_grad_norm=1.0, padding_free=True, fused_loss=True, torch_compile=args.compile,
                        save_strategy="no", **keys)
    if zero3_gathers_in_layers(cfg):  # as `tunelab train` decides: ZeRO-3's gathers do not compile
        cfg = dataclasses.replace(cfg, torch_compile=False)
    dist = distributed.init_distributed(cfg)
    assert dist.world == world, f"{args.mode} needs {world} processes, got {dist.world}"
    cuda = torch.cuda.is_available()  # CPU + gloo only to smoke-test this script (--model tiny)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak = measured_peak_tflops() if cuda else float("nan")
    samples = load_samples(args.samples, (args.steps + args.warmup) * per_step)
    meta = shape in EXTRA_SHAPES or args.meta
    model = build_meta_model(shape) if meta else build_model(shape, str(device))
    n_params = linear_params(model)
    if cfg.quantization_bit:  # as loader.load_model does with bitsandbytes: the same NF4 base on every GPU
        quantize_nf4(model)
    torch.manual_seed(1)  # the same adapter init in every launch
    model = prepare_for_training(model, cfg)
    objective = SFTObjective(cfg, SimpleNamespace(pad_token_id=0, eos_token_id=0))
    objective = distributed.wrap(model, objective, cfg, dist, device)
    if meta:
        materialize_shards(objective.engine, model.config, device)
    apply_speed_levers(model, cfg, device)  # compiled layers after wrapping
    objective.setup(model, device)
    model.train()
    optimizer = build_optimizer(model, cfg, device)
    if hasattr(objective, "prepare"):  # DeepSpeed: model and optimizer to the engine together, as the loop does
        objective.prepare(optimizer)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10**6)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    row_totals = distributed.RowTotals(objective, samples)  # the global step's weight, on the host as the loop does
    steps, seconds, tokens, lengths = [], 0.0, 0, []
    began = time.perf_counter()
    if dist.is_main:  # progress on stderr: a slow compile is told from a hang by these lines
        print(f"{args.mode}: set up in {began - launched:.0f} s", file=sys.stderr, flush=True)
    sample_lengths = [len(s) for s in samples] if cfg.padding_free else None  # as the loop shares a step
    for i in range(args.steps + args.warmup):
        # The global step: `per_step` samples as micro-batches of `micro`, split by rank as the loop does.
        ids = list(range(i * per_step, (i + 1) * per_step))
        step_ids = [ids[j:j + micro] for j in range(0, len(ids), micro)]
        batches = [objective.collate([samples[k] for k in share])
                   for share in distributed.rank_share(step_ids, dist.rank, dist.world, sample_lengths)]
        totals = distributed.step_totals(step_ids, dist.world, lambda share: share, row_totals, sample_lengths)
        sync()
        start = time.perf_counter()
        stats = optimizer_step(model, objective, batches, optimizer, scheduler, None, cfg, device, dist,
                               totals=totals)
        sync()
        steps.append(stats)
        if dist.is_main:
            print(f"{args.mode}: step {i + 1} took {time.perf_counter() - start:.1f} s "
                  f"({time.perf_counter() - began:.0f} s since set-up)", file=sys.stderr, flush=True)
        if i >= args.warmup:
            seconds += time.perf_counter() - start
            tokens += stats.real_tokens
            lengths += [len(samples[k]) for k in ids]
    losses = [loss / stats.weight for (loss, _, _), stats in zip(settle_steps(steps, device, dist), steps)]
    flops = flops_per_step(model.config, n_params, lengths)
    if cfg.finetuning_type == "full":
        flops += 2 * n_params * sum(lengths)  # weight gradients: 6N instead of LoRA's 4N
    result = {"mode": args.mode, "gpus": dist.world, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "peak_tflops": peak, "tokens_per_s": tokens / seconds, "seconds": seconds,
              "mfu": flops / seconds / (peak * 1e12 * dist.world), "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
              "losses": losses, "steps": args.steps, "warmup": args.warmup, "n_params": n_params,
              "samples_per_step": per_step, "micro": micro}
    if dist.is_main:
        Path(args.result).write_text(json.dumps(result))
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
    distributed.shutdown(dist)


def build_meta_model(name: str):
    """The model on the meta device: shapes only, no memory (a 32B model fits no single card)."""
    from train_throughput import SHAPES
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    arch, shape = (SHAPES | EXTRA_SHAPES)[name]
    config = (Qwen2Config if arch == "qwen2" else LlamaConfig)(**shape)
    with torch.device("meta"):
        return (Qwen2ForCausalLM if arch == "qwen2" else LlamaForCausalLM)._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa")


@torch.no_grad()
def materialize_shards(engine, config, device) -> None:
    """After fully_shard: allocate only this rank's shards and fill them with random weights
    (LoRA B = 0, norms = 1, as a fresh adapter on a real model), then rebuild the RoPE tables."""
    torch.manual_seed(2)
    engine.to_empty(device=device)
    for name, param in engine.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if "lora_B" in name:
            local.zero_()
        elif "norm" in name:
            local.fill_(1.0)
        else:
            local.normal_(0.0, 0.02)
    for module in engine.modules():
        if hasattr(module, "inv_freq"):
            fresh = type(module)(config)
            for buffer in ("inv_freq", "original_inv_freq"):
                if hasattr(module, buffer):
                    getattr(module, buffer).copy_(getattr(fresh, buffer))


# --- the whole benchmark ------------------------------------------------------------------------

def run(args) -> None:
    out_dir = Path(args.out).with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for mode in args.modes.split(","):
        world = MODES[mode][0]
        result = out_dir / f"{mode}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                   __file__, "worker", "--mode", mode, "--samples", args.samples,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--result", str(result)]
        command += ["--model", args.model] if args.model else []
        command += ["--meta"] if args.meta else []
        if not args.compile:
            command.append("--no-compile")
        t0 = time.perf_counter()
        proc = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="8"))
        if proc.returncode != 0 or not result.exists():
            print(f"{mode}: failed (exit {proc.returncode})", flush=True)
            continue
        results[mode] = json.loads(result.read_text()) | {"wall_s": time.perf_counter() - t0}
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: dict) -> str:
    lines = ["| run | GPUs | samples / step (micro) | real tok/s | x 1 GPU | MFU (measured peak) | peak GiB / GPU "
             "| final loss | max abs loss diff vs 1 GPU |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode, r in results.items():
        base = results.get(mode.split("_")[0] + "_1gpu")  # lora_2gpu vs lora_1gpu, qlora_fsdp_2gpu vs qlora_1gpu
        same_math = base is not None
        speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if same_math else "-"
        diff = (f"{max(abs(a - b) for a, b in zip(r['losses'], base['losses'])):.4f}" if same_math else "-")
        lines.append(f"| {mode} | {r['gpus']} | {r['samples_per_step']} ({r['micro']}) | {r['tokens_per_s']:,.0f} | {speedup} | {100 * r['mfu']:.1f}% | "
                     f"{r['peak_gib']:.1f} | {r['losses'][-1]:.4f} | {diff} |")
    if results:
        r = next(iter(results.values()))
        lines.append(f"{r['device']}; peak bf16 matmul {r['peak_tflops']:.0f} TFLOP/s measured; N = "
                     f"{r['n_params'] / 1e9:.2f}B; {r['steps']} measured steps after {r['warmup']} warm-up")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "worker"):
        p = sub.add_parser(name)
        p.add_argument("--samples", required=True, help="from train_throughput.py prepare")
        p.add_argument("--model", default=None, help="override every mode's shape (tiny: smoke test on CPU)")
        p.add_argument("--meta", action="store_true", help="build every model on the meta device (as the 32B)")
        p.add_argument("--steps", type=int, default=12, help="measured optimizer steps")
        p.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing (compilation)")
        p.add_argument("--no-compile", dest="compile", action="store_false", help="eager decoder layers")
    run_p, worker_p = sub.choices["run"], sub.choices["worker"]
    run_p.add_argument("--modes", default=DEFAULT_MODES, help=f"of {', '.join(MODES)}")
    run_p.add_argument("--out", default="bench_data/multi_gpu.json")
    worker_p.add_argument("--mode", choices=sorted(MODES), required=True)
    worker_p.add_argument("--result", required=True)
    args = parser.parse_args()
    run(args) if args.command == "run" else worker(args)


if __name__ == "__main__":
    main()

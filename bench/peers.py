"""Peers users would pick, on the harness's samples and LoRA (bench/train_throughput.py), one process each.

    python bench/peers.py --samples bench_data/hotel-qwen2.json --model-dir /tmp/tunelab-bench-models \
        --peers liger,liger_ckpt,unsloth,unsloth_ckpt --out $OUT/peers.json

- `liger` / `liger_ckpt`: the best standard recipe an expert assembles: transformers Trainer + PEFT +
  Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) + `DataCollatorWithFlattening`
  (padding-free), micro-batch 16, without / with gradient checkpointing;
- `unsloth` / `unsloth_ckpt`: Unsloth's FastLanguageModel + its LoRA, the same Trainer loop, micro-batch
  16, flattened, without checkpointing / with its offloaded checkpointing ("unsloth").

Same samples in the same order, 16 per optimizer step, LoRA r16/alpha32/dropout 0 on all linear layers,
AdamW fused, lr 1e-4 constant, bf16, as the harness. Liger and Unsloth patch transformers for the whole
process, so each peer runs in a process of its own (this script re-runs itself). Packages that the GPU
machine lacks are carried as unpacked wheels on PYTHONPATH (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import (  # noqa: E402
    SAMPLES_PER_STEP,
    build_model,
    flops_per_step,
    linear_params,
    load_samples,
    run_baseline,
)

PEERS = ("liger", "liger_ckpt", "unsloth", "unsloth_ckpt")


def run_peer(name: str, args) -> dict:
    samples = load_samples(args.samples, (args.steps + args.warmup) * SAMPLES_PER_STEP)
    if name.startswith("liger"):
        from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2

        (apply_liger_kernel_to_qwen2 if args.model.startswith("qwen") else apply_liger_kernel_to_llama)()
        model = build_model(args.model, "cuda")
        result, _ = run_baseline(model, samples, args.warmup, packed=True, lora_init=None, micro=16,
                                 checkpointing=name.endswith("_ckpt"), name=name)
    else:
        from unsloth import FastLanguageModel

        folder = Path(args.model_dir) / args.model
        model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=4096, dtype=torch.bfloat16,
                                                     load_in_4bit=False, local_files_only=True)
        peft_model = FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=32, lora_dropout=0, bias="none", random_state=1,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            use_gradient_checkpointing="unsloth" if name.endswith("_ckpt") else False)
        result, _ = run_baseline(None, samples, args.warmup, packed=True, lora_init=None, micro=16,
                                 checkpointing=False, name=name, peft_model=peft_model)
        model = peft_model
    measured = samples[args.warmup * SAMPLES_PER_STEP:]
    config = model.config
    result.flops = flops_per_step(config, linear_params(model), [len(s) for s in measured])
    return vars(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-7b")
    parser.add_argument("--samples", required=True)
    parser.add_argument("--model-dir", default="/tmp/tunelab-bench-models", help="bench/user_path.py's folders")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: run one peer
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.one:
        try:
            print("RESULT " + json.dumps(run_peer(args.one, args)), flush=True)
        except Exception as exc:  # a peer that cannot run here is reported, with its error, not hidden
            print("RESULT " + json.dumps({"name": args.one, "error": f"{type(exc).__name__}: {exc}",
                                          "trace": traceback.format_exc()[-2000:]}), flush=True)
        return
    results = []
    for name in args.peers.split(","):
        argv = [sys.executable, __file__, "--one", name, "--model", args.model, "--samples", args.samples,
                "--model-dir", args.model_dir, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        proc = subprocess.run(argv, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        result = json.loads(line[7:]) if line else {"name": name, "error": (proc.stderr or proc.stdout)[-2000:]}
        results.append(result)
        shown = {k: v for k, v in result.items() if k != "losses"}
        if "real_tokens" in result and result.get("seconds"):
            shown["tokens_per_s"] = round(result["real_tokens"] / result["seconds"])
        print(json.dumps(shown)[:2500], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

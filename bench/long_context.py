"""Longest trainable single sequence and its peak memory, with `tunelab estimate` beside each probe.

    python bench/long_context.py --model qwen2.5-7b --configs baseline,tunelab_offload \
        --first tunelab_offload=262144 --limit 262144 --out long-qwen.json
    python bench/long_context.py --model llama3-8b --configs tunelab_offload --lengths 344064

One LoRA (r=16, alpha 32, all linear layers, dropout 0) on random bf16 weights of the real
model shape (bench/train_throughput.py SHAPES), one sequence of random token ids, every
token a target; one forward + backward per probe, bf16 autocast. Configurations:

- baseline: transformers + PEFT, SDPA, gradient checkpointing, the model's own loss;
- tunelab_ckpt: padding-free varlen attention + chunked LM head/loss + gradient checkpointing
  (set up by `apply_speed_levers`, as the trainer does, so LoRA inputs stay bf16 too);
- tunelab_offload: the same + activation offload (train/fast/offload.py) + token-tiled MLP
  (train/fast/tiled_mlp.py) in place of checkpointing.

Lengths double from --start (or from --first CONFIG=LEN, or are given with --lengths) until
one does not fit, --limit is passed, or the next doubling would not finish within --budget-s
(attention grows with the square of the length). Each probe prints the measured peak (torch.cuda.max_memory_allocated),
its time and tokens/s, and the estimate for the same settings (serve/estimate.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from train_throughput import SHAPES, build_model, reset_base, reset_memory  # noqa: E402

CONFIGS = ("baseline", "tunelab_ckpt", "tunelab_offload")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the script (--model tiny)
LORA_RANK = 16
GIB = 2**30


def estimate_gib(model_cfg, name: str, length: int) -> float:
    """`tunelab estimate` for one sequence of `length` tokens under configuration `name`."""
    from tunelab.serve.estimate import Settings, architecture_from_config, estimate_memory

    arch = architecture_from_config(model_cfg.to_dict(), name="bench")
    tunelab = name != "baseline"
    offload = name == "tunelab_offload"
    settings = Settings(method="lora", seq_len=length, batch=1, lora_rank=LORA_RANK, padded=False,
                        gradient_checkpointing=True, fused_loss=tunelab, activation_offload=offload,
                        tiled_mlp=offload)
    return estimate_memory(arch, settings).total / GIB


def train_once(model, name: str, length: int) -> dict:
    """One forward + backward of one `length`-token sequence; peak GiB and seconds, or OOM."""
    from peft import LoraConfig, get_peft_model

    from tunelab.config import TunelabConfig
    from tunelab.data.collate import Sample, pad_batch
    from tunelab.train.fast import apply_speed_levers, fast_causal_lm_loss_sum
    from tunelab.train.fast.offload import offload_active

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                                  target_modules="all-linear"))
    if name != "baseline":  # the trainer's own set-up: apply_speed_levers with these keys
        offload = name == "tunelab_offload"
        apply_speed_levers(peft_model, TunelabConfig(bf16=True, padding_free=True, fused_loss=True,
                                                     gradient_checkpointing=True, activation_offload=offload,
                                                     tiled_mlp=offload))
        if DEVICE == "cuda" and offload_active(peft_model) != offload:
            raise SystemExit("activation offload did not switch on: is this a CUDA device?")
    ids = torch.randint(0, model.config.vocab_size, (length,)).tolist()
    cuda = DEVICE == "cuda"
    reset_memory()
    row = {"config": name, "length": length}
    loss = None
    try:
        start = _synced_time(cuda)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            if name == "baseline":
                x = torch.tensor([ids], device=DEVICE)
                loss = peft_model(input_ids=x, labels=x).loss
            else:
                batch = {k: v.to(DEVICE) for k, v in pad_batch([Sample(ids, ids)], 0).items()}
                total, count = fast_causal_lm_loss_sum(peft_model, batch)
                loss = total / count
        loss.backward()
        row["seconds"] = _synced_time(cuda) - start
        row["tokens_per_s"] = length / row["seconds"]
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB if cuda else float("nan")
        row["fits"] = True
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # pinned host memory runs out as a RuntimeError
        if "out of memory" not in str(exc).lower():
            raise
        row["fits"] = False
        row["error"] = str(exc).splitlines()[0][:160]
    finally:
        loss = None
        reset_base(peft_model.unload())
    row["estimate_gib"] = estimate_gib(model.config, name, length)
    return row


def _synced_time(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def probe_lengths(args, name: str, best_so_far: int):
    if args.lengths:
        yield from (int(n) for n in args.lengths.split(","))
        return
    first = dict(item.split("=") for item in args.first.split(",")) if args.first else {}
    length = int(first[name]) if name in first else max(args.start, best_so_far)
    while length <= args.limit:
        yield length
        length *= 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-7b", choices=sorted(SHAPES))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--start", type=int, default=4096)
    parser.add_argument("--limit", type=int, default=262144, help="longest length to probe")
    parser.add_argument("--lengths", default=None, help="probe exactly these lengths (comma list) instead")
    parser.add_argument("--first", default=None, metavar="CONFIG=LEN,...",
                        help="where a configuration's doubling starts (default: --start, or the longest "
                             "length an earlier configuration reached)")
    parser.add_argument("--budget-s", type=float, default=420, help="stop doubling when the next probe would end "
                                                                    "past this many seconds of the run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    t0 = time.perf_counter()
    info = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "model": args.model,
            "host_gib": _host_memory_gib()}
    print(json.dumps(info), flush=True)
    model = build_model(args.model, DEVICE)
    rows, longest = [], {}
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name}; choose from {', '.join(CONFIGS)}")
        longest[name] = 0
        for length in probe_lengths(args, name, max(longest.values())):
            row = train_once(model, name, length)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not row["fits"]:
                break
            longest[name] = length
            # Attention is quadratic: the doubled length costs about 4x this probe.
            if not args.lengths and time.perf_counter() - t0 + 4 * row["seconds"] > args.budget_s:
                row["note"] = "stopped doubling: time budget"
                print(f"{name}: next length would pass --budget-s {args.budget_s:.0f}", flush=True)
                break
    report = {"info": info, "rows": rows, "longest": longest}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(report))


def _host_memory_gib() -> float:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return float("nan")


def table(report: dict) -> str:
    info = report["info"]
    lines = [f"{info['model']} on {info['device']} (torch {info['torch']}, host {info['host_gib']:.0f} GiB); "
             f"one sequence, LoRA r={LORA_RANK}, forward + backward",
             "| config | tokens | fits | peak GiB (measured) | estimate GiB | est / measured | s | tokens/s |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        peak = r.get("peak_gib")
        ratio = f"{r['estimate_gib'] / peak:.2f}" if peak else "-"
        lines.append(f"| {r['config']} | {r['length']:,} | {'yes' if r['fits'] else 'OOM'} | "
                     f"{peak if peak is None else f'{peak:.1f}'} | {r['estimate_gib']:.1f} | {ratio} | "
                     f"{r.get('seconds', float('nan')):.1f} | {r.get('tokens_per_s', float('nan')):,.0f} |")
    base = report["longest"].get("baseline")
    summary = ", ".join(f"{k} {v:,}" + (f" ({v / base:.1f}x baseline)" if base and k != "baseline" else "")
                        for k, v in report["longest"].items())
    lines.append(f"longest trainable single sequence: {summary}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

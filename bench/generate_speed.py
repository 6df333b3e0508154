"""Generation speed of `tunelab eval`: our decoders vs `model.generate` (and transformers'
continuous batching), same prompts, same greedy settings, one call.

    # the issue's target: hotel test set (517 rows), embedded 135M model, one GPU; continuous
    # batching (slots) against static batches, optionally with a LoRA adapter folded in as eval does
    python bench/generate_speed.py --rows 517 --batch-size 128 --modes static,slots [--adapter DIR]
    python bench/generate_speed.py --rows 517 --batch-size 128 --modes static,slots,dynamic,hf,hf-cb
    # a Qwen2.5-7B-shaped model with random weights (bf16), generated tokens/s
    python bench/generate_speed.py --shape qwen2.5-7b --rows 64 --batch-size 32 --max-new-tokens 128 \
        --modes slots,static,hf
    # CPU (no graphs): which decoder `generate_batch` should default to there
    python bench/generate_speed.py --device cpu --rows 32 --batch-size 8 --modes dynamic,slots,static,hf

Modes: `slots` = continuous batching in the slots of a static KV cache (`batch-size` slots, a
finished row's slot refilled at once; CUDA-graph decode step; each row's attention reads its own
columns, model/decode_kernel.py; tunelab's default on CUDA), `slots-masked` = `slots` with masked
SDPA over the longest row's window (before that kernel), `static`
= static batches of `batch-size` prompts with a static KV cache + CUDA-graph decode step, each batch
running until its longest row ends, `static-repeat-kv` = `static` with transformers' own SDPA in
prefill and decode (before model/attention.py: masked prefill, KV heads repeated per step on
transformers < 5.2x), `dynamic` = the shrinking dynamic-cache loop (default on CPU), `hf` =
`model.generate` on the same length-sorted, left-padded batches, `hf-cb` = `model.generate_batch`
(transformers' continuous batching, paged attention). Each mode runs once on a few rows untimed
(CUDA graph capture, kernel autotuning), then on all rows. Prints samples/s, generated tokens/s
and, against each earlier mode, the share of rows with identical tokens. `--sync-every K`: the slot
decoder's steps between two host reads of which rows finished (model/generate.py SLOT_SYNC_STEPS);
`--window-grid N`: its decode windows per power of two (WINDOW_STEPS_PER_OCTAVE). A mode named
twice runs twice in the process (`--modes slots,slots`: the second run's graphs are captured anew,
its kernels already loaded).
"""

from __future__ import annotations

import argparse
import time

import torch

from tunelab.data.templates import resolve_template
from tunelab.data.tokenize import stop_token_ids
from tunelab.evaluate.runner import encode_prompts
from tunelab.evaluate.tasks import get_task
from tunelab.model import generate
from tunelab.model.generate import GenerationOptions, generate_batch
from tunelab.model.loader import load_model, load_tokenizer

SHAPES = {
    # Qwen2.5-7B-Instruct's config.json (random weights: only the speed means anything).
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
}


def run_ours(model, tok, prompts, options, stops, batch_size, fast, slots=False):
    gens = generate_batch(model, tok, prompts, options, stops, batch_size=batch_size, progress=False, fast=fast,
                          slots=slots)
    return [g.token_ids for g in gens]


def run_masked(model, tok, prompts, options, stops, batch_size):
    """`slots` with attention over the masked window of the longest row (before model/decode_kernel.py)."""
    from tunelab.model import decode_kernel

    available = decode_kernel.kernel_available
    decode_kernel.kernel_available = lambda device: False
    try:
        return run_ours(model, tok, prompts, options, stops, batch_size, True, slots=True)
    finally:
        decode_kernel.kernel_available = available


def run_repeat_kv(model, tok, prompts, options, stops, batch_size):
    """`static` with transformers' own SDPA in the decode step (repeats the KV heads on < 5.2x)."""
    import contextlib

    original = generate.grouped_query_decode
    generate.grouped_query_decode = lambda model: contextlib.nullcontext(False)
    try:
        return run_ours(model, tok, prompts, options, stops, batch_size, True)
    finally:
        generate.grouped_query_decode = original


def run_hf(model, tok, prompts, options, stops, batch_size):
    """`model.generate` on the same length-sorted, left-padded batches."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = [prompts[i] for i in chunk]
        width = max(map(len, batch))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=options.max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=stops or None)
        for index, row in zip(chunk, gen[:, width:].tolist()):
            out[index] = cut(row, stops)
    return out


def run_hf_cb(model, tok, prompts, options, stops, batch_size):
    """transformers' continuous batching (`generate_batch`, paged attention)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=options.max_new_tokens, do_sample=False, eos_token_id=stops or None,
                              pad_token_id=tok.pad_token_id, max_batch_tokens=batch_size * 256)
    results = model.generate_batch(inputs=[list(p) for p in prompts], generation_config=config, progress_bar=False)
    ordered = sorted(results.values(), key=lambda r: int(str(r.request_id).rsplit("_", 1)[-1]))
    return [cut(list(r.generated_tokens), stops) for r in ordered]


def cut(row, stops):
    """Up to and including the first stop token, as our decoders count."""
    return row[:next((i + 1 for i, t in enumerate(row) if t in stops), len(row))]


def strip_stop(rows, stops):
    return [r[:-1] if r and r[-1] in stops else r for r in rows]


def profile(run) -> None:
    """Where one batch's time goes (the longest prompts: the worst batch)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25))


def load(args):
    tok = load_tokenizer(args.model)
    if args.shape:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        with device:
            model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[args.shape], pad_token_id=tok.pad_token_id)).eval()
        torch.set_default_dtype(previous)
        return tok, model
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.adapter:  # folded into the weights, as `tunelab eval --adapter` decodes
        from tunelab.model.adapters import load_adapter

        model = load_adapter(model, args.adapter).merge_and_unload()
    return tok, model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model (with --shape: only its tokenizer)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a random-weight model of this shape")
    ap.add_argument("--adapter", help="a LoRA adapter folder, folded into --model's weights as `tunelab eval` does")
    ap.add_argument("--sync-every", type=int, help="slot decoder: decode steps between reads of finished rows")
    ap.add_argument("--window-grid", type=int, help="slot decoder: decode windows per power of two")
    ap.add_argument("--data", default="../shared/data/hotel/test.jsonl")
    ap.add_argument("--rows", type=int, default=517)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--modes", default="static,slots,dynamic,hf")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--profile", action="store_true",
                    help="also print a torch.profiler table of the first mode on one batch")
    args = ap.parse_args()

    tok, model = load(args)
    if args.sync_every:
        generate.SLOT_SYNC_STEPS = args.sync_every
    if args.window_grid:
        generate.WINDOW_STEPS_PER_OCTAVE = args.window_grid
    template = resolve_template("hotel", tok)
    samples = get_task("hotel").load(args.data, limit=args.rows)
    prompts, stops = encode_prompts(samples, tok, template), stop_token_ids(tok, template)
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    device = next(model.parameters()).device
    print(f"{type(model).__name__} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          f", {next(model.parameters()).dtype}); {len(prompts)} prompts, "
          f"{sum(map(len, prompts)) / len(prompts):.0f} tokens on average, max {max(map(len, prompts))}; "
          f"batch {args.batch_size} (slots: sync every {generate.SLOT_SYNC_STEPS if device.type == 'cuda' else 1} "
          f"steps), max_new_tokens {args.max_new_tokens}, greedy")
    runners = {
        "slots": lambda p: run_ours(model, tok, p, options, stops, args.batch_size, True, slots=True),
        "slots-masked": lambda p: run_masked(model, tok, p, options, stops, args.batch_size),
        "static": lambda p: run_ours(model, tok, p, options, stops, args.batch_size, True),
        "static-repeat-kv": lambda p: run_repeat_kv(model, tok, p, options, stops, args.batch_size),
        "dynamic": lambda p: run_ours(model, tok, p, options, stops, args.batch_size, False),
        "hf": lambda p: run_hf(model, tok, p, options, stops, args.batch_size),
        "hf-cb": lambda p: run_hf_cb(model, tok, p, options, stops, args.batch_size),
    }
    first, earlier = None, []
    for mode in args.modes.split(","):
        try:
            runners[mode](prompts[:8])  # warm-up: graph capture, autotuning, allocator
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            rows = runners[mode](prompts)
            if device.type == "cuda":
                torch.cuda.synchronize()
            took = time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - a mode that fails is reported, the others still run
            print(f"{mode:8s}: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        if args.profile and first is None:
            profile(lambda: runners[mode](prompts[-args.batch_size:]))
        tokens = sum(map(len, strip_stop(rows, stops)))
        first = first or mode
        same = ", ".join(f"{name} {100 * sum(a == b for a, b in zip(rows, theirs)) / len(rows):.1f}%"
                         for name, theirs in earlier)
        same = f"  identical rows: {same}" if same else ""
        earlier.append((mode, rows))
        print(f"{mode:8s}: {len(prompts) / took:8.2f} samples/s  {tokens / took:9.1f} generated tokens/s  "
              f"({took:.2f} s){same}")


if __name__ == "__main__":
    main()

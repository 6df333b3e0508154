"""Generation speed on the hotel test set: our decode loop vs `model.generate`, by batch size.

    python bench/generate_speed.py --rows 32 --batch-sizes 1,4,8,16 [--hf]

Prints samples/s and generated tokens/s. Greedy, the hotel template, stop at <|im_end|>.
"""

from __future__ import annotations

import argparse
import time

import torch

from tunelab.data.templates import resolve_template
from tunelab.data.tokenize import stop_token_ids
from tunelab.evaluate.runner import encode_prompts
from tunelab.evaluate.tasks import get_task
from tunelab.model.generate import GenerationOptions, generate_batch
from tunelab.model.loader import load_model, load_tokenizer


def hf_generate(model, tok, prompts, options, stops, batch_size):
    """The same job through `model.generate` (left padding, length-sorted batches)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    tokens = 0
    for start in range(0, len(order), batch_size):
        batch = [prompts[i] for i in order[start:start + batch_size]]
        width = max(map(len, batch))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=options.max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=stops)
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            tokens += cut
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default="../shared/data/hotel/test.jsonl")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--hf", action="store_true", help="also time model.generate")
    args = ap.parse_args()

    torch.set_num_threads(torch.get_num_threads())
    tok, model = load_tokenizer(args.model), load_model(args.model, device="cpu")
    template = resolve_template("hotel", tok)
    samples = get_task("hotel").load(args.data, limit=args.rows)
    prompts, stops = encode_prompts(samples, tok, template), stop_token_ids(tok, template)
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    print(f"{len(prompts)} prompts, {sum(map(len, prompts)) / len(prompts):.0f} tokens on average, "
          f"max {max(map(len, prompts))}; {torch.get_num_threads()} threads")
    for bs in map(int, args.batch_sizes.split(",")):
        started = time.perf_counter()
        gens = generate_batch(model, tok, prompts, options, stops, batch_size=bs, progress=False)
        took = time.perf_counter() - started
        tokens = sum(g.completion_tokens for g in gens)
        print(f"ours  batch {bs:3d}: {len(prompts) / took:6.2f} samples/s  {tokens / took:7.1f} tokens/s")
        if args.hf:
            started = time.perf_counter()
            tokens = hf_generate(model, tok, prompts, options, stops, bs)
            took = time.perf_counter() - started
            print(f"hf    batch {bs:3d}: {len(prompts) / took:6.2f} samples/s  {tokens / took:7.1f} tokens/s")


if __name__ == "__main__":
    main()

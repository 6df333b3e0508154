"""Our continuous-batching scheduler (serve/batching.py) vs transformers' own
(`model.generate_batch`, paged attention), in one process, on the same prompts.

    python bench/serve_engines.py --requests 16 --max-tokens 16                 # CPU
    python bench/serve_engines.py --requests 256 --max-tokens 128 --device cuda [--adapter runs/x]

All requests are submitted at once to each; greedy. On CUDA without an adapter also `SlotBatcher`
(static KV slots, CUDA graphs: what `tunelab serve` runs there). Prints completion tokens/s of each and how
many answers agree with each other and with `model.generate` run alone on the first `--check` prompts.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import prompts  # noqa: E402  (the same questions as the load test)

from tunelab.data.types import Message  # noqa: E402
from tunelab.model.generate import GenerationOptions  # noqa: E402
from tunelab.serve.batching import Batcher, Job, SlotBatcher  # noqa: E402
from tunelab.serve.engine import load_engine  # noqa: E402


def ours(engine, ids: list[list[int]], max_tokens: int, adapter: str | None,
         slots: bool = False) -> tuple[list[list[int]], float]:
    """`Batcher` (dynamic caches: the CPU, adapters) or `SlotBatcher` (static KV slots, CUDA graphs: the
    GPU default for a base model, its graphs captured before the clock starts)."""
    if slots:
        batcher = SlotBatcher(engine, max_batch=min(len(ids), SLOTS), max_waiting=len(ids))
        run_jobs(engine, batcher, ids[:1], 2, adapter)  # waits for the captures at start
    else:
        batcher = Batcher(engine, max_batch=len(ids), max_waiting=len(ids))
    started = time.perf_counter()
    tokens = run_jobs(engine, batcher, ids, max_tokens, adapter)
    wall = time.perf_counter() - started
    batcher.close()
    return tokens, wall


SLOTS = 128  # SlotBatcher rows: each holds the whole context (8,192 tokens for SmolLM2)


def run_jobs(engine, batcher, ids, max_tokens: int, adapter: str | None) -> list[list[int]]:
    events = [queue.Queue() for _ in ids]
    jobs = [Job(prompt=p, options=GenerationOptions(max_new_tokens=max_tokens), emit=q.put, adapter=adapter,
                stop_ids=frozenset(engine.stop_ids)) for p, q in zip(ids, events)]
    batcher.submit(jobs)
    for q in events:
        while q.get()[0] == "token":
            pass
    return [j.tokens for j in jobs]


def theirs(engine, ids: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=engine.stop_ids,
                              pad_token_id=engine.tokenizer.pad_token_id)
    engine.model.generate_batch(ids[:2], generation_config=config)  # warm-up (allocates the paged cache)
    started = time.perf_counter()
    out = engine.model.generate_batch(ids, generation_config=config)
    wall = time.perf_counter() - started
    by_id = {key: result.generated_tokens for key, result in out.items()}
    ordered = [by_id[k] for k in sorted(by_id, key=lambda k: int(k.rsplit("_", 1)[-1]))]
    return [until_stop(toks, engine.stop_ids) for toks in ordered], wall


def until_stop(tokens: list[int], stop_ids) -> list[int]:
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return tokens[:cut]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", help="one LoRA adapter folder, used by both")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--check", type=int, default=4, help="prompts also generated alone with model.generate")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    adapters = {"x": Path(args.adapter)} if args.adapter else {}
    engine = load_engine(args.model, adapters, device=args.device, dtype=args.dtype)
    adapter = "x" if adapters else None
    ids = [engine.encode([Message("user", q)]) for q in prompts(args.requests)]
    rows = {}
    with torch.inference_mode():
        # first: generate_batch may switch the model's attention implementation for good
        reference = []
        for p in ids[:args.check]:
            out = engine.model.generate(input_ids=torch.tensor([p], device=engine.model.device),
                                        max_new_tokens=args.max_tokens, do_sample=False,
                                        eos_token_id=engine.stop_ids, pad_token_id=engine.tokenizer.pad_token_id)
            reference.append(until_stop(out[0, len(p):].tolist(), engine.stop_ids))
        ours_tokens, ours_wall = ours(engine, ids, args.max_tokens, adapter)
        rows["tunelab Batcher"] = (ours_tokens, ours_wall)
        if engine.model.device.type == "cuda" and adapter is None:
            rows[f"tunelab SlotBatcher ({SLOTS} slots)"] = ours(engine, ids, args.max_tokens, None, slots=True)
    try:  # outside inference mode: its generation thread updates tensors it made (an error inside on a GPU)
        rows["transformers generate_batch"] = theirs(engine, ids, args.max_tokens)
    except Exception as exc:  # noqa: BLE001 - report what does not work, as a result
        print(json.dumps({"engine": "transformers generate_batch", "error": f"{type(exc).__name__}: {exc}"[:300]}))
    for name, (tokens, wall) in rows.items():
        print(json.dumps({"engine": name, "requests": len(ids), "completion_tokens": sum(map(len, tokens)),
                          "wall_s": round(wall, 2), "tokens_per_s": round(sum(map(len, tokens)) / wall, 1),
                          "equal_to_generate_alone": f"{sum(a == b for a, b in zip(tokens, reference))}/{len(reference)}",
                          "equal_to_tunelab": f"{sum(a == b for a, b in zip(tokens, ours_tokens))}/{len(ids)}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

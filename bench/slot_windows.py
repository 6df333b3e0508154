"""Key/value columns the slot decoder's steps read on a data set, per window grid (no GPU, no model).

The decode step of `generate_batch`'s continuous batching reads, for every row of its bucket, the
window of the longest busy row (rounded by `window_bucket`). This replays the slot schedule of
`model/generate._SlotRun` (prompts in length order, a slot refilled when at least 1/ADMIT_SHARE of
the slots are free, finished rows read every SLOT_SYNC_STEPS steps) with each prompt's answer as
long as its reference (plus the stop token), and counts rows x window per step, the graphs a run
captures, and what a decode reading only each row's own columns would read.

    python bench/slot_windows.py --data ../shared/data/hotel/test.jsonl --slots 256
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunelab.data.templates import resolve_template  # noqa: E402
from tunelab.evaluate.runner import encode_prompts  # noqa: E402
from tunelab.evaluate.tasks import get_task  # noqa: E402
from tunelab.model import generate  # noqa: E402
from tunelab.model.loader import load_tokenizer  # noqa: E402


def schedule(prompts: list[int], answers: list[int], slots: int, window, max_new: int) -> tuple[collections.Counter, int]:
    """(steps per (rows, window) bucket, columns a per-row decode would read)."""
    sync, share = generate.SLOT_SYNC_STEPS, generate.ADMIT_SHARE
    length = max(prompts) + max_new + sync
    lengths, left = [0] * slots, [0] * slots
    waiting, buckets, own = collections.deque(range(len(prompts))), collections.Counter(), 0
    while True:
        for s in range(slots):
            if lengths[s] and left[s] <= 0:
                lengths[s] = 0
        free = [s for s in range(slots) if not lengths[s]]
        if waiting and len(free) >= min(len(waiting), max(1, slots // share)):
            for s in free[:len(waiting)]:
                i = waiting.popleft()
                lengths[s], left[s] = prompts[i], answers[i] - 1  # the prefill chose the first token
        busy = [s for s in range(slots) if lengths[s]]
        if not busy:
            return buckets, own
        for _ in range(sync):
            busy = [s for s in range(slots) if lengths[s]]
            rows = min(generate._bucket(busy[-1] + 1), slots)
            buckets[(rows, min(window(max(lengths) + 1), length))] += 1
            own += sum(lengths[s] + 1 for s in busy)
            for s in busy:
                lengths[s] += 1
                left[s] -= 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/hotel/test.jsonl")
    ap.add_argument("--task", default="hotel")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer and template count tokens")
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    samples = get_task(args.task).load(args.data)
    encoded = encode_prompts(samples, tok, resolve_template(args.task, tok))
    answers = [min(args.max_new_tokens, len(tok(s.reference)["input_ids"]) + 1) for s in samples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    prompts, answers = [len(encoded[i]) for i in order], [answers[i] for i in order]
    print(f"{len(prompts)} prompts, {args.slots} slots, {args.max_new_tokens} new tokens at most")
    for per_octave in (1, 2, 4, 8):
        generate.WINDOW_STEPS_PER_OCTAVE = per_octave
        buckets, own = schedule(prompts, answers, args.slots, generate.window_bucket, args.max_new_tokens)
        read = sum(rows * window * steps for (rows, window), steps in buckets.items())
        print(f"window grid {per_octave} a power of two: {len(buckets):3d} graphs, {sum(buckets.values())} steps, "
              f"{read:.3g} key/value columns read")
    buckets, own = schedule(prompts, answers, args.slots, lambda n: n, args.max_new_tokens)
    print(f"window = the longest busy row exactly: {sum(r * w * n for (r, w), n in buckets.items()):.3g}; "
          f"each row its own columns: {own:.3g}")


if __name__ == "__main__":
    main()

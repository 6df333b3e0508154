"""A trained reward model (stage rm) at evaluation: its pairwise accuracy on held-out pairs, and
best-of-n reranking (`tunelab eval --reward-model RUN --rerank N`: sample N answers per prompt,
keep the one the reward model scores highest, score the task as usual)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from tunelab.errors import TunelabError
from tunelab.evaluate.runner import Generated, encode_prompts, make_row
from tunelab.evaluate.tasks.base import EvalSample


def pairwise_accuracy(rm, path: str, fmt: str = "auto", limit: int | None = None, template: str | None = None
                      ) -> dict:
    """Share of pairs whose chosen answer the reward model scores above the rejected one (x100),
    and the mean margin. Pairs are rendered with the reward model's trained template."""
    from tunelab.data.preference_tokenize import encode_preferences
    from tunelab.data.readers import load_preferences
    from tunelab.data.templates import choose_template, template_lock
    from tunelab.data.types import PreferencePair

    pairs = [p for p in load_preferences([path], fmt, max_samples=limit) if isinstance(p, PreferencePair)]
    if not pairs:
        raise TunelabError("no chosen/rejected pair to score", where=path,
                           fix="give preference pairs (prompt / chosen / rejected) with --data")
    src = choose_template(template, rm.tokenizer, template_lock(rm.tokenizer))
    rows, _ = encode_preferences(pairs, rm.tokenizer, src, cutoff_len=1 << 20)
    chosen = rm.score([r.prompt + r.chosen for r in rows])
    rejected = rm.score([r.prompt + r.rejected for r in rows])
    wins = sum(c > r for c, r in zip(chosen, rejected))
    return {"pairs": len(rows), "pairwise_accuracy": 100.0 * wins / len(rows),
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(rows)}


def rerank_predict(model, tokenizer, samples: Sequence[EvalSample], template_src: str, options, n: int, rm, *,
                   task: str, batch_size: int | None = None, progress: bool = True,
                   desc: str = "generating") -> Generated:
    """Prediction rows whose answer is the best of `n` samples by the reward model's score
    (each row keeps every candidate's score as `rerank_scores`)."""
    from tunelab.data.tokenize import stop_token_ids
    from tunelab.model.generate import auto_batch_size, generate_batch

    prompts = encode_prompts(samples, tokenizer, template_src)
    stops = stop_token_ids(tokenizer, template_src)
    started = time.perf_counter()
    many = [p for p in prompts for _ in range(n)]
    batch_size = batch_size or auto_batch_size(model, many, options.max_new_tokens)
    generations = generate_batch(model, tokenizer, many, options, stops, batch_size=batch_size,
                                 progress=progress, desc=desc)
    scores = rm.score([p + g.token_ids + stops[:1] for p, g in zip(many, generations)], batch_size=batch_size)
    seconds = time.perf_counter() - started
    rows = []
    for i, (sample, prompt) in enumerate(zip(samples, prompts)):
        group = scores[i * n:(i + 1) * n]
        best = i * n + max(range(n), key=group.__getitem__)
        gen = generations[best]
        row = make_row(i, task, sample, tokenizer.decode(prompt, skip_special_tokens=False), gen.text,
                       gen.finish_reason, gen.prompt_tokens, gen.completion_tokens)
        rows.append(row | {"rerank_scores": group})
    return Generated(rows, seconds, sum(g.completion_tokens for g in generations),
                     {"batch_size": batch_size, "samples": len(rows), "rerank": n})

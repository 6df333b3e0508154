"""Batched and streaming text generation with a KV cache.

One decode loop serves both `tunelab eval` (many prompts, batched) and `tunelab chat` /
`tunelab serve` (one prompt, streamed). We run our own loop rather than `model.generate`
because it lets a batch *shrink*: a row that hit its stop token leaves the batch (and
the KV cache) at once, so short answers stop paying for the longest one, and the stream
stops the moment the consumer does (a plain generator: nothing runs in the background).
Sampling uses transformers' own logits processors so its semantics match `generate`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tunelab.data.collate import pad_id_for
from tunelab.errors import TunelabError


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (deterministic): the default for evaluation
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    repetition_penalty: float = 1.0
    seed: int | None = None  # sampling only; None = torch's global RNG
    # Constrained decoding (model/constrain.py): once a completion starts with `json_after`
    # (the hotel "search\n"; "" = from the start), the rest must be one JSON object, with
    # keys from `json_keys` when given. None = off.
    json_after: str | None = None
    json_keys: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise TunelabError(f"max_new_tokens must be > 0, got {self.max_new_tokens}",
                               where="generation options", fix="use e.g. --max-new-tokens 256")
        if self.temperature < 0:
            raise TunelabError(f"temperature must be >= 0, got {self.temperature}",
                               where="generation options", fix="use 0 for greedy or e.g. 0.7 to sample")
        if not 0 < self.top_p <= 1:
            raise TunelabError(f"top_p must be in (0, 1], got {self.top_p}",
                               where="generation options", fix="use e.g. --top-p 0.9, or 1 to disable")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise TunelabError("top_k must be >= 0 and repetition_penalty > 0",
                               where="generation options", fix="use --top-k 0 and --repetition-penalty 1.0 to disable")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    text: str  # decoded completion, stop token (and anything after it) excluded
    token_ids: list[int]  # completion tokens, stop token excluded
    prompt_tokens: int
    finish_reason: str  # "stop" (hit a stop token) | "length" (hit max_new_tokens)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


# --- the decode loop -------------------------------------------------------------------

def _logits_processors(options: GenerationOptions) -> LogitsProcessorList:
    procs = LogitsProcessorList()
    if options.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
    if not options.greedy:
        procs.append(TemperatureLogitsWarper(options.temperature))
        if options.top_k > 0:
            procs.append(TopKLogitsWarper(options.top_k))
        if options.top_p < 1.0:
            procs.append(TopPLogitsWarper(options.top_p))
    return procs


def cache_keyword(model) -> str:
    """The forward keyword that takes the KV cache: `cache` from transformers 5.2x on,
    `past_key_values` before (the old name warns and goes in 5.40)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def _decode_steps(model, prompts: Sequence[Sequence[int]], options: GenerationOptions,
                  stop_ids: Sequence[int], pad_id: int, tokenizer=None) -> Iterator[dict[int, int]]:
    """Yield, per decoding step, {row: next token} for the rows still running.

    A row leaves after yielding a stop token or its `max_new_tokens`-th token; its KV
    cache rows are dropped with it. Left padding + position ids from the attention mask
    make every row see exactly what it would see alone (batched greedy == single greedy).
    """
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = torch.arange(len(prompts), device=device)  # original row of each live batch slot
    history = ids  # for the repetition penalty (pads are harmless: they rarely repeat)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    processors = _logits_processors(options)
    if options.json_after is not None:
        from tunelab.model.constrain import JsonAfterMarker

        processors.append(JsonAfterMarker(tokenizer, options.json_after, stop_ids, ids.shape[1], options.json_keys))
    generator = None
    if not options.greedy and options.seed is not None:
        generator = torch.Generator(device=device).manual_seed(options.seed)

    cache = DynamicCache(config=model.config)
    cache_key = cache_keyword(model)
    step_input, step_positions = ids, positions
    for step in range(options.max_new_tokens):
        # logits_to_keep=1: the prefill needs only the last position's vocab logits.
        out = model(input_ids=step_input, attention_mask=mask, position_ids=step_positions,
                    use_cache=True, logits_to_keep=1, **{cache_key: cache})  # the cache fills in place
        logits = out.logits[:, -1, :].float()
        logits = processors(history, logits)
        if options.greedy:
            next_tokens = logits.argmax(-1)
        else:
            probs = torch.softmax(logits, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        yield dict(zip(rows.tolist(), next_tokens.tolist()))

        if step + 1 == options.max_new_tokens:
            return
        live = ~torch.isin(next_tokens, stops) if len(stops) else torch.ones_like(next_tokens, dtype=torch.bool)
        if not live.all():
            if not live.any():
                return
            keep = live.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, next_tokens, mask = rows[keep], next_tokens[keep], mask[keep]
            history, step_positions = history[keep], step_positions[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        step_positions = step_positions[:, -1:] + 1
        step_input = next_tokens.unsqueeze(1)
        history = torch.cat([history, step_input], dim=1)


def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise TunelabError(f"prompt {i} is empty", where="generation",
                               fix="every prompt needs at least one token (the template's generation prompt)")


def _finish(tokenizer, prompt: Sequence[int], tokens: list[int], stop_ids: set[int]) -> Generation:
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    kept = tokens if cut is None else tokens[:cut]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    return Generation(text=text, token_ids=kept, prompt_tokens=len(prompt),
                      finish_reason="length" if cut is None else "stop")


# --- public API ------------------------------------------------------------------------

def generate_batch(model, tokenizer, prompts: Sequence[Sequence[int]], options: GenerationOptions | None = None,
                   stop_ids: Sequence[int] = (), batch_size: int = 8, progress: bool = True,
                   desc: str = "generating") -> list[Generation]:
    """Generate a completion for every prompt (token ids, template already applied).

    Prompts are batched by length (less padding), results come back in input order.
    Each completion ends at its first stop token (e.g. the template's end-of-turn).
    """
    from tqdm.auto import tqdm

    options = options or GenerationOptions()
    _check_prompts(prompts)
    if batch_size <= 0:
        raise TunelabError(f"batch_size must be > 0, got {batch_size}", where="generation",
                           fix="use e.g. --batch-size 8")
    was_training = model.training
    model.eval()
    pad_id, stop_set = pad_id_for(tokenizer), set(stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), unit="sample", desc=desc, disable=not progress, dynamic_ncols=True)
    started, new_tokens = time.perf_counter(), 0
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = [prompts[i] for i in chunk]
            tokens: list[list[int]] = [[] for _ in chunk]
            for step in _decode_steps(model, batch, options, stop_ids, pad_id, tokenizer):
                for row, token in step.items():
                    tokens[row].append(token)
            for row, index in enumerate(chunk):
                results[index] = _finish(tokenizer, batch[row], tokens[row], stop_set)
                new_tokens += results[index].completion_tokens
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - started, 1e-9):.0f}")
    finally:
        bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


def stream_generate(model, tokenizer, prompt_ids: Sequence[int], options: GenerationOptions | None = None,
                    stop_ids: Sequence[int] = ()) -> Iterator[str]:
    """Yield the completion as text deltas; stops at a stop token or when the consumer stops.

    Incremental detokenisation as in TGI/vLLM: decode a short window of recent tokens and
    yield only what is new, holding back a trailing U+FFFD so a character split across
    tokens (Chinese, emoji) is emitted once whole, never as mojibake. Closing the
    generator (`break` in the consumer) ends decoding at once: nothing runs in background.
    """
    options = options or GenerationOptions()
    _check_prompts([prompt_ids])
    stop_set, tokens = set(stop_ids), []
    prefix_offset = read_offset = 0
    was_training = model.training
    model.eval()
    try:
        for step in _decode_steps(model, [prompt_ids], options, stop_ids, pad_id_for(tokenizer), tokenizer):
            token = step[0]
            if token in stop_set:
                return
            tokens.append(token)
            prefix_text = tokenizer.decode(tokens[prefix_offset:read_offset], skip_special_tokens=True)
            new_text = tokenizer.decode(tokens[prefix_offset:], skip_special_tokens=True)
            if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
                yield new_text[len(prefix_text):]
                prefix_offset, read_offset = read_offset, len(tokens)
    finally:
        model.train(was_training)

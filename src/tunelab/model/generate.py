"""Batched and streaming text generation with a KV cache.

One decode loop serves both `tunelab eval` (many prompts, batched) and `tunelab chat` /
`tunelab serve` (one prompt, streamed). We run our own loop rather than `model.generate`
because it lets a batch *shrink*: a row that hit its stop token leaves the batch (and
the KV cache) at once, so short answers stop paying for the longest one, and the stream
stops the moment the consumer does (a plain generator: nothing runs in the background).
Sampling uses transformers' own logits processors so its semantics match `generate`.

On CUDA, `generate_batch` decodes with a static KV cache and replays the decode step as a
CUDA graph: a small model's decode is bound by kernel launches, which a graph replay removes.
By default it batches continuously (`_slot_decode`): `batch_size` slots of one static cache,
each prompt (in length order) prefilled into a free slot, and a row that stops frees its slot
for the next prompt at once, so short answers never wait for a batch's longest one. The CPU
batches continuously too (no graphs: measured faster than the dynamic loop there). Static
batches (`_static_decode`: each batch decoded until its last row stops) remain on CUDA for what
a slot cannot hold (constrained decoding, sliding-window caches); the dynamic loop for those
on the CPU, for streaming and for any model the graph cannot capture (with a warning).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache, StaticLayer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tunelab.data.collate import pad_id_for
from tunelab.errors import TunelabError
from tunelab.model.attention import (
    DECODE_ATTENTION,
    PrefillLayout,
    decode_lengths,
    grouped_query_decode,
    prefill_layout,
)
from tunelab.model.decode_kernel import uses_kernel

log = logging.getLogger(__name__)


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


def _seeded_generator(options: GenerationOptions, device) -> torch.Generator | None:
    """The RNG of a sampled run with a seed (None: greedy, or torch's global RNG)."""
    if options.greedy or options.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(options.seed)


def _next_tokens(logits: torch.Tensor, history: torch.Tensor | None, processors: LogitsProcessorList,
                 greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: the processors (repetition penalty, temperature, top-k/p) over `history`
    (each row's tokens so far), then argmax or a draw."""
    if processors:
        logits = processors(history, logits)
    if greedy:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


def cache_keyword(model) -> str:
    """The forward keyword that takes the KV cache: `cache` from transformers 5.2x on,
    `past_key_values` before (the old name warns and goes in 5.40)."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _forward_parameters(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of the rows padded on the left to the longest, so every row ends
    at the right edge: the next token of each row is at the last position."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def pad_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (pads get 0 too)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def varlen_prefill(mask: torch.Tensor, dtype: torch.dtype):
    """(attention mask, context) of a prefill through the varlen kernel (`grouped_query_decode`
    active): each prompt's real tokens attend among themselves (PrefillLayout), and the mask passed
    is a placeholder that keeps transformers from building the [batch, 1, width, slots] one."""
    placeholder = torch.zeros((mask.shape[0], 1, 1, 1), dtype=dtype, device=mask.device)
    return placeholder, prefill_layout(PrefillLayout.from_mask(mask))


@torch.inference_mode()
def _decode_steps(model, prompts: Sequence[Sequence[int]], options: GenerationOptions,
                  stop_ids: Sequence[int], pad_id: int, tokenizer=None) -> Iterator[dict[int, int]]:
    """Yield, per decoding step, {row: next token} for the rows still running.

    A row leaves after yielding a stop token or its `max_new_tokens`-th token; its KV
    cache rows are dropped with it. Left padding + position ids from the attention mask
    make every row see exactly what it would see alone (batched greedy == single greedy).
    """
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    positions = pad_positions(mask)
    rows = torch.arange(len(prompts), device=device)  # original row of each live batch slot
    history = ids  # for the repetition penalty (pads are harmless: they rarely repeat)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    processors = _logits_processors(options)
    if options.json_after is not None:
        from tunelab.model.constrain import JsonAfterMarker

        processors.append(JsonAfterMarker(tokenizer, options.json_after, stop_ids, ids.shape[1], options.json_keys))
    generator = _seeded_generator(options, device)

    cache = DynamicCache(config=model.config)
    cache_key = cache_keyword(model)
    step_input, step_positions = ids, positions
    for step in range(options.max_new_tokens):
        # logits_to_keep=1: the prefill needs only the last position's vocab logits.
        out = model(input_ids=step_input, attention_mask=mask, position_ids=step_positions,
                    use_cache=True, logits_to_keep=1, **{cache_key: cache})  # the cache fills in place
        next_tokens = _next_tokens(out.logits[:, -1, :].float(), history, processors, options.greedy, generator)
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


# --- static KV cache + CUDA graph decode (CUDA) -----------------------------------------

def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one transformers takes as is (4-D): 0 or dtype's min."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def capture_graph(step, device, pool=None, after_warm_up=None):
    """(CUDA graph of `step()`, its output): warmed up on a side stream (allocator, lazy
    initialisation), then captured. thread_local: other threads of a server may use CUDA meanwhile."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream(device).wait_stream(stream)
    if after_warm_up is not None:
        after_warm_up()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = step()
    return graph, output


class _StaticDecoder:
    """One batch decoded with a preallocated KV cache of `prompt width + max_new_tokens`
    slots and fixed-shape step inputs, so the decode step can be captured once as a CUDA
    graph and replayed per token. Masks are built here as 4-D additive masks (transformers
    uses a prepared 4-D mask as is): no data-dependent checks inside the captured step.

    transformers < 5.2x writes the cache at `cache_position`; later versions keep the
    write position inside the cache. Both are handled by passing `cache_position` only
    where `forward` takes it (it then lives in a static buffer updated in place)."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
                 varlen_prefill: bool = False):
        self.model, self.device = model, next(model.parameters()).device
        self.varlen_prefill = varlen_prefill  # model/attention.decode_attention is active
        self.dtype = next(model.parameters()).dtype
        ids, mask = left_pad(prompts, pad_id, self.device)
        self.batch, self.width = ids.shape
        self.length = self.width + max_new_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=self.length)
        self.cache_key = cache_keyword(model)
        self.takes_position = "cache_position" in _forward_parameters(model)
        self.keys_valid = torch.zeros((self.batch, self.length), dtype=torch.bool, device=self.device)
        self.keys_valid[:, :self.width] = mask.bool()
        self.prompt_ids, self.prompt_mask = ids, mask
        self.pad_id = pad_id
        self.graph = None
        # Static inputs of the decode step (updated in place between replays).
        self.step_ids = torch.full((self.batch, 1), pad_id, dtype=torch.long, device=self.device)
        self.step_positions = torch.zeros((self.batch, 1), dtype=torch.long, device=self.device)
        self.step_cache_position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.step_mask = torch.zeros((self.batch, 1, 1, self.length), dtype=self.dtype, device=self.device)
        self.step_logits = None

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        return additive_mask(allowed, self.dtype)

    def _forward(self, ids, positions, mask, cache_position):
        extra = {"cache_position": cache_position} if self.takes_position else {}
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1, **{self.cache_key: self.cache}, **extra).logits[:, -1, :]

    def prefill(self) -> torch.Tensor:
        positions = pad_positions(self.prompt_mask)
        self.step_positions.copy_(positions[:, -1:])
        cache_position = torch.arange(self.width, device=self.device)
        if self.varlen_prefill:
            placeholder, layout = varlen_prefill(self.prompt_mask, self.dtype)
            with layout:
                return self._forward(self.prompt_ids, positions, placeholder, cache_position).float()
        causal = torch.ones((self.width, self.length), dtype=torch.bool, device=self.device).tril()
        allowed = causal[None, None] & self.keys_valid[:, None, None, :]
        return self._forward(self.prompt_ids, positions, self._additive(allowed), cache_position).float()

    def _fill_step(self, tokens: torch.Tensor, index: int) -> None:
        """Inputs of the step that writes cache slot `index` (the token fed sits there)."""
        self.step_ids.copy_(tokens.unsqueeze(1))
        self.step_positions.add_(1)
        self.step_cache_position.fill_(index)
        self.keys_valid[:, index] = True
        self.step_mask.copy_(self._additive(self.keys_valid[:, None, None, :]))

    def _run_step(self):
        return self._forward(self.step_ids, self.step_positions, self.step_mask, self.step_cache_position)

    def step(self, tokens: torch.Tensor, index: int, use_graph: bool) -> torch.Tensor:
        self._fill_step(tokens, index)
        if not use_graph:
            return self._run_step().float()
        if self.graph is None:
            self._capture()  # records the step without running it
        self.graph.replay()
        return self.step_logits.float()

    def _capture(self) -> None:
        # The warm-up writes the same slot the captured step writes, so nothing is written twice wrongly.
        position = self.cache_write_position()
        self.graph, self.step_logits = capture_graph(self._run_step, self.device, after_warm_up=lambda: self.rewind(position))

    def cache_write_position(self):
        layer = self.cache.layers[0] if hasattr(self.cache, "layers") else None
        length = getattr(layer, "cumulative_length", None)
        return None if length is None or not torch.is_tensor(length) else length.clone()

    def rewind(self, position) -> None:
        """Undo the warm-up step's advance of the cache's own write position (newer versions)."""
        if position is None:
            return
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(position)


@torch.inference_mode()
def _static_decode(model, prompts: Sequence[Sequence[int]], options: GenerationOptions, stop_ids: Sequence[int],
                   pad_id: int, use_graph: bool) -> list[list[int]]:
    """Tokens of each row (up to and including its first stop token) with a static cache."""
    with grouped_query_decode(model) as active:
        return _static_decode_rows(model, prompts, options, stop_ids, pad_id, use_graph, active)


def _static_decode_rows(model, prompts, options, stop_ids, pad_id, use_graph, varlen_prefill) -> list[list[int]]:
    decoder = _StaticDecoder(model, prompts, options.max_new_tokens, pad_id, varlen_prefill)
    processors = _logits_processors(options)
    generator = _seeded_generator(options, decoder.device)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=decoder.device)
    out = torch.full((decoder.batch, options.max_new_tokens), pad_id, dtype=torch.long, device=decoder.device)
    done = torch.zeros(decoder.batch, dtype=torch.bool, device=decoder.device)
    history = decoder.prompt_ids
    logits = decoder.prefill()
    steps = options.max_new_tokens
    for step in range(options.max_new_tokens):
        tokens = _next_tokens(logits, history, processors, options.greedy, generator)
        tokens = tokens.masked_fill(done, pad_id)
        out[:, step] = tokens
        if len(stops):
            done |= torch.isin(tokens, stops)
        if processors:
            history = torch.cat([history, tokens.unsqueeze(1)], dim=1)
        # One host sync every 8 steps to see whether every row has stopped.
        if step + 1 == steps or ((step + 1) % 8 == 0 and bool(done.all())):
            steps = step + 1
            break
        logits = decoder.step(tokens, decoder.width + step, use_graph)
    rows = out[:, :steps].tolist()
    stop_set = set(stop_ids)
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))] for row in rows]


# --- slots of a static KV cache: continuous batching's decoder (`tunelab serve`) ----------

class _SlotLayer(StaticLayer):
    """One layer of a `SlotDecoder`'s cache. Unlike `StaticLayer` (one write position for the
    whole batch), each row is a slot of its own request and writes its new key/value at its own
    column (`decoder.columns`, shared by every layer); attention reads the first `decoder.rows`
    slots and `decoder.window` columns (views: nothing is copied)."""

    def __init__(self, decoder: SlotDecoder, keys: torch.Tensor, values: torch.Tensor):
        super().__init__(max_cache_len=keys.shape[2])
        # A weak reference: the decoder holds its layers, and a cycle would keep the whole KV cache
        # (gigabytes) on the GPU after a decode until Python's cycle collector happens to run.
        self.decoder, self.keys, self.values = weakref.proxy(decoder), keys, values
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        d = self.decoder
        rows, columns = d.row_index[:d.rows], d.columns[:d.rows]
        self.keys[rows, :, columns] = key_states[:, :, 0]
        self.values[rows, :, columns] = value_states[:, :, 0]
        return self.keys[:d.rows, :, :d.window], self.values[:d.rows, :, :d.window]

    def get_seq_length(self) -> int:
        return 0  # positions are always passed; there is no batch-wide length


class SlotDecoder:
    """The decode state of continuous batching: `slots` rows of a static KV cache of `length`
    columns. A request owns one slot from its prefill to its last token: its prompt's keys and
    values are copied into the slot's first columns (`insert`), each decode step writes one
    column per slot (`step`), and a finished request frees its slot for the next one (`free`).

    The decode step always has the same shapes for a given (rows, window) bucket (rows: slots up
    to the highest one in use, rounded up to a power of two; window: columns up to the longest
    request, rounded up by `window_bucket`), so on CUDA each bucket is captured once as a CUDA
    graph and replayed per token, as `_StaticDecoder` does for `tunelab eval`: a small model's
    decode is launch-bound. Free
    slots inside the bucket decode a padding token that nobody reads. On CUDA in half precision
    (`length_aware`) attention reads each row's own columns only (`model/decode_kernel.py`): the
    window is then the whole cache and only the rows are bucketed. On the CPU the step runs
    eagerly on exactly the rows and columns in use.
    """

    def __init__(self, model, slots: int, length: int, pad_id: int, use_graph: bool):
        self.model, self.device = model, next(model.parameters()).device
        self.dtype, self.slots, self.length, self.use_graph = next(model.parameters()).dtype, slots, length, use_graph
        layers, kv_heads, head_dim = kv_shape(model)
        shape = (slots, kv_heads, length, head_dim)
        self.cache = Cache(layers=[
            _SlotLayer(self, torch.zeros(shape, dtype=self.dtype, device=self.device),
                       torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(layers)])
        self.cache_key = cache_keyword(model)
        self.takes_position = "cache_position" in _forward_parameters(model)
        self.row_index = torch.arange(slots, device=self.device)
        self.columns = torch.zeros(slots, dtype=torch.long, device=self.device)  # = the position of each slot's next input
        self.occupied = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.valid = torch.zeros((slots, length), dtype=torch.bool, device=self.device)  # columns a slot attends to
        self.valid[:, 0] = True  # a free slot attends to its own scratch column: no row is all masked
        self.yes = torch.ones(slots, dtype=torch.bool, device=self.device)  # a device tensor: no host value in a graph
        self.pad_id = pad_id
        self.step_ids = torch.full((slots, 1), pad_id, dtype=torch.long, device=self.device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.lengths = [0] * slots  # host copy of `columns` for occupied slots (no device sync to pick a bucket)
        self.rows, self.window = slots, length
        self.bucketed = use_graph  # rows and window rounded up to a captured bucket (tests set it alone on the CPU)
        # Under `grouped_query_decode` each row reads only its own columns (model/decode_kernel.py): the window
        # is then the whole cache, one graph per rows bucket (tests set it on the CPU, where SDPA computes it).
        self.length_aware = use_graph and uses_kernel(self.device, self.dtype)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.steps, self.capture_seconds = 0, 0.0  # for the log: decode steps run, time spent capturing

    @staticmethod
    def memory_per_slot(model, length: int) -> int:
        return kv_bytes_per_token(model) * length + length  # keys/values + the valid mask

    def free_slots(self) -> list[int]:
        return [s for s in range(self.slots) if not self.lengths[s]]

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], slots: Sequence[int]) -> torch.Tensor:
        """Run `prompts` through the model in one left-padded forward and copy prompt i's keys and
        values into `slots[i]`; the logits of each prompt's last position, [len(prompts), vocab] fp32.
        Under `grouped_query_decode` the prompts' real tokens attend as one stream (no padded mask),
        as `_StaticDecoder.prefill` does."""
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        positions = pad_positions(mask)
        cache = DynamicCache(config=self.model.config)
        layout = contextlib.nullcontext()
        if getattr(self.model.config, "_attn_implementation", None) == DECODE_ATTENTION:
            mask, layout = varlen_prefill(mask, self.dtype)
        with layout:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                logits_to_keep=1, **{self.cache_key: cache}).logits[:, -1, :].float()
        self._insert(list(slots), cache, [len(p) for p in prompts])
        return logits

    def _insert(self, slots: list[int], cache, lengths: list[int]) -> None:
        """Row i of a left-padded prefill's cache (its prompt in the last `lengths[i]` columns) into
        the first columns of `slots[i]`, all rows at once (one gather per layer, not one copy per row)."""
        index = torch.tensor(slots, device=self.device)
        length = torch.tensor(lengths, device=self.device)
        keys = cache.layers[0].keys
        width = keys.shape[2]
        # Column j of a slot takes column width - length + j; past the prompt, the last column again
        # (masked by `valid`, overwritten as the slot decodes).
        source = ((width - length)[:, None] + torch.arange(width, device=self.device)).clamp(max=width - 1)
        source = source[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys[index, :, :width] = theirs.keys.gather(2, source)
            mine.values[index, :, :width] = theirs.values.gather(2, source)
        self.valid[index] = torch.arange(self.length, device=self.device) < length[:, None]
        self.columns[index], self.occupied[index] = length, 1
        for slot, n in zip(slots, lengths):
            self.lengths[slot] = n

    def free(self, slot: int) -> None:
        self.valid[slot] = False
        self.valid[slot, 0] = True
        self.columns[slot], self.occupied[slot] = 0, 0
        self.lengths[slot] = 0

    def step(self, tokens: dict[int, int]) -> torch.Tensor:
        """Feed each occupied slot its next token ({slot: token}); logits [rows, vocab] (row = slot)."""
        ids = torch.tensor(list(tokens.values()), dtype=torch.long)
        self.step_ids[torch.tensor(list(tokens))] = ids.to(self.device)[:, None]
        return self._advance()

    def step_all(self, tokens: torch.Tensor) -> torch.Tensor:
        """`step` with the next token of every slot in a device tensor [slots] (free slots' entries are
        fed but unread): no host round trip."""
        self.step_ids.copy_(tokens[:, None])
        return self._advance()

    def _advance(self) -> torch.Tensor:
        """One decode step of every occupied slot (the tokens are in `step_ids`)."""
        occupied = [s for s in range(self.slots) if self.lengths[s]]
        last, longest = occupied[-1] + 1, max(self.lengths) + 1
        if self.bucketed:
            window = self.length if self.reads_by_length() else min(window_bucket(longest), self.length)
            self.rows, self.window = min(_bucket(last), self.slots), window
        else:
            self.rows, self.window = last, longest
        logits = self._graph_step() if self.use_graph else self._step()
        self.columns.add_(self.occupied)
        self.steps += 1
        for slot in occupied:
            self.lengths[slot] += 1
        return logits.float()

    def capture_all(self) -> None:
        """Capture every (rows, window) bucket now, largest first (the shared pool is sized once),
        so that no request waits for a capture. Every slot is free: the steps run are harmless."""
        rows = sorted({min(_bucket(n), self.slots) for n in range(1, self.slots + 1)}, reverse=True)
        windows = sorted({min(window_bucket(n), self.length) for n in range(1, self.length + 1)}, reverse=True)
        if self.reads_by_length():
            windows = [self.length]
        started = time.perf_counter()
        for window in windows:
            for count in rows:
                self.rows, self.window = count, window
                self._graph_step()
                if not self.use_graph:
                    return  # a capture failed (logged): the step runs eagerly from now on
        log.info("captured %d decode steps as CUDA graphs in %.1f s", len(self.graphs), time.perf_counter() - started)

    def reads_by_length(self) -> bool:
        """Whether a step's attention reads each row's own columns only (`decode_lengths`)."""
        return self.length_aware and getattr(self.model.config, "_attn_implementation", None) == DECODE_ATTENTION

    def _step(self) -> torch.Tensor:
        rows = self.row_index[:self.rows]
        self.valid[rows, self.columns[:self.rows]] = self.yes[:self.rows]  # the token fed now sits at its column
        mask = additive_mask(self.valid[:self.rows, None, None, :self.window], self.dtype)
        extra = {"cache_position": self.cache_position} if self.takes_position else {}
        # A row attends to its columns up to the one written now (`valid` is always such a prefix).
        by_length = decode_lengths(self.columns[:self.rows] + 1) if self.reads_by_length() else contextlib.nullcontext()
        with by_length:
            return self.model(input_ids=self.step_ids[:self.rows], attention_mask=mask,
                              position_ids=self.columns[:self.rows, None], use_cache=True, logits_to_keep=1,
                              **{self.cache_key: self.cache}, **extra).logits[:, -1, :]

    def _graph_step(self) -> torch.Tensor:
        key = (self.rows, self.window)
        if key not in self.graphs:
            started = time.perf_counter()
            try:
                self.graphs[key] = self._capture()
                self.capture_seconds += time.perf_counter() - started
            except Exception as exc:  # noqa: BLE001 - the eager step still works
                log.warning("CUDA graph capture failed (%s: %s); serving without graphs",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self.use_graph, self.graphs = False, {}
                return self._step()  # the bucket's rows and columns: free rows are harmless
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def _capture(self):
        # The warm-up is the step itself: the replay that follows writes the same columns with the same values.
        self.pool = self.pool or torch.cuda.graph_pool_handle()  # buckets share memory: one runs at a time
        return capture_graph(self._step, self.device, pool=self.pool)


def _bucket(n: int) -> int:
    """The power of two >= n (the rows of a captured decode step)."""
    return 1 << (n - 1).bit_length()


# Window buckets per power of two. On the hotel test set (256 slots, SmolLM2-135M, one H100) a grid of 2
# read 14 % fewer key/value columns than powers of two only, for 8 captured graphs instead of 5, and
# decoded 121 samples/s against 110-119 (1), 113-124 (4) and 108 (8) (docs/benchmarks.md).
WINDOW_STEPS_PER_OCTAVE = 2
SMALLEST_WINDOW = 64


def window_bucket(n: int) -> int:
    """The captured window (KV columns a decode step reads) for a longest row of n columns: n rounded
    up to a grid of WINDOW_STEPS_PER_OCTAVE points per power of two, at least SMALLEST_WINDOW. A finer
    grid reads fewer unused columns and captures more graphs."""
    if n <= SMALLEST_WINDOW:
        return SMALLEST_WINDOW
    step = max(1, (1 << ((n - 1).bit_length() - 1)) // WINDOW_STEPS_PER_OCTAVE)
    return -(-n // step) * step


# --- continuous batching for `tunelab eval`: a finished row's slot takes the next prompt ----

SLOT_SYNC_STEPS = 4  # decode steps between two host reads of which rows finished (on CUDA; 1 on the CPU)
PREFILL_TOKENS = 16384  # padded prompt tokens in one prefill forward: bounds a prefill's memory
ADMIT_SHARE = 8  # prompts wait until 1/8 of the slots are free: each prefill is a forward of its own


@torch.inference_mode()
def _slot_decode(model, prompts: Sequence[Sequence[int]], options: GenerationOptions, stop_ids: Sequence[int],
                 pad_id: int, slots: int, use_graph: bool, bucketed: bool | None = None,
                 sync_steps: int | None = None, finished=None) -> list[list[int]]:
    """Tokens of each prompt (up to and including its first stop token) by continuous batching in
    the `slots` rows of a `SlotDecoder`; `finished(1, tokens)` is called per prompt done (a progress bar).
    `sync_steps`: decode steps between two reads of which rows finished (default SLOT_SYNC_STEPS
    on CUDA, where a read waits for the GPU to drain; 1 on the CPU, where it costs nothing)."""
    if not prompts:
        return []
    if sync_steps is None:
        sync_steps = SLOT_SYNC_STEPS if next(model.parameters()).device.type == "cuda" else 1
    with grouped_query_decode(model):
        return _SlotRun(model, prompts, options, stop_ids, pad_id, slots, use_graph, bucketed, sync_steps).run(finished)


class _SlotRun:
    """The prompts (in the order given: `generate_batch` sorts them by length, so a prefill pads
    little) wait for a free slot; a slot's row decodes until its stop token or `max_new_tokens`,
    then the slot takes the next waiting prompt. Unlike static batches, no row waits for the
    longest answer of its batch.

    The decode loop keeps its state on the device so that a step needs no host round trip: per
    slot its next input token, whether it is done (a free slot counts as done) and its prompt;
    per prompt the tokens so far (`out`, `count`). Every `sync_steps` steps the host reads which
    rows are done, frees their slots and admits waiting prompts; a row that finished meanwhile
    decodes a few more tokens that nobody reads (they land past its `count`)."""

    def __init__(self, model, prompts, options: GenerationOptions, stop_ids, pad_id: int, slots: int,
                 use_graph: bool, bucketed: bool | None, sync_steps: int):
        self.prompts, self.options, self.sync_steps = prompts, options, sync_steps
        slots, width, n = min(slots, len(prompts)), max(map(len, prompts)), len(prompts)
        # `sync_steps` more columns: a finished row may write that many before its slot is freed.
        self.decoder = SlotDecoder(model, slots, width + options.max_new_tokens + sync_steps, pad_id, use_graph)
        if bucketed is not None:
            self.decoder.bucketed = bucketed
        device = self.decoder.device
        # Row n of `out`/`count` is the scratch of free slots; column max_new_tokens that of done rows.
        self.out = torch.full((n + 1, options.max_new_tokens + 1), pad_id, dtype=torch.long, device=device)
        self.count = torch.zeros(n + 1, dtype=torch.long, device=device)
        self.owner = torch.full((slots,), n, dtype=torch.long, device=device)
        self.done = torch.ones(slots, dtype=torch.bool, device=device)
        self.next_ids = torch.full((slots,), pad_id, dtype=torch.long, device=device)
        self.stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        self.processors = _logits_processors(options)
        self.generator = _seeded_generator(options, device)
        # The repetition penalty's view of each slot: its prompt and tokens, unused columns holding
        # the prompt's first token (already in the row, and a penalty counts a token once): no padding.
        self.history = self.prompt_length = None
        if options.repetition_penalty != 1.0:
            self.history = torch.zeros((slots, width + options.max_new_tokens + 1), dtype=torch.long, device=device)
            self.prompt_length = torch.zeros(slots, dtype=torch.long, device=device)
        self.slot_prompt: list[int | None] = [None] * slots  # host copy of `owner` for occupied slots
        self.waiting = collections.deque(range(n))

    def run(self, finished=None) -> list[list[int]]:
        while True:
            self._free_finished(finished)
            self._admit()
            if all(p is None for p in self.slot_prompt):
                break
            for _ in range(self.sync_steps):
                logits = self.decoder.step_all(self.next_ids)
                self._record(self.decoder.row_index[:len(logits)], logits)
        counts, rows = self.count[:-1].tolist(), self.out[:-1].tolist()
        decoder = self.decoder
        log.debug("continuous batching: %d prompts in %d slots, %d decode steps, %d CUDA graphs (%.2f s capturing)",
                  len(rows), decoder.slots, decoder.steps, len(decoder.graphs), decoder.capture_seconds)
        return [row[:count] for row, count in zip(rows, counts)]

    def _free_finished(self, finished) -> None:
        done, counts = torch.stack([self.done.long(), self.count[self.owner]]).tolist()  # the host sync
        for slot, (ended, count) in enumerate(zip(done, counts)):
            if ended and self.slot_prompt[slot] is not None:
                self.decoder.free(slot)
                self.slot_prompt[slot] = None
                if finished is not None:
                    finished(1, count)

    def _admit(self) -> None:
        free = self.decoder.free_slots()
        if not self.waiting or len(free) < min(len(self.waiting), max(1, self.decoder.slots // ADMIT_SHARE)):
            return
        taken = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        while taken:
            # One prefill forward takes at most PREFILL_TOKENS padded tokens (or one prompt); the
            # prompts are sorted by length, so the last one taken sets the padded width.
            group = taken[:1]
            for i in taken[1:]:
                if (len(group) + 1) * len(self.prompts[i]) > PREFILL_TOKENS:
                    break
                group.append(i)
            taken, slots, free = taken[len(group):], free[:len(group)], free[len(group):]
            self._insert(group, slots)

    def _insert(self, group: list[int], slots: list[int]) -> None:
        prompts = [self.prompts[i] for i in group]
        logits = self.decoder.prefill(prompts, slots)
        index = torch.tensor(slots, device=self.decoder.device)
        self.owner[index] = torch.tensor(group, device=self.decoder.device)
        self.done[index] = False
        if self.history is not None:
            rows = torch.tensor([list(p) + [p[0]] * (self.history.shape[1] - len(p)) for p in prompts])
            self.history[index] = rows.to(self.decoder.device)
            self.prompt_length[index] = torch.tensor([len(p) for p in prompts], device=self.decoder.device)
        for slot, prompt in zip(slots, group):
            self.slot_prompt[slot] = prompt
        self._record(index, logits)

    def _record(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        """Choose the next token of slots `index` (logits row i = slot index[i]) and record it."""
        done = self.done[index]
        if not self.options.greedy:
            logits = logits.masked_fill(done[:, None], 0.0)  # free rows: any finite draw (nobody reads it)
        history = None if self.history is None else self.history[index]
        tokens = _next_tokens(logits, history, self.processors, self.options.greedy, self.generator)
        owner = self.owner[index]
        count = self.count[owner]
        self.out[owner, count] = tokens  # a done row writes past its tokens: never read
        if self.history is not None:
            self.history[index, self.prompt_length[index] + count] = tokens
        count = count + ~done
        self.count[owner] = count
        stopped = torch.isin(tokens, self.stops) if len(self.stops) else torch.zeros_like(done)
        self.done[index] = done | stopped | (count >= self.options.max_new_tokens)
        self.next_ids[index] = tokens


def slots_apply(model, options: GenerationOptions) -> bool:
    """Whether `generate_batch` can decode by continuous batching (`_slot_decode`) instead of static
    batches. Not with constrained decoding: its processor tracks each row's text from one batch-wide
    prompt width (the dynamic loop runs it). Not for sliding-window or recurrent caches: a slot is
    a plain full-length KV row."""
    return options.json_after is None and supports_joining(DynamicCache(config=model.config))


def supports_joining(cache: DynamicCache) -> bool:
    """Plain per-layer KV tensors (Llama, Qwen2, Mistral...); sliding-window or
    recurrent layers cannot be left-padded and joined, nor copied into a slot."""
    return all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", [None]))


def fast_path(model, fast: bool | None) -> bool:
    """Whether `generate_batch`'s batches (where it does not batch continuously) use the static-cache
    decoder: `fast` if given, else on CUDA."""
    if fast is not None:
        return fast
    return next(model.parameters()).device.type == "cuda"


def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise TunelabError(f"prompt {i} is empty", where="generation",
                               fix="every prompt needs at least one token (the template's generation prompt)")


def _finish(tokenizer, prompt: Sequence[int], tokens: list[int], stop_ids: set[int]) -> Generation:
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    kept = tokens if cut is None else tokens[:cut]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    if cut is None:
        text = _complete_characters(tokenizer, kept, text)
    return Generation(text=text, token_ids=kept, prompt_tokens=len(prompt),
                      finish_reason="length" if cut is None else "stop")


def _complete_characters(tokenizer, tokens: list[int], text: str) -> str:
    """A completion cut at max_new_tokens can stop inside a character that byte-level
    tokenizers spread over several tokens: it decodes to U+FFFD. Drop the tokens of that
    last, incomplete character (a UTF-8 character is at most 4 bytes, so at most 3 tokens)."""
    end = len(tokens)
    while text.endswith("\ufffd") and end > 0 and len(tokens) - end < 3:
        end -= 1
        text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
    return text


# --- public API ------------------------------------------------------------------------

AUTO_BATCH_CAP = 256  # rows per batch at most when sized automatically
CPU_BATCH = 8


def kv_shape(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the model's KV cache."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim


def kv_bytes_per_token(model) -> int:
    layers, kv_heads, head_dim = kv_shape(model)
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


def auto_batch_size(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    """Rows per batch when none is given: 8 on the CPU (compute-bound); on a GPU as many rows as half
    the free memory holds, each row costing its static KV cache at the longest prompt plus
    `max_new_tokens` and its prefill mask, at most AUTO_BATCH_CAP. A small model's decode is
    launch-bound, so a bigger batch is nearly free speed (the hotel test set: batch 8 -> 128)."""
    parameter = next(model.parameters())
    if parameter.device.type != "cuda" or not prompts:
        return CPU_BATCH
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    width = max(map(len, prompts))
    slots = width + max_new_tokens
    per_row = (kv_bytes_per_token(model) * slots
               + 4 * width * slots  # the prefill's boolean and additive masks
               + 8 * cfg.vocab_size)  # last-token logits in fp32, twice
    free, _ = torch.cuda.mem_get_info(parameter.device)
    return max(1, min(AUTO_BATCH_CAP, int(free * 0.5) // per_row))


def generate_batch(model, tokenizer, prompts: Sequence[Sequence[int]], options: GenerationOptions | None = None,
                   stop_ids: Sequence[int] = (), batch_size: int | None = None, progress: bool = True,
                   desc: str = "generating", fast: bool | None = None, slots: bool | None = None) -> list[Generation]:
    """Generate a completion for every prompt (token ids, template already applied).

    Prompts are taken in length order (less padding), results come back in input order.
    Each completion ends at its first stop token (e.g. the template's end-of-turn).
    By default, where `slots_apply`, it batches continuously (`_slot_decode`): `batch_size` rows of
    a static KV cache, each refilled with the next prompt as soon as its row ends (CUDA graphs on
    CUDA). `slots=False`: batches of `batch_size` prompts, each decoded until its last row ends,
    with the static cache + CUDA graphs where `fast` (default: on CUDA), else the shrinking
    dynamic-cache loop. `fast=False` forces the dynamic loop.
    `batch_size` None: `auto_batch_size`.
    """
    from tqdm.auto import tqdm

    options = options or GenerationOptions()
    _check_prompts(prompts)
    if batch_size is None:
        batch_size = auto_batch_size(model, prompts, options.max_new_tokens)
    if batch_size <= 0:
        raise TunelabError(f"batch_size must be > 0, got {batch_size}", where="generation",
                           fix="use e.g. --batch-size 8")
    was_training = model.training
    model.eval()
    pad_id, stop_set = pad_id_for(tokenizer), set(stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    # Continuous batching unless told otherwise (`fast=False`: the dynamic loop; `slots=False`:
    # static batches on the fast path), also on the CPU, where it was faster than the dynamic loop
    # (bench/generate_speed.py --device cpu; docs/benchmarks.md).
    use_slots = (fast is not False and slots is not False and slots_apply(model, options)
                 and id(model) not in _SLOTS_FAILED)
    fast = fast_path(model, fast)
    bar = _Progress(tqdm(total=len(prompts), unit="sample", desc=desc, disable=not progress, dynamic_ncols=True))
    try:
        rows = None
        if use_slots:
            rows = _slot_tokens(model, [prompts[i] for i in order], options, stop_ids, pad_id, batch_size, bar.done)
        if rows is None:
            bar.reset()
            rows = _batched_tokens(model, tokenizer, [prompts[i] for i in order], options, stop_ids, pad_id,
                                   batch_size, fast and not options.json_after, bar)
    finally:
        bar.close()
        model.train(was_training)
    results: list[Generation | None] = [None] * len(prompts)
    for index, tokens in zip(order, rows):
        results[index] = _finish(tokenizer, prompts[index], tokens, stop_set)
    return results  # type: ignore[return-value]


class _Progress:
    """`generate_batch`'s progress bar: samples done, and generated tokens a second since the start."""

    def __init__(self, bar):
        self.bar = bar
        self.reset()

    def reset(self) -> None:
        self.bar.reset()
        self.tokens, self.started = 0, time.perf_counter()

    def done(self, samples: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(samples)
        self.bar.set_postfix(tok_s=f"{self.tokens / max(time.perf_counter() - self.started, 1e-9):.0f}")

    def close(self) -> None:
        self.bar.close()


def _batched_tokens(model, tokenizer, prompts, options, stop_ids, pad_id, batch_size: int, fast: bool,
                    bar: _Progress) -> list[list[int]]:
    """Tokens of each prompt, decoded in consecutive batches of `batch_size` prompts."""
    rows: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = _batch_tokens(model, prompts[start:start + batch_size], options, stop_ids, pad_id, fast, tokenizer)
        rows += batch
        bar.done(len(batch), sum(map(len, batch)))
    return rows


_GRAPH_FAILED: set[int] = set()  # ids of models whose decode step could not be captured
_SLOTS_FAILED: set[int] = set()  # ids of models whose continuous-batching decode failed on the GPU


def _slot_tokens(model, prompts, options, stop_ids, pad_id, slots: int, finished) -> list[list[int]] | None:
    """`_slot_decode` with CUDA graphs on CUDA; None where a GPU run failed (the caller then
    decodes static batches, as `_batch_tokens` falls back when a graph cannot be captured)."""
    use_graph = next(model.parameters()).device.type == "cuda" and id(model) not in _GRAPH_FAILED
    try:
        return _slot_decode(model, prompts, options, stop_ids, pad_id, slots, use_graph, finished=finished)
    except Exception as exc:  # noqa: BLE001 - the static batches still work
        if not use_graph:
            raise
        _SLOTS_FAILED.add(id(model))
        log.warning("continuous-batching decode failed (%s: %s); decoding static batches",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def _batch_tokens(model, batch, options, stop_ids, pad_id, fast: bool, tokenizer=None) -> list[list[int]]:
    if fast:
        use_graph = next(model.parameters()).device.type == "cuda" and id(model) not in _GRAPH_FAILED
        try:
            return _static_decode(model, batch, options, stop_ids, pad_id, use_graph)
        except Exception as exc:  # noqa: BLE001 - any capture failure: the dynamic loop still works
            if not use_graph:
                raise
            _GRAPH_FAILED.add(id(model))
            log.warning("CUDA graph decoding failed (%s: %s); using the dynamic-cache loop",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    tokens: list[list[int]] = [[] for _ in batch]
    for step in _decode_steps(model, batch, options, stop_ids, pad_id, tokenizer):
        for row, token in step.items():
            tokens[row].append(token)
    return tokens


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

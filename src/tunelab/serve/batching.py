"""Continuous (in-flight) batching for `tunelab serve`.

One scheduler thread owns the model. Between two decoding steps it drops the rows whose
client left, timed out or finished, and admits waiting requests into the running batch:
their prompts are prefilled together (left-padded) and their KV cache rows are joined
to the running cache, left-padded to a common length. Each row keeps its own position
ids and attention mask, so it sees exactly what it would see alone (greedy output equal
to the request served by itself, up to floating-point reassociation). Rows of different
LoRA adapters share a batch through PEFT's mixed-adapter forward (`adapter_names`).

Why not transformers' own continuous batching (`generate_batch` / `init_continuous_batching`,
paged attention)? It has no per-row LoRA adapter, and on this CPU it was slower than
plain sequential `generate` for the embedded model (docs/benchmarks.md, "serving"); our
loop reuses the eval decoder's sampling (`model.generate._logits_processors`).

On a GPU the running rows live in the slots of a static KV cache instead (`SlotBatcher`,
`model.generate.SlotDecoder`): a finished request frees its slot, a new one is prefilled and
copied into a free slot, and the decode step is replayed as a CUDA graph per batch-size and
length bucket, as `tunelab eval` decodes. A small model's decode is launch-bound: with the
joined/trimmed DynamicCache above (an eager HF forward per step) one request alone took ~21 ms
a token on an H100 (docs/benchmarks.md). `make_batcher` picks; adapters and sliding-window
models keep `Batcher`.

Requests talk to the scheduler through callbacks: `Job.emit(event)` is called from the
scheduler thread with ("token", id), ("done", finish_reason) or ("error", message).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from tunelab.model.attention import grouped_query_decode
from tunelab.model.generate import (
    GenerationOptions,
    SlotDecoder,
    _logits_processors,
    cache_keyword,
    left_pad,
    pad_positions,
    supports_joining,
)

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


class QueueFull(Exception):
    """More requests are waiting than the server accepts (answered with 429)."""


@dataclass
class Job:
    prompt: list[int]
    options: GenerationOptions
    emit: Callable[[tuple], None]
    adapter: str | None = None  # the adapter's served name; None = the base with adapters off
    deadline: float | None = None  # time.monotonic() after which the job is dropped
    stop_ids: frozenset[int] = frozenset()
    cancelled: bool = False  # set by the server (client gone, stop string seen); read between steps
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


@dataclass
class Batch:
    """The running rows: their next input token, attention mask (one column per cached
    position) and KV cache. Invariant: mask width == cache length."""
    jobs: list[Job]
    next_ids: torch.Tensor  # (B,)
    mask: torch.Tensor  # (B, L)
    positions: torch.Tensor  # (B,) position of each row's next input
    cache: DynamicCache


class Batcher:
    """Owns the model on one thread; `submit` is safe from any thread."""

    def __init__(self, engine, *, max_batch: int = 32, max_waiting: int = 256, max_prefill_tokens: int = 8192):
        from tunelab.data.collate import pad_id_for

        self.engine, self.model, self.pad_id = engine, engine.model, pad_id_for(engine.tokenizer)
        self.max_batch, self.max_waiting, self.max_prefill_tokens = max_batch, max_waiting, max_prefill_tokens
        self.device = next(self.model.parameters()).device
        self.cache_key = cache_keyword(self.model)
        # PEFT runs rows of different LoRA adapters in one forward (not DoRA: one adapter per batch then).
        self.mixed_adapters = bool(engine.adapters) and not engine.uses_dora()
        # Sliding-window or recurrent caches cannot be joined: such models get static batches.
        self.joinable = supports_joining(DynamicCache(config=self.model.config))
        self.waiting: collections.deque[Job] = collections.deque()
        self.wakeup = threading.Condition()
        self.batch: Batch | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="tunelab-batcher", daemon=True)
        self.thread.start()

    # --- called from the server -------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        """Queue `jobs` (the n choices of one request) all or none; QueueFull when there is no room."""
        with self.wakeup:
            if len(self.waiting) + len(jobs) > self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (limit {self.max_waiting})")
            for job in jobs:
                if not job.options.greedy and job.options.seed is not None:
                    job.generator = torch.Generator(device=self.device).manual_seed(job.options.seed)
            self.waiting.extend(jobs)
            self.wakeup.notify()

    def close(self) -> None:
        with self.wakeup:
            self.closed = True
            self.wakeup.notify()
        self.thread.join(timeout=30)

    def load(self) -> dict:
        return {"running": len(self.running()), "waiting": len(self.waiting)}

    def running(self) -> list[Job]:
        return self.batch.jobs if self.batch else []

    # --- the scheduler loop -----------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wakeup:
                    while not self.closed and not self.waiting and not self.running():
                        self.wakeup.wait()
                    if self.closed:
                        break
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - one failed step must not kill the server
                    log.exception("generation step failed")
                    self._fail_all(f"generation failed: {type(exc).__name__}: {exc}"[:500])
        self._fail_all("the server is shutting down")

    def _step(self) -> None:
        self._drop_gone()
        self._admit()
        if self.running():
            self._decode()

    def _drop_gone(self) -> None:
        """Rows and waiting jobs whose client left or whose time is up leave now."""
        now = time.monotonic()
        with self.wakeup:
            for job in [j for j in self.waiting if j.cancelled or j.expired(now)]:
                self.waiting.remove(job)
                self._end(job, "cancelled" if job.cancelled else "timeout")
        gone = [j for j in self.running() if j.cancelled or j.expired(now)]
        for job in gone:
            self._end(job, "cancelled" if job.cancelled else "timeout")
        if gone:
            self._remove(gone)

    def _remove(self, jobs: list[Job]) -> None:
        """The running `jobs` leave the batch."""
        if self.batch is not None:
            gone = {id(j) for j in jobs}  # identity: the n choices of one request are equal jobs
            self._keep([i for i, j in enumerate(self.batch.jobs) if id(j) not in gone])

    def _take_waiting(self) -> list[Job]:
        """Jobs to admit now: up to the free rows and the prefill token budget (at least one)."""
        if self.batch is not None and not self.joinable:
            return []
        room = self.max_batch - len(self.running())
        taken: list[Job] = []
        budget = self.max_prefill_tokens
        with self.wakeup:
            while self.waiting and len(taken) < room:
                job = self.waiting[0]
                if taken and len(job.prompt) > budget:
                    break
                if not self.mixed_adapters and not self._same_adapter(job, taken):
                    break  # adapters that cannot share a batch wait for the running one to drain
                taken.append(self.waiting.popleft())
                budget -= len(job.prompt)
        return taken

    def _same_adapter(self, job: Job, taken: list[Job]) -> bool:
        running = self.running() + taken
        return not running or running[0].adapter == job.adapter

    def _prefill(self, jobs: list[Job]) -> tuple[torch.Tensor, torch.Tensor, DynamicCache, torch.Tensor]:
        """The prompts of `jobs` left-padded through the model: (first tokens, mask, cache, next positions)."""
        ids, mask = left_pad([j.prompt for j in jobs], self.pad_id, self.device)
        positions = pad_positions(mask)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(jobs, ids, mask, positions, cache)
        return self._sample(jobs, logits), mask, cache, positions[:, -1] + 1

    def _admit(self) -> None:
        jobs = self._take_waiting()
        if not jobs:
            return
        first, mask, cache, positions = self._prefill(jobs)
        new = Batch(jobs, first, mask, positions, cache)
        live = self._record(jobs, first)
        new = select(new, live) if len(live) < len(jobs) else new
        if new is not None:
            self.batch = new if self.batch is None else merge(self.batch, new)

    def _decode(self) -> None:
        b = self.batch
        mask = torch.cat([b.mask, b.mask.new_ones((len(b.jobs), 1))], dim=1)
        logits = self._forward(b.jobs, b.next_ids[:, None], mask, b.positions[:, None], b.cache)
        b.mask, b.positions = mask, b.positions + 1
        b.next_ids = self._sample(b.jobs, logits)
        self._keep(self._record(b.jobs, b.next_ids))

    def _forward(self, jobs: list[Job], ids, mask, positions, cache) -> torch.Tensor:
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True,
                  "logits_to_keep": 1, self.cache_key: cache}
        if self.mixed_adapters:
            slots = self.engine.internal_names
            out = self.model(**kwargs, adapter_names=[slots[j.adapter] if j.adapter else BASE for j in jobs])
        else:
            with self.engine.using(jobs[0].adapter):
                out = self.model(**kwargs)
        return out.logits[:, -1, :].float()

    def _sample(self, jobs: list[Job | None], logits: torch.Tensor) -> torch.Tensor:
        """Next token per row: argmax for greedy rows, each sampled row with its own settings
        (a None job is a free row: its token is not used)."""
        next_ids = logits.argmax(-1)
        for row, job in enumerate(jobs):
            if job is None:
                continue
            o = job.options
            if o.greedy and o.repetition_penalty == 1.0:
                continue
            history = torch.tensor([job.prompt + job.tokens], device=logits.device)
            scores = _logits_processors(o)(history, logits[row:row + 1])
            if o.greedy:
                next_ids[row] = scores.argmax(-1)[0]
            else:
                probs = torch.softmax(scores, dim=-1)
                next_ids[row] = torch.multinomial(probs, 1, generator=job.generator)[0, 0]
        return next_ids

    def _record(self, jobs: list[Job | None], next_ids: torch.Tensor) -> list[int]:
        """Hand each row its token; the rows that go on (None: a free row)."""
        live = []
        for row, (job, token) in enumerate(zip(jobs, next_ids.tolist())):
            if job is None:
                continue
            if token in job.stop_ids:
                self._end(job, "stop")
                continue
            job.tokens.append(token)
            job.emit(("token", token))
            if len(job.tokens) >= job.options.max_new_tokens:
                self._end(job, "length")
            else:
                live.append(row)
        return live

    def _keep(self, rows: list[int]) -> None:
        if self.batch is not None and len(rows) < len(self.batch.jobs):
            self.batch = select(self.batch, rows)

    def _end(self, job: Job, reason: str) -> None:
        job.cancelled = True  # nothing more for this job, wherever it is
        if reason in ("stop", "length", "cancelled"):
            job.emit(("done", reason))
        else:
            job.emit(("error", reason))

    def _fail_all(self, message: str) -> None:
        with self.wakeup:
            jobs = list(self.waiting) + self.running()
            self.waiting.clear()
            self._remove(self.running())
        for job in jobs:
            job.cancelled = True
            job.emit(("error", message))


class SlotBatcher(Batcher):
    """`Batcher` whose running rows are the slots of a `SlotDecoder` (static KV cache; the decode
    step a CUDA graph on a GPU). Admission, sampling, stops, cancellation and timeouts are
    `Batcher`'s; only where a running row's cache lives differs. Base model only (no adapters)."""

    def __init__(self, engine, *, max_batch: int = 32, use_graph: bool | None = None, **kwargs):
        from tunelab.data.collate import pad_id_for

        model = engine.model
        if engine.adapters:
            raise ValueError("SlotBatcher serves the base model alone; use Batcher with adapters")
        if use_graph is None:
            use_graph = next(model.parameters()).device.type == "cuda"
        self.decoder = SlotDecoder(model, max_batch, engine.context_length, pad_id_for(engine.tokenizer), use_graph)
        self.slot_jobs: list[Job | None] = [None] * max_batch
        self.next_tokens: list[int] = [0] * max_batch
        super().__init__(engine, max_batch=max_batch, **kwargs)  # starts the scheduler thread: last

    def running(self) -> list[Job]:
        return [j for j in self.slot_jobs if j is not None]

    def _run(self) -> None:
        if self.decoder.use_graph:
            try:
                with torch.inference_mode(), grouped_query_decode(self.model):
                    self.decoder.capture_all()  # requests queue meanwhile; none waits for a capture later
            except Exception:  # noqa: BLE001 - serve without graphs rather than not at all
                log.exception("capturing the decode steps failed; serving without CUDA graphs")
                self.decoder.use_graph, self.decoder.graphs = False, {}
        super()._run()

    def _remove(self, jobs: list[Job]) -> None:
        gone = {id(j) for j in jobs}
        for slot, job in enumerate(self.slot_jobs):
            if job is not None and id(job) in gone:
                self.decoder.free(slot)
                self.slot_jobs[slot] = None

    def _admit(self) -> None:
        jobs = self._take_waiting()
        if not jobs:
            return
        slots = self.decoder.free_slots()[:len(jobs)]
        first = self._sample(jobs, self.decoder.prefill([j.prompt for j in jobs], slots))
        live = set(self._record(jobs, first))
        for row, (job, slot) in enumerate(zip(jobs, slots)):
            if row in live:
                self.slot_jobs[slot], self.next_tokens[slot] = job, int(first[row])
            else:
                self.decoder.free(slot)  # done at its first token

    def _decode(self) -> None:
        tokens = {s: self.next_tokens[s] for s, j in enumerate(self.slot_jobs) if j is not None}
        # The attention `tunelab eval`'s graphs run (bucketed: what a GPU replays, also tested on the CPU).
        with grouped_query_decode(self.model) if self.decoder.bucketed else contextlib.nullcontext():
            logits = self.decoder.step(tokens)
        jobs = self.slot_jobs[:len(logits)]
        next_ids = self._sample(jobs, logits)
        live = set(self._record(jobs, next_ids))
        self._remove([j for row, j in enumerate(jobs) if j is not None and row not in live])
        for row in live:
            self.next_tokens[row] = int(next_ids[row])


def make_batcher(engine, *, max_batch: int = 32, max_waiting: int = 256, slots: bool | None = None) -> Batcher:
    """A `SlotBatcher` where it applies (a GPU, the base model alone, plain per-layer KV caches, and
    `max_batch` slots of the full context in half the free GPU memory, else as many as fit), unless
    `slots` is False (`--no-kv-slots`); `Batcher` otherwise (CPU, adapters, sliding-window models).
    Measured on an H100 (docs/benchmarks.md): 9.7x the throughput of requests one at a time under 32
    clients (the dynamic batcher: 6.6x), and in float32 every answer equal to the request alone."""
    model = engine.model
    device = next(model.parameters()).device
    if slots is False:
        return Batcher(engine, max_batch=max_batch, max_waiting=max_waiting)
    if device.type != "cuda" or engine.adapters or not supports_joining(DynamicCache(config=model.config)):
        if slots:  # asked for: say why not (on auto the dynamic batcher is simply the one that applies)
            log.warning("--kv-slots needs a GPU, the base model alone (no --adapter) and a plain per-layer KV "
                        "cache: dynamic batching instead")
        return Batcher(engine, max_batch=max_batch, max_waiting=max_waiting)
    free, _ = torch.cuda.mem_get_info(device)
    count = min(max_batch, int(free * 0.5) // SlotDecoder.memory_per_slot(model, engine.context_length))
    if count >= 1:
        return SlotBatcher(engine, max_batch=count, max_waiting=max_waiting)
    log.warning("no room on the GPU for a static KV cache of %d tokens: dynamic batching", engine.context_length)
    return Batcher(engine, max_batch=max_batch, max_waiting=max_waiting)


# --- batch surgery: selecting rows, joining two left-padded batches -------------------------

def select(b: Batch, rows: list[int]) -> Batch | None:
    """The batch with only `rows`, its cache trimmed of columns no remaining row attends to."""
    if not rows:
        return None
    index = torch.tensor(rows, device=b.mask.device)
    b.cache.batch_select_indices(index)
    mask = b.mask[index]
    start = int(mask.any(0).long().argmax())  # first column some row still uses
    if start:
        mask = mask[:, start:]
        for layer in b.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
    return Batch([b.jobs[i] for i in rows], b.next_ids[index], mask, b.positions[index], b.cache)


def merge(a: Batch, b: Batch) -> Batch:
    """One batch of a's rows then b's, both left-padded to the longer cache."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([_pad_left(la.keys, width), _pad_left(lb.keys, width)])
        la.values = torch.cat([_pad_left(la.values, width), _pad_left(lb.values, width)])
    mask = torch.cat([_pad_left(a.mask, width), _pad_left(b.mask, width)])
    return Batch(a.jobs + b.jobs, torch.cat([a.next_ids, b.next_ids]), mask,
                 torch.cat([a.positions, b.positions]), a.cache)


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero columns before the sequence axis (dim 1 of a mask, dim 2 of a KV tensor)."""
    axis = 1 if t.dim() == 2 else 2
    missing = width - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)

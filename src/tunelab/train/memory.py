"""Out-of-memory back-off: a step that does not fit is retried in a form that does.

On a CUDA out-of-memory error inside the forward/backward of an optimizer step, the step's
partial gradients are dropped, the RNG is put back where the step started (so dropout draws
the same masks) and the same samples are tried again with, in this order:

1. micro-batches of half as many tokens (down to MIN_TOKEN_BUDGET, or the longest sample);
2. gradient checkpointing (layer inputs kept, the rest recomputed in backward);
3. activation offload + token-tiled MLP (train/fast/offload.py: layer inputs in pinned host memory);
4. micro-batches of half as many tokens again, down to one sample each;

and when nothing is left, one clear message with what was tried and which keys to change.
The loss is averaged over the step's target tokens however the step is split, so a
retried step trains what the first try would have (up to float summation order; with LoRA
dropout the masks are drawn anew for the new micro-batch shapes, same distribution). Nothing is lost: the failed try
changed no weight (an out-of-memory error inside the optimizer's own update is not retried).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable

import torch

from tunelab.errors import TunelabError
from tunelab.train.checkpoint import restore_rng_state, rng_state
from tunelab.train.fast.plan import FREE_MEMORY_SHARE, MIN_TOKEN_BUDGET


class OptimizerOutOfMemory(TunelabError):
    """Out of memory inside optimizer.step(): weights may be half-updated, so never retried."""

    def __init__(self, detail: str):
        super().__init__(f"out of GPU memory in the optimizer update ({detail.splitlines()[0][:160]})",
                         where="training",
                         fix="train fewer parameters (LoRA instead of full fine-tuning, a smaller lora_rank), or "
                             "resume from the last checkpoint on a GPU with more memory / several GPUs")


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


class MemoryBackoff:
    """Runs optimizer steps; shrinks micro-batches and turns on checkpointing when one does not fit.

    `budget` is the token budget of a micro-batch (None: micro-batches by sample count, as
    the config's per_device_train_batch_size says, until the first back-off).
    """

    def __init__(self, budget: int | None, enabled: bool, enable_checkpointing: Callable[[], None],
                 checkpointing: bool, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                 enable_offload: Callable[[], bool] = lambda: False):
        self.budget = budget
        self.enabled = enabled
        self.enable_checkpointing = enable_checkpointing
        self.checkpointing = checkpointing
        self.enable_offload = enable_offload  # returns whether it switched anything on
        self.offloading = False
        self.log = log
        self.tried: list[str] = []

    def calibrate(self, device: torch.device, base_bytes: int, tokens: int) -> None:
        """After the first step on CUDA: raise a formula-sized budget to what the step measured.

        The step kept (peak - base_bytes) bytes of activations for `tokens` tokens in its largest
        micro-batch; the budget becomes what fits FREE_MEMORY_SHARE of the memory left beside the
        weights and optimizer state. Only ever raised here: the back-off lowers it if a longer
        step does not fit after all."""
        if tokens <= 0:  # this process's share of the step was empty: nothing was measured
            return
        per_token = max(torch.cuda.max_memory_allocated(device) - base_bytes, 1) / max(tokens, 1)
        capacity = torch.cuda.get_device_properties(device).total_memory
        room = capacity - torch.cuda.memory_allocated(device)  # weights, gradients and optimizer state stay
        budget = int(FREE_MEMORY_SHARE * room / per_token) // 256 * 256
        if self.budget is not None and budget > self.budget and not self.tried:
            self.log(f"micro-batch budget raised to {budget:,} tokens (step 1 kept {per_token / 2**20:.2f} MiB "
                     f"a token; {gib(room)} free beside the weights)")
            self.budget = budget

    def run(self, step: int, longest: int, largest_micro: Callable[[int | None], int],
            attempt: Callable[[int | None], object], reset: Callable[[], None]):
        """`attempt(budget)` runs the step; `largest_micro(budget)` is the token count of its
        biggest micro-batch under that budget; `longest` its longest sample; `reset` drops
        the partial gradients of a failed try."""
        while True:
            rng = rng_state()
            try:
                return attempt(self.budget)
            except torch.OutOfMemoryError:
                if not self.enabled:
                    raise
                failed_tokens = largest_micro(self.budget)
            reset()
            _free_memory()
            restore_rng_state(rng)
            self._back_off(step, longest, failed_tokens)

    def _back_off(self, step: int, longest: int, failed_tokens: int) -> None:
        smaller = max(failed_tokens // 2, longest)
        if smaller < failed_tokens and (smaller >= MIN_TOKEN_BUDGET or self.checkpointing):
            change = f"micro-batches of <= {smaller:,} tokens (from {failed_tokens:,})"
            self.budget = smaller
        elif not self.checkpointing:
            self.enable_checkpointing()
            self.checkpointing = True
            change = "gradient checkpointing on"
        elif not self.offloading and self.enable_offload():
            self.offloading = True
            change = "activation offload on (layer inputs in pinned host memory)"
        else:
            raise self._give_up(step, longest, failed_tokens)
        self.tried.append(change)
        self.log(f"out of memory at step {step}: retrying the step with {change}")

    def _give_up(self, step: int, longest: int, failed_tokens: int) -> TunelabError:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
        tried = "; ".join(self.tried) or "nothing (oom_backoff had no lever left)"
        where = f"a micro-batch of {failed_tokens:,} tokens (longest sample {longest:,})"
        need = f"; peak {gib(peak)} of {gib(total)}" if total else ""
        return TunelabError(
            f"out of memory at step {step} with {where}, after trying: {tried}{need}",
            where="training",
            fix="lower cutoff_len (or drop the longest samples), train fewer parameters (LoRA with a smaller "
                "lora_rank or fewer lora_target modules instead of full fine-tuning), load the base in 4 bits "
                "(quantization_bit=4), or use a GPU with more memory / several GPUs")


def out_of_memory_message(exc: BaseException) -> TunelabError:
    """An out-of-memory error outside a training step (loading, evaluation) as a user message."""
    detail = str(exc).split("\n")[0][:200]
    return TunelabError(
        f"out of GPU memory ({detail})", where="device",
        fix="load the model in 4 bits (quantization_bit=4), lower cutoff_len, per_device_eval_batch_size or "
            "max_tokens_per_batch, or use a GPU with more memory")

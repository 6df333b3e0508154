"""Token-tiled MLP: one layer's peak memory stops growing with the whole sequence.

The MLP of a decoder layer works on each token alone, and its intermediates are the
widest tensors of the layer: Qwen2.5-7B's gate, up and their product are 3 x 18,944
values per token, about 20 GiB in bf16 for one layer at 128k tokens, whether they are
kept for backward or only live during the recomputation of a checkpointed layer.
Here the MLP runs over tiles of `tile_tokens` tokens inside an autograd Function
that keeps only the MLP's input; its backward recomputes one tile at a time and
back-propagates through it, so a tile's intermediates are the only ones alive.
(Arctic Long Sequence Training's TiledMLP and Unsloth's tiled MLP do the same.)

The math is the plain MLP's: tiles split the tokens, never the features, so every
output row and every weight gradient (summed over tiles instead of inside one
matmul) is the same. The cost is one more MLP forward per step. Batches no longer
than one tile take the plain path untouched (and stay inside a compiled graph).
"""

from __future__ import annotations

import torch

from tunelab.train.fast.offload import ForwardState, decoder_layers

DEFAULT_TILE_TOKENS = 8192


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp_forward, tile_tokens: int, x: torch.Tensor):
        ctx.mlp_forward, ctx.tile_tokens = mlp_forward, tile_tokens
        ctx.forward_state = ForwardState(x.device)  # LoRA dropout: the recomputed tiles draw the forward's masks
        ctx.save_for_backward(x)
        return _tile_loop(mlp_forward, x, tile_tokens)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        flat = x.detach().reshape(-1, x.shape[-1])
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat)
        state = ctx.forward_state
        with state.rng():
            for start in range(0, flat.shape[0], ctx.tile_tokens):
                rows = slice(start, start + ctx.tile_tokens)
                tile = flat[rows].detach().requires_grad_(True)
                with state.grad_and_autocast():
                    out = ctx.mlp_forward(tile)
                torch.autograd.backward(out, grad_flat[rows])
                grad_x[rows] = tile.grad
        ctx.mlp_forward = None
        return None, None, grad_x.view_as(x)


def _tile_loop(mlp_forward, x: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    """The MLP over token tiles without autograd: only one tile's intermediates exist at a time."""
    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        outs = [mlp_forward(tile) for tile in flat.split(tile_tokens)]
    return torch.cat(outs).view(*x.shape[:-1], outs[0].shape[-1])


@torch.compiler.disable  # a graph break inside a compiled layer, only for batches longer than a tile
def tiled_mlp(mlp_forward, x: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return _tile_loop(mlp_forward, x, tile_tokens)
    return _TiledMLP.apply(mlp_forward, tile_tokens, x)


class TiledForward:
    """Replaces an MLP module's forward: plain up to one tile, tiled beyond."""

    def __init__(self, original, tile_tokens: int):
        self.original, self.tile_tokens = original, tile_tokens

    def __call__(self, x):
        if x.numel() // x.shape[-1] <= self.tile_tokens:
            return self.original(x)
        return tiled_mlp(self.original, x, self.tile_tokens)


def tile_mlps(model, tile_tokens: int = DEFAULT_TILE_TOKENS) -> int:
    """Tile the MLP of every decoder layer (those that have `.mlp`); returns how many."""
    count = 0
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        current = mlp.forward
        original = current.original if isinstance(current, TiledForward) else current
        mlp.forward = TiledForward(original, tile_tokens)  # an instance attribute: Module.__call__ uses it
        count += 1
    return count


def untile_mlps(model) -> None:
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and isinstance(mlp.forward, TiledForward):
            del mlp.forward


def mlps_tiled(model) -> bool:
    return any(isinstance(getattr(getattr(layer, "mlp", None), "forward", None), TiledForward)
               for layer in decoder_layers(model))

"""RoPE scaling for training past a model's native context (`rope_scaling` key).

The key takes transformers' own form, a mapping such as `{rope_type: yarn, factor: 4.0}`
(any other field transformers knows, e.g. `beta_fast`, passes through), or just the type
(`linear`, `dynamic`, `yarn`, `llama3`), in which case the factor is what `cutoff_len`
needs: ceil(cutoff_len / the model's max_position_embeddings), as LLaMA-Factory does.
The scaling is written into the model config before the weights load, so the rotary
embedding transformers builds is the scaled one, and it is saved with the config.
"""

from __future__ import annotations

import math

from tunelab.config import check_rope_scaling
from tunelab.errors import TunelabError

# The length the model was trained at, which these types scale from.
NEEDS_ORIGINAL_LENGTH = ("yarn", "llama3")


def rope_parameters(value, native_length: int, cutoff_len: int) -> dict:
    """The `rope_parameters` entries the key asks for, factor resolved."""
    check_rope_scaling(value)
    params = dict(value) if isinstance(value, dict) else {"rope_type": value}
    params["rope_type"] = params.pop("type", None) or params["rope_type"]
    if "factor" not in params:
        if cutoff_len <= native_length:
            raise TunelabError(
                f"rope_scaling={value!r} without a factor, and cutoff_len={cutoff_len} is within the model's "
                f"native {native_length} positions: nothing to scale",
                where="config", fix=f"raise cutoff_len past {native_length}, or give the factor: "
                                    f"rope_scaling={{rope_type: {params['rope_type']}, factor: 2.0}}")
        params["factor"] = float(math.ceil(cutoff_len / native_length))
    params["factor"] = float(params["factor"])
    if params["rope_type"] in NEEDS_ORIGINAL_LENGTH:
        params.setdefault("original_max_position_embeddings", native_length)
    return params


def apply_rope_scaling(config, value, cutoff_len: int) -> dict:
    """Scale the RoPE of a transformers config in place; returns the new rope parameters."""
    current = dict(getattr(config, "rope_parameters", None) or {})
    if current.get("rope_type", "default") not in ("default", None):
        raise TunelabError(f"the model already scales its RoPE ({current})", where="rope_scaling",
                           fix="drop rope_scaling: the model's own scaling applies")
    native = int(current.get("original_max_position_embeddings") or config.max_position_embeddings)
    params = rope_parameters(value, native, cutoff_len)
    config.rope_parameters = current | params
    if params["rope_type"] != "dynamic":
        # The context the scaled model serves. Dynamic NTK instead reads this as the native length
        # and rescales on the fly past it.
        config.max_position_embeddings = int(native * params["factor"])
    try:
        # Both methods of transformers 5.x configs; checked by name in case a release renames them.
        for step in ("standardize_rope_params", "validate_rope"):
            if hasattr(config, step):
                getattr(config, step)()
    except (ValueError, KeyError, TypeError) as exc:
        raise TunelabError(f"transformers rejects rope_scaling={value!r} ({exc})", where="config",
                           fix="see transformers' RopeParameters for the fields each rope_type takes") from None
    return config.rope_parameters

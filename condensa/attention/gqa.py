"""Grouped-query attention (GQA): Hq query heads share Hkv = Hq / G key/value heads.

Query head h reads KV head h // G (the order of Hugging Face's `repeat_kv`). Kernels index the
shared head directly and never copy K or V; the reference ops, which are the readable oracle,
broadcast K and V to every query head with `repeat_kv` and then run the ordinary rule, so every
attention rule (dense, top-k, Top-θ, the gate, SDC, VMC) works per query head unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from condensa.errors import ConfigError


def kv_groups(n_head: int, n_kv_head: int) -> int:
    """G = Hq / Hkv, the query heads per KV head; a `ConfigError` when Hkv does not divide Hq."""
    if n_kv_head < 1 or n_head % n_kv_head:
        raise ConfigError(
            f"{n_head} query heads cannot share {n_kv_head} key/value heads: the number of KV heads must divide "
            "the number of query heads (num_key_value_heads | num_attention_heads)."
        )
    return n_head // n_kv_head


def repeat_kv(x: jax.Array, n_head: int) -> jax.Array:
    """x [B, T, Hkv, D] -> [B, T, n_head, D], KV head j serving query heads j*G .. j*G + G - 1.

    A no-op when x already has `n_head` heads, so MHA pays nothing.
    """
    groups = kv_groups(n_head, x.shape[2])
    return x if groups == 1 else jnp.repeat(x, groups, axis=2)


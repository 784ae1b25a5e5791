"""Attention rules behind one call, `attend`, so the model never knows which one runs."""

from __future__ import annotations

from collections.abc import Callable

import jax

from condensa.attention.config import AttentionConfig
from condensa.attention.dense import attention_scores, masked_softmax, weighted_values

__all__ = ["AttentionConfig", "attend"]


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    visible: jax.Array,
    scale: float,
    layer_idx: int,
    config: AttentionConfig,
    thresholds=None,
    probs_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One layer's attention.

    q, k, v: [B, T, H, D] in the compute dtype; `visible`: bool [B, 1 or H, Tq, Tk], True where key j
    is causally visible to query i (the KV cache's empty slots and padding are False).
    Returns `(out [B, Tq, H, D], probs [B, H, Tq, Tk] float32)`. `probs` are the probabilities the
    rule produced, before attention dropout, which is what the losses and metrics need.
    """
    del layer_idx, thresholds  # used by the sparse modes
    probs = masked_softmax(attention_scores(q, k, scale), visible)
    applied = probs_dropout(probs) if probs_dropout is not None else probs
    return weighted_values(applied, v), probs

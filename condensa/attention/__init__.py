"""Attention rules behind one call, `attend`, so the model never knows which one runs.

`attend` dispatches on `AttentionConfig.backend`: `reference` (plain jax.numpy,
`condensa.attention.reference`) or `pallas` (the kernels where they apply, the reference op
elsewhere, `condensa.attention.pallas_backend`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from condensa.attention.config import AttentionConfig
from condensa.attention.pallas_backend import attend_with_pallas
from condensa.attention.reference import (
    fused_dense_attention, is_plain_dense, layer_thresholds, reference_attend, sparse_probs,
)

__all__ = ["AttentionConfig", "attend", "fused_dense_attention", "is_plain_dense", "layer_thresholds",
           "sparse_probs"]


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
    need_probs: bool = True,
    causal: bool = False,
    decode_state=None,
) -> tuple[jax.Array, jax.Array | None]:
    """One layer's attention.

    q, k, v: [B, T, H, D] in the compute dtype (k and v may have Hkv = H / G heads: grouped-query
    attention, query head h reading KV head h // G); `visible`: bool [B, 1 or H, Tq, Tk], True where key j
    is causally visible to query i (the KV cache's empty slots and padding are False).
    `thresholds`: a `condensa.sparsity.Thresholds` (needed by Top-θ and the tile gate).
    `need_probs`: whether the caller uses the probabilities (losses, metrics); without them, fused
    paths (cuDNN / XLA flash attention for dense, the Pallas kernels) may run instead.
    `causal`: a static promise that `visible` is the plain causal mask (Tq == Tk, no padding, no
    cache), which fused kernels need. `decode_state`: a `DecodeState` from the KV cache while
    decoding (the running V mean and tile-mean keys), which decode kernels use instead of re-reading
    the cache; the reference op recomputes the same quantities from K and V.
    Returns `(out [B, Tq, H, D], probs [B, H, Tq, Tk] float32, or None when not needed)`. `probs`
    are the probabilities the rule produced, before attention dropout.
    """
    backend = attend_with_pallas if config.backend == "pallas" else reference_attend
    return backend(q, k, v, visible=visible, scale=scale, layer_idx=layer_idx, config=config, thresholds=thresholds,
                   probs_dropout=probs_dropout, need_probs=need_probs, causal=causal, decode_state=decode_state)

"""What a decode kernel needs from the KV cache beyond K and V, so it never re-reads the whole cache."""

from __future__ import annotations

from typing import NamedTuple

import jax


class DecodeState(NamedTuple):
    lengths: jax.Array  # [B] int32: slots written so far, the new tokens included
    starts: jax.Array  # [B] int32: the first valid slot (left padding before it)
    v_mean: jax.Array  # [B, Hkv, D] float32: mean of the valid V rows (V-mean compensation)
    k_tile_mean: jax.Array | None  # [B, nk, Hkv, D] float32: mean valid key per tile (decode gate), or None
    # (Hkv: the cache's key/value heads, fewer than the query heads under grouped-query attention)

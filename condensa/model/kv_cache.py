"""A fixed-size KV cache as a pure pytree, so a jitted decode loop never changes shape (no recompiles).

Besides K and V it keeps running sums that sparse decoding needs without reading the whole cache:
the sum of the valid V rows (for V-mean compensation) and, when a tile size is set, the sum of the
valid keys of each key tile (the decode tile gate scores the tile means).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp


class LayerKV(NamedTuple):
    """One layer's cache after a write: full K and V plus its running sums."""

    k: jax.Array  # [B, S, H, D]
    v: jax.Array
    v_sum: jax.Array  # [B, H, D] float32: sum of the valid V rows
    k_tile_sum: jax.Array | None  # [B, nk, H, D] float32: per-tile sum of valid keys, or None


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, written slot by slot.

    k, v: [L, B, S, H, D] in the compute dtype. `key_valid` [B, S] marks slots that hold a real
    token (left padding and unwritten slots are False). `index` is the next slot to write (shared by
    the batch), `next_position` [B] the position id of each sequence's next token. `v_sum`
    [L, B, H, D] and `k_tile_sum` [L, B, nk, H, D] (None without a tile size) are float32 sums of
    the valid rows, updated as tokens arrive.
    """

    k: jax.Array
    v: jax.Array
    key_valid: jax.Array
    index: jax.Array
    next_position: jax.Array
    v_sum: jax.Array
    k_tile_sum: jax.Array | None = None
    tile_size: int | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def empty(cls, *, n_layer: int, batch: int, max_len: int, n_head: int, head_dim: int, dtype,
              tile_size: int | None = None) -> "KVCache":
        shape = (n_layer, batch, max_len, n_head, head_dim)
        tiles = None
        if tile_size:
            tiles = jnp.zeros((n_layer, batch, -(-max_len // tile_size), n_head, head_dim), jnp.float32)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            key_valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((batch,), jnp.int32),
            v_sum=jnp.zeros((n_layer, batch, n_head, head_dim), jnp.float32),
            k_tile_sum=tiles,
            tile_size=tile_size,
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def layer_update(self, layer: int, k_new: jax.Array, v_new: jax.Array, valid: jax.Array) -> LayerKV:
        """This layer's cache with `k_new`/`v_new` [B, T, H, D] written at `index`; `valid` [B, T]
        marks the real (non-padding) new tokens, the only ones the running sums count."""
        start = (0, self.index, 0, 0)
        k = jax.lax.dynamic_update_slice(self.k[layer], k_new.astype(self.k.dtype), start)
        v = jax.lax.dynamic_update_slice(self.v[layer], v_new.astype(self.v.dtype), start)
        weight = valid.astype(jnp.float32)[..., None, None]
        v_sum = self.v_sum[layer] + (v_new.astype(jnp.float32) * weight).sum(axis=1)
        k_tile_sum = None
        if self.k_tile_sum is not None:
            tiles = (self.index + jnp.arange(k_new.shape[1])) // self.tile_size
            k_tile_sum = self.k_tile_sum[layer].at[:, tiles].add(k_new.astype(jnp.float32) * weight)
        return LayerKV(k, v, v_sum, k_tile_sum)

    def tile_counts(self, key_valid: jax.Array) -> jax.Array:
        """Valid keys per tile, float32 [B, nk] (the divisor of the tile means)."""
        b, s = key_valid.shape
        nk = self.k_tile_sum.shape[2]
        padded = jnp.pad(key_valid, ((0, 0), (0, nk * self.tile_size - s)))
        return padded.reshape(b, nk, self.tile_size).sum(axis=-1).astype(jnp.float32)

"""A fixed-size KV cache as a pure pytree, so a jitted decode loop never changes shape (no recompiles)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, written slot by slot.

    k, v: [L, B, S, H, D] in the compute dtype. `key_valid` [B, S] marks slots that hold a real
    token (left padding and unwritten slots are False). `index` is the next slot to write (shared by
    the batch), `next_position` [B] the position id of each sequence's next token.
    """

    k: jax.Array
    v: jax.Array
    key_valid: jax.Array
    index: jax.Array
    next_position: jax.Array

    @classmethod
    def empty(cls, *, n_layer: int, batch: int, max_len: int, n_head: int, head_dim: int, dtype) -> "KVCache":
        shape = (n_layer, batch, max_len, n_head, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            key_valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def layer_update(self, layer: int, k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, jax.Array]:
        """This layer's full K and V with `k_new`/`v_new` [B, T, H, D] written at `index`."""
        start = (0, self.index, 0, 0)
        k = jax.lax.dynamic_update_slice(self.k[layer], k_new.astype(self.k.dtype), start)
        v = jax.lax.dynamic_update_slice(self.v[layer], v_new.astype(self.v.dtype), start)
        return k, v

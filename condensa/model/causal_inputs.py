"""What a decoder-only model derives from its inputs before the first layer, shared across families.

Position ids (counting real tokens only, as HF does with padding), the visibility mask `attend`
takes, and, with a KV cache, the per-layer cache write plus the `DecodeState` that decode kernels
read. `CausalLM.__call__` (the call of `GPT2` and `Llama`) runs `causal_inputs` before its first
layer and `updated_cache` after its last, so every family shares the cache and generation machinery.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from condensa.attention.decode_state import DecodeState
from condensa.model.kv_cache import KVCache, LayerKV


class CausalInputs(NamedTuple):
    mask: jax.Array  # bool [B, T]: real (non-padding) new tokens
    positions: jax.Array  # int [B, T]: position ids of the new tokens
    visible: jax.Array  # bool [B, 1, T, T or S]: key j visible to query i
    plain_causal: bool  # static: no padding and no cache, so fused kernels may skip the mask
    key_valid: jax.Array | None  # bool [B, S]: cache slots holding a token, after this write
    # cache_write(layer, k, v) -> (the layer's cache after the write, the DecodeState decode kernels
    # read or None, the keys and values attention reads: the whole cache, or the new ones alone)
    cache_write: Callable[[int, jax.Array, jax.Array], tuple[LayerKV, DecodeState | None, tuple]] | None
    # a left-padded prompt run with its real tokens moved to the front (see `causal_inputs`):
    # to_front(x [B, T, ...]) moves them there, to_back(x) undoes it; None otherwise
    to_front: Callable[[jax.Array], jax.Array] | None = None
    to_back: Callable[[jax.Array], jax.Array] | None = None


def _rolled(x: jax.Array, shift: jax.Array) -> jax.Array:
    """Row b of x [B, T, ...] rotated left by shift[b] along T."""
    index = (jnp.arange(x.shape[1])[None, :] + shift[:, None]) % x.shape[1]
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def causal_inputs(input_ids: jax.Array, attention_mask: jax.Array | None, cache: KVCache | None, *,
                  prompt: bool = False, left_padded: bool = False) -> CausalInputs:
    """Positions, visibility and the cache writer for `input_ids` [B, T] appended at `cache.index`.

    `prompt`: the cache holds nothing yet, so the new tokens see only each other. Attention then
    reads their own k and v under the plain causal mask, as without a cache, and the fused prefill
    paths (cuDNN, the prefill kernel) apply instead of the reference op over every cache slot.
    `left_padded` (with `prompt` and a mask whose zeros all lead each row): the model runs each row
    with its real tokens moved to the front, so the padding trails them, where the plain causal
    mask already hides it from every real token; the fused paths then apply to padded batches too.
    The cache still gets each token in its own slot."""
    b, t = input_ids.shape
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None or prompt:
        to_front = to_back = None
        seen, plain = mask, attention_mask is None  # what each row's queries may see, under the causal mask
        if prompt and left_padded and attention_mask is not None:
            pads = t - mask.sum(axis=1)
            to_front, to_back = functools.partial(_rolled, shift=pads), functools.partial(_rolled, shift=-pads)
            seen, plain = jnp.ones_like(mask), True  # real tokens first: the causal mask alone hides the padding
        positions = jnp.maximum(jnp.cumsum(seen, axis=1) - 1, 0)
        causal = jnp.tril(jnp.ones((t, t), bool))
        visible = causal[None, None] & seen[:, None, None, :]
        if cache is None:
            return CausalInputs(mask, positions, visible, plain, None, None)
        key_valid = jax.lax.dynamic_update_slice(cache.key_valid, mask, (0, cache.index))
        in_slots = (lambda x: x) if to_back is None else to_back

        def prompt_write(i, k, v):  # each token into its own slot; attention reads k, v as they came
            return cache.layer_update(i, in_slots(k), in_slots(v), mask), None, (k, v)

        return CausalInputs(mask, positions, visible, plain, key_valid, prompt_write, to_front, to_back)

    positions = jnp.maximum(cache.next_position[:, None] + jnp.cumsum(mask, axis=1) - 1, 0)
    key_valid = jax.lax.dynamic_update_slice(cache.key_valid, mask, (0, cache.index))
    slots = jnp.arange(cache.max_len)
    query_slots = cache.index + jnp.arange(t)
    visible = (slots[None, :] <= query_slots[:, None])[None, None] & key_valid[:, None, None, :]
    lengths = jnp.full((b,), cache.index + t, jnp.int32)
    starts = jnp.argmax(key_valid, axis=1).astype(jnp.int32)
    v_count = jnp.maximum(key_valid.sum(axis=1), 1).astype(jnp.float32)[:, None, None]
    tile_count = None if cache.k_tile_sum is None else jnp.maximum(cache.tile_counts(key_valid), 1.0)

    def cache_write(i, k, v):
        layer = cache.layer_update(i, k, v, mask)
        k_tile_mean = None if tile_count is None else layer.k_tile_sum / tile_count[..., None, None]
        return layer, DecodeState(lengths, starts, layer.v_sum / v_count, k_tile_mean), (layer.k, layer.v)

    return CausalInputs(mask, positions, visible, False, key_valid, cache_write)


def updated_cache(cache: KVCache, layers: list[LayerKV], inputs: CausalInputs) -> KVCache:
    """The cache after every layer wrote its new K/V (`layers`, one `LayerKV` per layer)."""
    stacked = LayerKV(*(None if x[0] is None else jnp.stack(x) for x in zip(*layers)))
    t = inputs.mask.shape[1]
    return cache.replace(
        k=stacked.k, v=stacked.v, v_sum=stacked.v_sum, k_tile_sum=stacked.k_tile_sum, key_valid=inputs.key_valid,
        index=cache.index + t, next_position=cache.next_position + inputs.mask.sum(axis=1).astype(jnp.int32),
    )

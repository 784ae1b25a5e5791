"""Dense decode attention to time a decode kernel against (XLA, cuDNN, JAX's Pallas decode
kernel), and what a KV cache keeps beside K and V for the gated kernel (the tile-mean keys and the
mean V row). Shared by the decode benchmark and the study's timing stage."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnums=3)
def tile_state(k, v, lengths, block_k):
    """What the KV cache keeps beside K and V: k̄ per tile [B, nk, H, D] over the valid keys and
    v̄ [B, 1, H, D] (the mean of the valid V rows), both float32."""
    return _tile_means(k, lengths, block_k), _v_mean(v, lengths)


def _tile_means(k, lengths, block_k):
    b, s, h, d = k.shape
    valid = (jnp.arange(s)[None, :] < lengths[:, None]).astype(jnp.float32)
    sums = jnp.einsum("bs,bshd->bshd", valid, k.astype(jnp.float32)).reshape(b, s // block_k, block_k, h, d).sum(2)
    counts = valid.reshape(b, s // block_k, block_k).sum(-1)
    return sums / jnp.maximum(counts, 1.0)[:, :, None, None]


def _v_mean(v, lengths):
    valid = (jnp.arange(v.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)
    return (jnp.einsum("bs,bshd->bhd", valid, v.astype(jnp.float32)) / lengths[:, None, None])[:, None]


def dense_baselines(baselines: Sequence[str], scale: float) -> dict[str, Callable]:
    """name -> function (q, k, v, k_t, v_t, lengths) -> output. k_t/v_t: [B·H, S, D] copies for
    JAX's Pallas decode kernel (laid out once, outside the timing)."""
    out: dict[str, Callable] = {}

    if "xla" in baselines:
        @jax.jit
        def xla(q, k, v, k_t, v_t, lengths):
            a = jnp.einsum("bhd,bshd->bhs", q[:, 0], k, preferred_element_type=jnp.float32) * scale
            a = jnp.where(jnp.arange(k.shape[1])[None, None, :] < lengths[:, None, None], a, -jnp.inf)
            p = jax.nn.softmax(a, axis=-1).astype(v.dtype)
            return jnp.einsum("bhs,bshd->bhd", p, v, preferred_element_type=jnp.float32)[:, None].astype(v.dtype)
        out["xla"] = xla
    if "cudnn" in baselines:
        @jax.jit
        def cudnn(q, k, v, k_t, v_t, lengths):
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn",
                                                query_seq_lengths=jnp.ones_like(lengths),
                                                key_value_seq_lengths=lengths)
        out["cudnn"] = cudnn
    if "pallas_decode" in baselines:
        from jax.experimental.pallas.ops.gpu.decode_attention import mqa  # GPU-only module: imported when asked for

        @jax.jit
        def pallas_decode(q, k, v, k_t, v_t, lengths):
            b, _, h, d = q.shape
            o = mqa(q.reshape(b * h, 1, d), k_t, v_t, kv_seq_len=jnp.repeat(lengths, h), sm_scale=scale)
            return o.reshape(b, 1, h, d)
        out["pallas_decode"] = pallas_decode
    return out


def head_major(x):
    """[B, S, H, D] -> [B·H, S, D], the layout JAX's Pallas decode kernel reads."""
    b, s, h, d = x.shape
    return jnp.swapaxes(x, 1, 2).reshape(b * h, s, d)

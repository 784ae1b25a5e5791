"""Dense causal attention in plain jax.numpy: the reference every other mode is measured against."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_scores(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """Scaled logits `a = scale * q k^T` as float32 [B, H, Tq, Tk], whatever the input dtype.

    The product is accumulated in float32 so that thresholds (also float32) compare against the
    same numbers on every backend.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    return scores * jnp.float32(scale)


def masked_softmax(scores: jax.Array, visible: jax.Array) -> jax.Array:
    """Softmax over visible keys only. Rows with no visible key (padding queries) give zeros, not NaN."""
    neg = jnp.finfo(scores.dtype).min
    probs = jax.nn.softmax(jnp.where(visible, scores, neg), axis=-1)
    return jnp.where(visible, probs, 0.0)


def weighted_values(probs: jax.Array, v: jax.Array) -> jax.Array:
    """`P V` back in the [B, Tq, H, D] layout and in V's dtype."""
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype)


def dense_attention(q, k, v, visible, scale):
    """Returns `(out [B,Tq,H,D], probs [B,H,Tq,Tk] float32)` for the given visibility mask."""
    probs = masked_softmax(attention_scores(q, k, scale), visible)
    return weighted_values(probs, v), probs

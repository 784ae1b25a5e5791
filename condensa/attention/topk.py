"""Exact top-k attention (Gupta et al. 2021): the oracle that Top-θ approximates."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from condensa.attention.dense import masked_softmax


def topk_keep(scores: jax.Array, allowed: jax.Array, k: int) -> jax.Array:
    """bool mask of the k largest allowed scores per row; ties go to the lower key index.

    `jax.lax.top_k` puts equal values in index order, so the selection is deterministic and
    matches a stable NumPy argsort. Rows with at most k allowed keys keep all of them.
    """
    tk = scores.shape[-1]
    if k >= tk:
        return jnp.broadcast_to(allowed, scores.shape)
    masked = jnp.where(allowed, scores, -jnp.inf)
    _, idx = jax.lax.top_k(masked, k)
    chosen = jnp.put_along_axis(jnp.zeros(scores.shape, bool), idx, True, axis=-1, inplace=False)
    return chosen & allowed


def topk_probs(scores: jax.Array, allowed: jax.Array, k: int) -> jax.Array:
    """Softmax over the k largest allowed scores of each row, float32 [B, H, Tq, Tk]."""
    return masked_softmax(scores, topk_keep(scores, allowed, k))


def topk_unnormalised_probs(scores: jax.Array, allowed: jax.Array, k: int) -> jax.Array:
    """Top-k with exact SDC: the softmax over all allowed scores, kept on the k largest and zero
    elsewhere, not renormalised (the kept probabilities sum to less than 1). This is how the Top-θ
    reference runs top-k at calibration for post-softmax placement, whose Top-θ does not renormalise."""
    return jnp.where(topk_keep(scores, allowed, k), masked_softmax(scores, allowed), 0.0)

"""Cutting a tile choice down to its budget: the shared rule of every capped or budgeted selector."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cap_at_budget(chosen: jax.Array, scores: jax.Array, budget) -> jax.Array:
    """`chosen` [..., n] cut to at most `budget` (int, broadcast over the leading axes) entries per
    row: the ones with the largest scores. A tile survives when its score is strictly above the
    (budget+1)-th largest chosen score, so ties at the cut all go and every backend keeps the same
    set. Rows with no more chosen entries than their budget are unchanged.

    This is the tile gate's cap (`tile_cap`): a calibrated Θ whose scores sit in a flat bulk keeps
    most tiles of a long row (the first T = 8k run of docs/benchmarks.md), so the budget only
    becomes a bound on work when the gate also ranks."""
    ranked = jnp.where(chosen, scores.astype(jnp.float32), -jnp.inf)
    ordered = -jnp.sort(-ranked, axis=-1)  # descending
    n = ordered.shape[-1]
    budget = jnp.broadcast_to(jnp.asarray(budget, jnp.int32), ordered.shape[:-1])
    cut = jnp.take_along_axis(ordered, jnp.minimum(budget, n - 1)[..., None], axis=-1)
    cut = jnp.where(budget[..., None] >= n, -jnp.inf, cut)
    return chosen & (ranked > cut)

"""Two tile helpers of the reference ops: a tile mask expanded to elements, and the exact top-m
tiles (the oracle's choice, and the exact gate's in calibration). The geometry itself, shared with
the kernels, lives in `condensa.kernels.tiling`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from condensa.kernels.tiling.geometry import mandatory_tiles, optional_tiles, tile_budgets


def expand_tiles(tile_mask: jax.Array, block_q: int, block_k: int, tq: int, tk: int) -> jax.Array:
    """A per-tile array [..., nq, nk] repeated to elements [..., tq, tk] (partial tiles cut)."""
    out = jnp.repeat(jnp.repeat(tile_mask, block_q, axis=-2), block_k, axis=-1)
    return out[..., :tq, :tk]


def top_m_tiles(tile_scores: jax.Array, block_q: int, block_k: int, tile_budget: float, sink_tiles: int = 1) -> jax.Array:
    """bool [..., nq, nk]: the mandatory tiles plus, per query tile b, the m_b optional tiles with
    the largest score (ties to the lower tile index). With true tile masses this is the oracle
    the gate is measured against (and the tile loss's kept set); with pooled gate scores it is the
    exact gate that calibration uses."""
    nq, nk = tile_scores.shape[-2:]
    mandatory = mandatory_tiles(nq, nk, block_q, block_k, sink_tiles)
    optional = optional_tiles(nq, nk, block_q, block_k, sink_tiles)
    masked = jnp.where(optional, tile_scores, -jnp.inf)
    ranks = jnp.argsort(jnp.argsort(-masked, axis=-1, stable=True), axis=-1, stable=True)
    budgets = tile_budgets(nq, tile_budget)[:, None]
    return mandatory | (optional & (ranks < budgets))

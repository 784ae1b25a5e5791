"""Tile geometry shared by the tile gate, the tile losses, the metrics and the kernels.

Kernels work on `block_q x block_k` tiles of the attention matrix, so sparsity only pays when whole
tiles can be skipped. Everything here uses the prefill layout: query row i and key column j are
both absolute positions starting at 0 (causal: j <= i). A last, partial tile is allowed.
Static tile patterns (visible, mandatory) are NumPy arrays, so they are constants under jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from condensa.tiling.geometry import (  # noqa: F401  (re-exported: the attention package's tile vocabulary)
    diagonal_tiles, mandatory_tiles, optional_tiles, tile_budget, tile_budgets, tile_count, visible_tiles,
)
from condensa.tiling.pooling import pooled_gate_scores, tile_masses, tile_means  # noqa: F401  (re-exported)


def expand_tiles(tile_mask: jax.Array, block_q: int, block_k: int, tq: int, tk: int) -> jax.Array:
    """A per-tile array [..., nq, nk] repeated to elements [..., tq, tk] (partial tiles cut)."""
    out = jnp.repeat(jnp.repeat(tile_mask, block_q, axis=-2), block_k, axis=-1)
    return out[..., :tq, :tk]


def key_tile_of(position: jax.Array | int, block_k: int):
    """Index of the key tile that holds `position`."""
    return position // block_k


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

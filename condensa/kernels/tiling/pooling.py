"""Tile means, the pooled gate score and the true tile masses: the per-tile summaries that the
reference ops, the losses, the metrics and the tile selectors all read.

They sit in `condensa.kernels.tiling` so that the selectors below the kernels use the same definitions
as `condensa.attention`, instead of a copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from condensa.kernels.tiling.geometry import tile_count


def _pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    size = x.shape[axis]
    extra = tile_count(size, multiple) * multiple - size
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def tile_means(x: jax.Array, block: int, valid: jax.Array | None = None) -> jax.Array:
    """Mean of each tile of rows: x [B, T, H, D] -> float32 [B, ceil(T/block), H, D].

    `valid` [B, T] (optional) leaves out rows that hold no token (padding, empty cache slots); a
    tile with no valid row gets zeros. A partial last tile averages over the rows it has.
    """
    b, t = x.shape[:2]
    valid = jnp.ones((b, t), bool) if valid is None else jnp.broadcast_to(valid, (b, t))
    nt = tile_count(t, block)
    weights = _pad_axis(valid.astype(jnp.float32), 1, block).reshape(b, nt, block)
    rows = _pad_axis(x.astype(jnp.float32), 1, block).reshape(b, nt, block, *x.shape[2:])
    sums = jnp.einsum("bnr,bnrhd->bnhd", weights, rows)
    counts = weights.sum(axis=2)[:, :, None, None]
    return sums / jnp.maximum(counts, 1.0)


def pooled_gate_scores(
    q: jax.Array, k: jax.Array, scale: float, block_q: int, block_k: int, key_valid: jax.Array | None = None
) -> jax.Array:
    """Gate scores `s_bt = scale * mean_q(tile b) . mean_k(tile t)`, float32 [B, H, nq, nk].

    q [B, Tq, H, D], k [B, Tk, H, D]. This is the cheap stand-in for the true tile mass: one dot
    product per tile pair instead of block_q * block_k. No causal mask is applied here.
    """
    q_bar = tile_means(q, block_q)
    k_bar = tile_means(k, block_k, key_valid)
    return jnp.einsum("bqhd,bkhd->bhqk", q_bar, k_bar) * jnp.float32(scale)


def tile_masses(probs: jax.Array, block_q: int, block_k: int) -> jax.Array:
    """Tile masses `M_bt = mean_{i in b} sum_{j in t} p_ij`: probs [B, H, Tq, Tk] -> [B, H, nq, nk].

    The mean runs over the real rows of a partial last query tile (padding adds nothing to a sum).
    """
    tq, tk = probs.shape[-2:]
    nq, nk = tile_count(tq, block_q), tile_count(tk, block_k)
    p = _pad_axis(_pad_axis(probs.astype(jnp.float32), -2, block_q), -1, block_k)
    sums = p.reshape(*p.shape[:-2], nq, block_q, nk, block_k).sum(axis=(-3, -1))
    rows = np.minimum(block_q, tq - np.arange(nq) * block_q).astype(np.float32)
    return sums / rows[:, None]

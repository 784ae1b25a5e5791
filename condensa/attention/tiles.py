"""Tile geometry shared by the tile gate, the tile losses, the metrics and the kernels.

Kernels work on `block_q x block_k` tiles of the attention matrix, so sparsity only pays when whole
tiles can be skipped. Everything here uses the prefill layout: query row i and key column j are
both absolute positions starting at 0 (causal: j <= i). A last, partial tile is allowed.
Static tile patterns (visible, mandatory) are NumPy arrays, so they are constants under jit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def tile_count(length: int, block: int) -> int:
    """Number of tiles of `block` that cover `length` positions (the last one may be partial)."""
    return -(-int(length) // int(block))


def tile_budget(b: int, f: float) -> int:
    """m_b = max(1, ceil(f * (b + 1))): how many non-mandatory key tiles query tile b may keep.

    The product is rounded to 9 decimals first so that e.g. 0.1 * 30 counts as 3, not 4.
    """
    return max(1, math.ceil(round(float(f) * (int(b) + 1), 9)))


def tile_budgets(n_tiles: int, f: float) -> np.ndarray:
    """`tile_budget(b, f)` for b = 0..n_tiles-1, as int32 [n_tiles]."""
    return np.asarray([tile_budget(b, f) for b in range(n_tiles)], np.int32)


def visible_tiles(nq: int, nk: int, block_q: int, block_k: int) -> np.ndarray:
    """bool [nq, nk]: key tile t holds at least one key that some query of query tile b may see."""
    last_row = (np.arange(nq) + 1) * block_q - 1
    first_col = np.arange(nk) * block_k
    return first_col[None, :] <= last_row[:, None]


def diagonal_tiles(nq: int, nk: int, block_q: int, block_k: int) -> np.ndarray:
    """bool [nq, nk]: key tiles that overlap query tile b's own positions (the causal diagonal
    runs through them, so they are partly visible and always hold each row's own key)."""
    q_lo = np.arange(nq) * block_q
    q_hi = q_lo + block_q - 1
    k_lo = np.arange(nk) * block_k
    k_hi = k_lo + block_k - 1
    return (k_lo[None, :] <= q_hi[:, None]) & (k_hi[None, :] >= q_lo[:, None])


def mandatory_tiles(nq: int, nk: int, block_q: int, block_k: int, sink_tiles: int = 1) -> np.ndarray:
    """bool [nq, nk]: tiles the gate always keeps: the diagonal tile(s) and the first `sink_tiles`
    key tiles (attention sinks), wherever they are causally visible."""
    sinks = np.zeros((nq, nk), bool)
    sinks[:, : max(0, int(sink_tiles))] = True
    return (diagonal_tiles(nq, nk, block_q, block_k) | sinks) & visible_tiles(nq, nk, block_q, block_k)


def optional_tiles(nq: int, nk: int, block_q: int, block_k: int, sink_tiles: int = 1) -> np.ndarray:
    """bool [nq, nk]: visible tiles that are not mandatory, i.e. the ones the gate chooses among."""
    return visible_tiles(nq, nk, block_q, block_k) & ~mandatory_tiles(nq, nk, block_q, block_k, sink_tiles)


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

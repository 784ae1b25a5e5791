"""Tile geometry: how a causal attention matrix is cut into `block_q x block_k` tiles.

Query row i and key column j are absolute positions from 0 (causal: j <= i); a last, partial tile
is allowed. Static patterns (visible, mandatory) are NumPy arrays, so they are constants under jit.
This sits below the reference ops and the kernels alike, so both see one definition.
"""

from __future__ import annotations

import math

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

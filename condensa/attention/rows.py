"""Per-row helpers shared by the sparse rules: row lengths, threshold lookup, the empty-row rule,
and row chunks for the passes that work through long sequences a chunk of rows at a time."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_lengths(visible: jax.Array) -> jax.Array:
    """n_i, the number of visible keys of each query row: int32 [B, Tq].

    In prefill this is i + 1 (fewer with left padding); while decoding it is the number of cached
    keys. Looking thresholds up by n_i is what makes decode and prefill prune alike.
    """
    return visible[:, 0].sum(axis=-1).astype(jnp.int32)


def lookup_by_length(table: jax.Array, n: jax.Array) -> jax.Array:
    """`table[h, n - 1]` for every row: table [H, N], n [B, Tq] -> float32 [B, H, Tq].

    Lengths past the table take its last entry (nearest calibrated length).
    """
    idx = jnp.clip(n - 1, 0, table.shape[-1] - 1)
    return jnp.take(jnp.asarray(table, jnp.float32), idx, axis=1).transpose(1, 0, 2)


def masked_max(scores: jax.Array, allowed: jax.Array) -> jax.Array:
    """Row max over allowed entries, [..., 1]; 0 for rows with nothing allowed (keeps exp finite)."""
    m = jnp.max(jnp.where(allowed, scores, -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(jnp.isfinite(m), m, 0.0)


def keep_largest_if_empty(keep: jax.Array, scores: jax.Array, allowed: jax.Array) -> jax.Array:
    """DESIGN.md's empty-row rule: a row where nothing survives keeps its single largest allowed
    element (the first one on a tie). Rows with nothing allowed (padding) stay empty."""
    best = jnp.argmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
    best_mask = jax.nn.one_hot(best, scores.shape[-1], dtype=bool) & allowed
    empty = ~keep.any(axis=-1, keepdims=True)
    return keep | (empty & best_mask)


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den with 0 where den is 0 (rows with nothing kept), so no NaN ever leaves a rule."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def split_rows(x: jax.Array, axis: int, chunks: int) -> jax.Array:
    """[..., T, ...] -> [chunks, ..., T / chunks, ...]: `chunks` equal row chunks along `axis`, for lax.map."""
    x = x.reshape(*x.shape[:axis], chunks, x.shape[axis] // chunks, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def join_rows(x: jax.Array, axis: int) -> jax.Array:
    """The inverse of `split_rows` for lax.map's stacked results: [chunks, ..., rows, ...] with the
    rows at `axis` of each chunk -> [..., chunks * rows, ...]."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])

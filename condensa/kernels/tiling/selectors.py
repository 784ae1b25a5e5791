"""Tile selectors: rank the optional key tiles of each query tile, so a budget of them can be kept.

Every selector here keeps the mandatory tiles (the diagonal and the sinks) and the `m_b` optional
tiles with the highest score (`cap_at_budget`), so all of them run at the same tile count and a
table can put each between the floor (`window`) and the ceiling (`oracle`). They differ in the
score, and in what it costs:
- `oracle`: the true tile mass `M_bt = mean_{i in b} sum_{j in t} p_ij` (needs the full attention:
  the ceiling, for reports only);
- `window`: recency, so the most recent tiles before the diagonal (the simplest rule);
- `pooled`: `q̄_b · k̄_t`, the mean query of the tile against the mean key (the old gate's score).
  With rotary embeddings a 128-position mean nearly cancels every fast-rotating dimension, which
  is one reason it fails on real models;
- `rowmean`, `moment`, `bound`: each query row scores each key tile from a few statistics of the
  tile's keys, turns the scores into an estimated share of the row's attention (a softmax over
  the row's visible tiles), and the query tile averages the shares: an estimate of `M_bt`, the
  quantity the oracle ranks by. `rowmean` uses the mean key (`q_i·k̄_t`; the first-order estimate of
  log Σ_j exp(q_i·k_j)); `moment` adds the per-channel key variance (`+ ½ Σ_d q_id² σ²_td`, exact
  for Gaussian scores); `bound` uses Quest's upper bound on the tile's largest score from the
  per-channel key min and max. Each costs T · (T / b_k) · D per head: a 1/b_k fraction of attention.
  With `sub_block` s, the keys are summarised in sub-blocks of s (a tile's estimate is the
  log-sum-exp of its sub-blocks'): a 1/s fraction of attention.
- `sampled`: the oracle's own tile mass, measured exactly on a few evenly spaced rows of each
  query tile (`sub_block` of them, default 4): rows / b_q of the score matrix.

Tensors use the attention layout: q [B, T, H, D], k [B, T, Hkv, D] (Hkv divides H: GQA). Keys are
at absolute positions 0..T-1, queries too (prefill).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from condensa.kernels.tiling.budget import cap_at_budget
from condensa.kernels.tiling.geometry import mandatory_tiles, optional_tiles, tile_budgets, tile_count
from condensa.kernels.tiling.pooling import pooled_gate_scores, tile_masses

SELECTORS = ("oracle", "window", "pooled", "rowmean", "moment", "bound", "sampled")
ROW_SELECTORS = ("rowmean", "moment", "bound")  # the ones scored per query row from key-tile statistics


def _tiles_of(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """x [B, T, H, D] -> (float32 [B, n, block, H, D] zero-padded, bool [n, block] real rows)."""
    b, t = x.shape[:2]
    n = tile_count(t, block)
    padded = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, n * block - t)] + [(0, 0)] * (x.ndim - 2))
    real = (np.arange(n * block) < t).reshape(n, block)
    return padded.reshape(b, n, block, *x.shape[2:]), real


def key_tile_stats(k: jax.Array, block_k: int) -> dict[str, jax.Array]:
    """Per key tile and channel: mean, variance, min and max over the tile's keys, each float32
    [B, nk, Hkv, D], and the number of keys in each tile [nk]. This is all a row selector reads
    from K, and what a KV cache would keep per tile for decoding."""
    tiles, real = _tiles_of(k, block_k)
    mask = jnp.asarray(real)[None, :, :, None, None]
    count = real.sum(axis=1).astype(np.float32)
    c = jnp.asarray(count)[None, :, None, None]
    mean = jnp.where(mask, tiles, 0.0).sum(axis=2) / c
    var = jnp.where(mask, (tiles - mean[:, :, None]) ** 2, 0.0).sum(axis=2) / c
    lo = jnp.where(mask, tiles, jnp.inf).min(axis=2)
    hi = jnp.where(mask, tiles, -jnp.inf).max(axis=2)
    return {"mean": mean, "var": var, "min": lo, "max": hi, "count": count}


def _per_query_head(stat: jax.Array, heads: int) -> jax.Array:
    """[B, nk, Hkv, D] -> [B, nk, H, D]: each KV head's statistics for its group of query heads."""
    return jnp.repeat(stat, heads // stat.shape[2], axis=2)


def row_tile_logits(q: jax.Array, stats: dict[str, jax.Array], *, scale: float, selector: str) -> jax.Array:
    """float32 [B, H, Tq, nk]: each query row's estimated log attention mass in each key tile, before
    the causal mask (log of the tile's key count plus the selector's score)."""
    heads = q.shape[2]
    qf = q.astype(jnp.float32)
    mean = _per_query_head(stats["mean"], heads)
    if selector == "rowmean":
        logits = jnp.einsum("bihd,bthd->bhit", qf, mean) * scale
    elif selector == "moment":
        var = _per_query_head(stats["var"], heads)
        logits = jnp.einsum("bihd,bthd->bhit", qf, mean) * scale + 0.5 * scale**2 * jnp.einsum(
            "bihd,bthd->bhit", qf * qf, var)
    elif selector == "bound":  # max_k q·k <= Σ_d max(q_d max_d, q_d min_d) = q⁺·max + q⁻·min
        hi, lo = _per_query_head(stats["max"], heads), _per_query_head(stats["min"], heads)
        logits = (jnp.einsum("bihd,bthd->bhit", jnp.maximum(qf, 0.0), hi)
                  + jnp.einsum("bihd,bthd->bhit", jnp.minimum(qf, 0.0), lo)) * scale
    else:
        raise ValueError(f"{selector!r} is not a row selector; one of {', '.join(ROW_SELECTORS)}")
    return logits + jnp.log(jnp.asarray(stats["count"]))


def estimated_tile_mass(q: jax.Array, k: jax.Array, *, scale: float, block_q: int, block_k: int,
                        selector: str, sub_block: int | None = None) -> jax.Array:
    """float32 [B, H, nq, nk]: a row selector's estimate of `M_bt` (rows' estimated shares of their
    attention in key tile t, averaged over query tile b; zero where t is not visible).

    `sub_block` (a divisor of `block_k`; default the whole tile) summarises the keys in sub-blocks
    of that many: each row scores every sub-block and a tile's log mass is the log-sum-exp of its
    sub-blocks. Smaller sub-blocks keep more of what a 128-key mean averages away (the fast
    rotary dimensions, a few strong keys) at a proportional cost."""
    tq, tk = q.shape[1], k.shape[1]
    sub = block_k if sub_block is None else int(sub_block)
    if sub < 1 or block_k % sub:
        raise ValueError(f"sub_block={sub} must divide block_k={block_k}")
    ns, r = tile_count(tk, sub), block_k // sub
    nk = tile_count(tk, block_k)
    logits = row_tile_logits(q, key_tile_stats(k, sub), scale=scale, selector=selector)  # [B, H, Tq, ns]
    started = (np.arange(ns)[None, :] * sub) <= np.arange(tq)[:, None]  # [Tq, ns]: sub-block starts by row i
    logits = jnp.where(started, logits, -jnp.inf)
    logits = jnp.pad(logits, [(0, 0)] * 3 + [(0, nk * r - ns)], constant_values=-jnp.inf)
    logits = jax.nn.logsumexp(logits.reshape(*logits.shape[:3], nk, r), axis=-1)  # [B, H, Tq, nk]
    shares = jax.nn.softmax(logits, axis=-1)  # the diagonal tile is started by every row of its tile
    rows, real = _tiles_of(jnp.moveaxis(shares, 2, 1), block_q)  # [B, nq, block_q, H, nk]
    counts = jnp.asarray(real.sum(axis=1), jnp.float32)[None, :, None, None]
    return jnp.moveaxis(rows.sum(axis=2) / counts, 1, 2)


def sampled_tile_mass(q: jax.Array, k: jax.Array, *, scale: float, block_q: int, block_k: int,
                      rows: int) -> jax.Array:
    """float32 [B, H, nq, nk]: the oracle's tile mass measured on `rows` evenly spaced rows of each
    query tile (offsets (j + 1) · block_q / rows - 1, the last one the tile's last row) instead of
    all of them: exact attention for those rows, summed per key tile and averaged. It costs
    rows / block_q of the score matrix, and it sees what means cannot: single strong keys, and the
    fast rotary dimensions."""
    tq, tk = q.shape[1], k.shape[1]
    if rows < 1 or block_q % rows:
        raise ValueError(f"sampled rows={rows} must divide block_q={block_q}")
    nq, nk = tile_count(tq, block_q), tile_count(tk, block_k)
    picked = np.minimum(np.arange(nq)[:, None] * block_q + (np.arange(rows)[None, :] + 1) * (block_q // rows) - 1,
                        tq - 1).reshape(-1)  # [nq · rows]: a partial last tile samples its last row instead
    k_full = _per_query_head(k, q.shape[2]).astype(jnp.float32)
    scores = jnp.einsum("bihd,bjhd->bhij", q[:, picked].astype(jnp.float32), k_full) * scale
    visible = np.arange(tk)[None, :] <= picked[:, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)  # [B, H, nq·rows, Tk]
    probs = jnp.pad(probs, [(0, 0)] * 3 + [(0, nk * block_k - tk)])
    per_tile = probs.reshape(*probs.shape[:2], nq, rows, nk, block_k).sum(axis=-1)
    return per_tile.mean(axis=3)


def tile_scores(q: jax.Array, k: jax.Array, *, scale: float, block_q: int, block_k: int, selector: str,
                probs: jax.Array | None = None, sub_block: int | None = None) -> jax.Array:
    """float32 [B, H, nq, nk]: the selector's score of each (query tile, key tile); higher is kept
    first. `probs` [B, H, Tq, Tk] (the dense attention) is needed by `oracle` only; `sub_block`
    is the row selectors' key-summary size (`estimated_tile_mass`), and `sampled`'s rows per
    query tile."""
    nq, nk = tile_count(q.shape[1], block_q), tile_count(k.shape[1], block_k)
    if selector == "oracle":
        if probs is None:
            raise ValueError("the oracle selector ranks by the true tile mass: pass the dense probabilities")
        return tile_masses(probs, block_q, block_k)
    if selector == "window":
        return jnp.broadcast_to(jnp.arange(nk, dtype=jnp.float32), (q.shape[0], q.shape[2], nq, nk))
    if selector == "sampled":
        return sampled_tile_mass(q, k, scale=scale, block_q=block_q, block_k=block_k, rows=sub_block or 4)
    if selector == "pooled":  # each query head against its KV head's pooled keys (GQA)
        return pooled_gate_scores(q, _per_query_head(k, q.shape[2]), scale, block_q, block_k)
    return estimated_tile_mass(q, k, scale=scale, block_q=block_q, block_k=block_k, selector=selector,
                               sub_block=sub_block)


def cap_optional(optional: jax.Array, scores: jax.Array, budgets, *, shared_heads: bool = False) -> jax.Array:
    """bool [B, H, R, nk]: the optional tiles each row keeps, the `budgets` (broadcast to [B, R])
    with the highest scores, ties at the cut all going (`cap_at_budget`). A row with no more
    optional tiles than its budget keeps them all. `shared_heads`: the H heads of a row share one
    budget of H · m, given to the (head, tile) pairs with the highest scores."""
    b, h, r, n = scores.shape
    optional = jnp.broadcast_to(optional, scores.shape)
    budgets = jnp.broadcast_to(jnp.asarray(budgets, jnp.int32), (b, r))
    if not shared_heads:
        return cap_at_budget(optional, scores, budgets[:, None, :])
    by_row = lambda x: jnp.moveaxis(x, 1, 2).reshape(b, r, h * n)  # noqa: E731  [B, R, H·nk]
    chosen = cap_at_budget(by_row(optional), by_row(scores), h * budgets)
    return jnp.moveaxis(chosen.reshape(b, r, h, n), 2, 1)


def keep_top_tiles(scores: jax.Array, *, block_q: int, block_k: int, tile_budget: float,
                   sink_tiles: int, shared_heads: bool = False) -> jax.Array:
    """bool [B, H, nq, nk]: the mandatory tiles plus the `m_b` optional tiles with the highest score
    (`cap_optional`, per query tile). A query tile with no more optional tiles than its budget keeps
    them all.

    `shared_heads`: the H heads of a query tile share one budget of H · m_b tiles, given to the
    (head, tile) pairs with the highest scores, so a head whose attention spreads out gets more
    tiles than one that looks at its diagonal. Scores must then be comparable across heads (the
    oracle's masses and the row selectors' estimated shares are)."""
    nq, nk = scores.shape[2:]
    mandatory = mandatory_tiles(nq, nk, block_q, block_k, sink_tiles)
    optional = optional_tiles(nq, nk, block_q, block_k, sink_tiles)
    return mandatory | cap_optional(optional, scores, tile_budgets(nq, tile_budget), shared_heads=shared_heads)


# ---- decoding: one query row per step, scored from what the KV cache keeps per tile ----------------

DECODE_SELECTORS = ("window", "rowmean")  # the budgeted selectors a decoding step can run


def decode_tile_scores(q: jax.Array, k_tile_mean: jax.Array, counts: jax.Array, *, scale: float,
                       selector: str) -> jax.Array:
    """float32 [B, H, R, nk]: a budgeted selector's score of each key tile for decoding query rows
    q [B, R, H, D], from the mean key of each tile k_tile_mean [B, nk, Hkv, D] and the number of keys
    each row sees in each tile, counts [B | 1, R, nk] (0: a tile the row does not see).

    `rowmean` scores each tile with the log of the row's estimated share of its attention (the
    log-softmax over the tiles it sees of `scale · q · k̄_t + log count_t`, as the prefill selector
    does for each row of a query tile), so the scores compare across heads; the log keeps shares
    too small for float32 apart. `window` scores a tile by its index."""
    b, r, h = q.shape[:3]
    nk = k_tile_mean.shape[1]
    if selector == "window":
        return jnp.broadcast_to(jnp.arange(nk, dtype=jnp.float32), (b, h, r, nk))
    if selector != "rowmean":
        raise ValueError(f"{selector!r} does not run while decoding; one of {', '.join(DECODE_SELECTORS)}")
    counts = jnp.asarray(counts, jnp.float32)[:, None]  # [B | 1, 1, R, nk]
    logits = row_tile_logits(q, {"mean": k_tile_mean, "count": counts}, scale=scale, selector="rowmean")
    return jax.nn.log_softmax(logits, axis=-1)  # log(0) = -inf: a tile the row does not see ranks last


def select_tiles(q: jax.Array, k: jax.Array, *, scale: float, block_q: int, block_k: int, tile_budget: float,
                 sink_tiles: int, selector: str, probs: jax.Array | None = None,
                 sub_block: int | None = None, shared_heads: bool = False) -> jax.Array:
    """bool [B, H, nq, nk]: the key tiles each query tile keeps under `selector` at budget f."""
    scores = tile_scores(q, k, scale=scale, block_q=block_q, block_k=block_k, selector=selector, probs=probs,
                         sub_block=sub_block)
    return keep_top_tiles(scores, block_q=block_q, block_k=block_k, tile_budget=tile_budget, sink_tiles=sink_tiles,
                          shared_heads=shared_heads)

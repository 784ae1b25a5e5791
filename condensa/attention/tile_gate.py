"""The tile gate ("Top-θ for tiles"): choose which key tiles each query tile computes at all.

Prefill: query tile b keeps the mandatory tiles (diagonal + sinks) and every other visible key
tile t with `scale * q̄_b · k̄_t > Θ[h, b]`. Decode: the single query is its own tile and uses
`scale * q · k̄_t > Θ_dec[h, t_last]`, t_last being the index of the last visible key tile.
When a query tile has no more optional tiles than its budget m_b, it keeps them all (the tile
analogue of "rows with n <= k stay dense"); the calibration never sees those tiles either.
With `tile_cap`, no query tile (or decoding row) keeps more than m_b optional tiles: the m_b with
the largest gate scores among those above Θ (`cap_at_budget`, shared with the kernels' pre-pass).

`decode_gate_rows` gates every row of a full sequence as its decoding step would, in one pass
(teacher-forced decoding), so that perplexity can measure the decode gate's cost.

Geometry is in key slots: prefill assumes the queries sit at slots 0..Tq-1 (no cache, or a
prompt written into an empty cache); decoding reads the query's slot from `visible`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from condensa.attention.tiles import (
    expand_tiles, mandatory_tiles, optional_tiles, pooled_gate_scores, tile_budgets, tile_count, tile_means,
)
from condensa.errors import ConfigError
from condensa.tiling import cap_at_budget


def key_validity(visible: jax.Array) -> jax.Array:
    """bool [B, Tk]: slots that hold a key some query may see (drops padding and empty cache slots)."""
    return visible.any(axis=(1, 2))


def prefill_kept_tiles(
    q: jax.Array, k: jax.Array, *, scale: float, key_valid: jax.Array, tile_theta: jax.Array,
    block_q: int, block_k: int, tile_budget: float, sink_tiles: int, tile_cap: bool = False,
) -> jax.Array:
    """bool [B, H, nq, nk]: the key tiles each query tile keeps. tile_theta: [H, NQ]."""
    tq, tk = q.shape[1], k.shape[1]
    nq, nk = tile_count(tq, block_q), tile_count(tk, block_k)
    scores = pooled_gate_scores(q, k, scale, block_q, block_k, key_valid)
    mandatory = mandatory_tiles(nq, nk, block_q, block_k, sink_tiles)
    optional = optional_tiles(nq, nk, block_q, block_k, sink_tiles)
    budgets = tile_budgets(nq, tile_budget)
    keep_all = optional.sum(axis=-1) <= budgets  # [nq], static
    rows = np.minimum(np.arange(nq), tile_theta.shape[-1] - 1)
    theta = jnp.asarray(tile_theta, jnp.float32)[:, rows][None, :, :, None]  # [1, H, nq, 1]
    chosen = scores > theta
    if tile_cap:
        chosen = cap_at_budget(chosen & optional, scores, budgets)
    chosen = chosen | keep_all[:, None]
    return mandatory | (optional & chosen)


def decode_kept_tiles(
    q: jax.Array, k: jax.Array, *, scale: float, visible: jax.Array, tile_theta_decode: jax.Array,
    block_k: int, tile_budget: float, sink_tiles: int, tile_cap: bool = False,
) -> jax.Array:
    """bool [B, H, 1, nk] for one query per sequence (q [B, 1, H, D]) against the cached keys."""
    tk = k.shape[1]
    nk = tile_count(tk, block_k)
    key_valid = key_validity(visible)
    k_bar = tile_means(k, block_k, key_valid)  # [B, nk, H, D]: what the KV cache keeps per tile
    scores = jnp.einsum("bhd,bthd->bht", q[:, 0].astype(jnp.float32), k_bar) * jnp.float32(scale)
    row_visible = visible[:, 0, 0]  # [B, Tk]
    last = tk - 1 - jnp.argmax(row_visible[:, ::-1], axis=-1)  # the query's own slot
    last_tile = (last // block_k).astype(jnp.int32)  # [B]
    t = jnp.arange(nk)[None, :]
    sink = jnp.minimum(sink_tiles, last_tile)[:, None]
    mandatory = (t == last_tile[:, None]) | (t < sink)
    optional = (t < last_tile[:, None]) & (t >= sink)
    budget = jnp.asarray(tile_budgets(nk, tile_budget))[last_tile]
    keep_all = optional.sum(axis=-1) <= budget  # [B]
    idx = jnp.minimum(last_tile, tile_theta_decode.shape[-1] - 1)
    theta = jnp.take(jnp.asarray(tile_theta_decode, jnp.float32), idx, axis=1).T  # [B, H]
    chosen = scores > theta[..., None]
    if tile_cap:
        chosen = cap_at_budget(chosen & optional[:, None], scores, budget[:, None])
    chosen = chosen | keep_all[:, None, None]
    kept = mandatory[:, None] | (optional[:, None] & chosen)
    return kept[:, :, None, :]


def decode_gate_scores(q: jax.Array, k: jax.Array, scale: float, block_k: int) -> jax.Array:
    """Single-query gate scores `scale * q_i · k̄_t` for every query row as a decoding query:
    float32 [B, H, T, nk]. Only full tiles before the query's own are optional, so full-tile means
    are what the KV cache holds for them."""
    return jnp.einsum("bihd,bthd->bhit", q.astype(jnp.float32), tile_means(k, block_k)) * jnp.float32(scale)


def decode_gate_layout(t: int, block_k: int, tile_budget: float, sink_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """For query positions i < t decoding: bool [t, nk] optional key tiles and the budget m_i [t]
    (the query sees i // block_k + 1 key tiles, so it uses the budget of that tile count)."""
    nk = tile_count(t, block_k)
    last = np.arange(t) // block_k
    tiles = np.arange(nk)[None, :]
    optional = (tiles < last[:, None]) & (tiles >= np.minimum(sink_tiles, last)[:, None])
    return optional, tile_budgets(nk, tile_budget)[last]


def decode_rows_kept_tiles(
    q: jax.Array, k: jax.Array, *, scale: float, tile_theta_decode: jax.Array, block_k: int, tile_budget: float,
    sink_tiles: int, tile_cap: bool = False,
) -> jax.Array:
    """bool [B, H, T, nk]: the key tiles each query row i keeps when it is gated as the decoding
    step at slot i gates it (`decode_kept_tiles`), for all rows in one pass. This is teacher-forced
    decoding's attention without the T sequential steps, so perplexity can measure the decode gate.
    The queries sit at slots 0..T-1 of q and k (no cache, no padding)."""
    t = q.shape[1]
    optional, budgets = decode_gate_layout(t, block_k, tile_budget, sink_tiles)  # [T, nk], [T]
    last = np.arange(t) // block_k
    tiles = np.arange(optional.shape[-1])[None, :]
    mandatory = (tiles == last[:, None]) | (tiles < np.minimum(sink_tiles, last)[:, None])
    keep_all = optional.sum(axis=-1) <= budgets  # [T]: rows with nothing to choose keep every tile
    rows = np.minimum(last, tile_theta_decode.shape[-1] - 1)
    theta = jnp.asarray(tile_theta_decode, jnp.float32)[:, rows]  # [H, T]
    scores = decode_gate_scores(q, k, scale, block_k)
    chosen = scores > theta[None, :, :, None]
    if tile_cap:
        chosen = cap_at_budget(chosen & optional, scores, budgets)
    return mandatory | (optional & (chosen | keep_all[:, None]))


def selector_kept_tiles(q: jax.Array, k: jax.Array, visible: jax.Array, *, scale: float, config) -> jax.Array:
    """bool [B, H, nq, nk]: the tiles a budgeted selector keeps (`config.tile_selector` other than the
    calibrated gate). Prefill geometry: queries and keys both at slots 0..T-1."""
    from condensa.attention.dense import attention_scores, masked_softmax
    from condensa.tiling.selectors import select_tiles

    tq, tk = q.shape[1], k.shape[1]
    if tq != tk:
        raise ConfigError(f"tile_selector={config.tile_selector!r} selects tiles for prefill (queries at slots "
                          f"0..T-1); this call has {tq} queries against {tk} keys. Use the calibrated gate "
                          "(tile_selector='gate') for decoding.")
    probs = masked_softmax(attention_scores(q, k, scale), visible) if config.tile_selector == "oracle" else None
    return select_tiles(q, k, scale=scale, block_q=config.block_q, block_k=config.block_k,
                        tile_budget=config.tile_budget, sink_tiles=config.sink_tiles,
                        selector=config.tile_selector, probs=probs, sub_block=config.sub_block or None,
                        shared_heads=config.shared_heads)


def gate_mask(
    q: jax.Array, k: jax.Array, visible: jax.Array, *, scale: float, layer, config
) -> jax.Array:
    """Elements [B, H, Tq, Tk] that lie in kept tiles and are visible. `layer`: a LayerThresholds
    (None for the selectors that need none)."""
    tq, tk = q.shape[1], k.shape[1]
    if config.tile_selector != "gate":
        tiles = selector_kept_tiles(q, k, visible, scale=scale, config=config)
        return visible & expand_tiles(tiles, config.block_q, config.block_k, tq, tk)
    if config.decode_gate_rows and tq > 1:
        if tq != tk:
            raise ConfigError(f"decode_gate_rows gates {tq} queries as decoding steps from slot 0, but there are {tk} "
                              "keys; it needs the whole sequence at once (no KV cache).")
        tiles = decode_rows_kept_tiles(
            q, k, scale=scale, tile_theta_decode=layer.tile_theta_decode, block_k=config.block_k,
            tile_budget=config.tile_budget, sink_tiles=config.sink_tiles, tile_cap=config.tile_cap,
        )
        return visible & expand_tiles(tiles, 1, config.block_k, tq, tk)
    if tq == 1:
        tiles = decode_kept_tiles(
            q, k, scale=scale, visible=visible, tile_theta_decode=layer.tile_theta_decode,
            block_k=config.block_k, tile_budget=config.tile_budget, sink_tiles=config.sink_tiles,
            tile_cap=config.tile_cap,
        )
        return visible & expand_tiles(tiles, 1, config.block_k, 1, tk)
    tiles = prefill_kept_tiles(
        q, k, scale=scale, key_valid=key_validity(visible), tile_theta=layer.tile_theta,
        block_q=config.block_q, block_k=config.block_k, tile_budget=config.tile_budget, sink_tiles=config.sink_tiles,
        tile_cap=config.tile_cap,
    )
    return visible & expand_tiles(tiles, config.block_q, config.block_k, tq, tk)

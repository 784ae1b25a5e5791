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

from condensa.attention.dense import attention_scores, masked_softmax
from condensa.attention.tiles import expand_tiles
from condensa.errors import ConfigError
from condensa.kernels.tiling import cap_at_budget, mandatory_tiles, optional_tiles, tile_budgets, tile_count
from condensa.kernels.tiling.pooling import pooled_gate_scores, tile_means
from condensa.kernels.tiling.selectors import (DECODE_SELECTORS, cap_optional, decode_tile_scores, row_tile_logits,
                                               select_tiles)


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
    q: jax.Array, k: jax.Array, *, scale: float, visible: jax.Array, tile_theta_decode: jax.Array | None,
    block_k: int, tile_budget: float, sink_tiles: int, tile_cap: bool = False, selector: str = "gate",
    shared_heads: bool = False,
) -> jax.Array:
    """bool [B, H, 1, nk] for one query per sequence (q [B, 1, H, D]) against the cached keys.
    `selector`: "gate" compares with Θ_dec; a budgeted selector (`DECODE_SELECTORS`) keeps the
    m tiles it scores highest instead, and needs no Θ_dec."""
    tk = k.shape[1]
    nk = tile_count(tk, block_k)
    key_valid = key_validity(visible)
    k_bar = tile_means(k, block_k, key_valid)  # [B, nk, H, D]: what the KV cache keeps per tile
    row_visible = visible[:, 0, 0]  # [B, Tk]
    last = tk - 1 - jnp.argmax(row_visible[:, ::-1], axis=-1)  # the query's own slot
    last_tile = (last // block_k).astype(jnp.int32)  # [B]
    mandatory, optional = decode_tile_roles(last_tile, nk, sink_tiles, jnp)  # [B, nk]
    budget = jnp.asarray(tile_budgets(nk, tile_budget))[last_tile]
    if selector != "gate":
        counts = _pad_to_tiles(row_visible.astype(jnp.float32), block_k).sum(axis=-1)  # [B, nk]
        scores = decode_tile_scores(q, k_bar, counts[:, None], scale=scale, selector=selector)  # [B, H, 1, nk]
        optional = (optional & (counts > 0))[:, None, None]
        chosen = cap_optional(optional, scores, budget[:, None], shared_heads=shared_heads)
        return mandatory[:, None, None] | chosen
    scores = jnp.einsum("bhd,bthd->bht", q[:, 0].astype(jnp.float32), k_bar) * jnp.float32(scale)
    keep_all = optional.sum(axis=-1) <= budget  # [B]
    idx = jnp.minimum(last_tile, tile_theta_decode.shape[-1] - 1)
    theta = jnp.take(jnp.asarray(tile_theta_decode, jnp.float32), idx, axis=1).T  # [B, H]
    chosen = scores > theta[..., None]
    if tile_cap:
        chosen = cap_at_budget(chosen & optional[:, None], scores, budget[:, None])
    chosen = chosen | keep_all[:, None, None]
    kept = mandatory[:, None] | (optional[:, None] & chosen)
    return kept[:, :, None, :]


def _pad_to_tiles(x: jax.Array, block: int) -> jax.Array:
    """[..., T] -> [..., ceil(T / block), block], zero-padded."""
    n = tile_count(x.shape[-1], block)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n * block - x.shape[-1])])
    return x.reshape(*x.shape[:-1], n, block)


def decode_rows_tile_scores(q: jax.Array, k: jax.Array, *, scale: float, block_k: int, selector: str) -> jax.Array:
    """float32 [B, H, T, nk]: `decode_tile_scores` of every query row i as the decoding step at slot
    i scores it. Full tiles before the row's own tile are what the KV cache holds for them; its own
    tile holds keys up to i only, so that tile's mean and count are the running ones."""
    b, t, h, d = k.shape
    nk = tile_count(t, block_k)
    rows = np.arange(t)
    counts = np.clip(rows[:, None] + 1 - np.arange(nk)[None, :] * block_k, 0, block_k)  # [T, nk]
    if selector == "window":
        return decode_tile_scores(q, tile_means(k, block_k), counts[None], scale=scale, selector=selector)
    kf = _pad_to_tiles(jnp.moveaxis(k.astype(jnp.float32), 1, -1), block_k)  # [B, H, D, nk, block_k]
    running = jnp.cumsum(kf, axis=-1) / jnp.arange(1, block_k + 1, dtype=jnp.float32)
    running = jnp.moveaxis(running.reshape(b, h, d, nk * block_k)[..., :t], -1, 1)  # [B, T, H, D]: own tile
    logits = row_tile_logits(q, {"mean": tile_means(k, block_k), "count": counts.astype(np.float32)},
                             scale=scale, selector="rowmean")  # [B, H, T, nk], full tiles
    own = (jnp.einsum("bihd,bihd->bhi", q.astype(jnp.float32), running) * jnp.float32(scale)
           + jnp.log(jnp.float32(1) + rows % block_k))
    own_tile = (rows // block_k)[:, None] == np.arange(nk)[None, :]  # [T, nk]
    return jax.nn.log_softmax(jnp.where(own_tile, own[..., None], logits), axis=-1)


def decode_gate_scores(q: jax.Array, k: jax.Array, scale: float, block_k: int) -> jax.Array:
    """Single-query gate scores `scale * q_i · k̄_t` for every query row as a decoding query:
    float32 [B, H, T, nk]. Only full tiles before the query's own are optional, so full-tile means
    are what the KV cache holds for them."""
    return jnp.einsum("bihd,bthd->bhit", q.astype(jnp.float32), tile_means(k, block_k)) * jnp.float32(scale)


def decode_tile_roles(last_tile, n_tiles: int, sink_tiles: int, xp=np):
    """(mandatory, optional): bool [..., n_tiles] for decoding queries whose own key tile is
    `last_tile` [...]. The own tile and the sink tiles before it are always kept; the full tiles
    between them are the ones a gate or selector chooses from. `xp` is numpy or jax.numpy."""
    tiles = xp.arange(n_tiles)
    last = last_tile[..., None]
    sink = xp.minimum(sink_tiles, last)
    return (tiles == last) | (tiles < sink), (tiles < last) & (tiles >= sink)


def decode_gate_layout(t: int, block_k: int, tile_budget: float, sink_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """For query positions i < t decoding: bool [t, nk] optional key tiles and the budget m_i [t]
    (the query sees i // block_k + 1 key tiles, so it uses the budget of that tile count)."""
    nk = tile_count(t, block_k)
    last = np.arange(t) // block_k
    return decode_tile_roles(last, nk, sink_tiles)[1], tile_budgets(nk, tile_budget)[last]


def decode_rows_kept_tiles(
    q: jax.Array, k: jax.Array, *, scale: float, tile_theta_decode: jax.Array | None, block_k: int,
    tile_budget: float, sink_tiles: int, tile_cap: bool = False, selector: str = "gate", shared_heads: bool = False,
) -> jax.Array:
    """bool [B, H, T, nk]: the key tiles each query row i keeps when it is gated as the decoding
    step at slot i gates it (`decode_kept_tiles`), for all rows in one pass. This is teacher-forced
    decoding's attention without the T sequential steps, so perplexity can measure the decode gate.
    The queries sit at slots 0..T-1 of q and k (no cache, no padding)."""
    t = q.shape[1]
    optional, budgets = decode_gate_layout(t, block_k, tile_budget, sink_tiles)  # [T, nk], [T]
    last = np.arange(t) // block_k
    mandatory = decode_tile_roles(last, optional.shape[-1], sink_tiles)[0]
    if selector != "gate":
        scores = decode_rows_tile_scores(q, k, scale=scale, block_k=block_k, selector=selector)
        return mandatory | cap_optional(optional, scores, budgets, shared_heads=shared_heads)
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
    calibrated gate). Prefill geometry: the queries sit at slots 0..Tq-1, and so do the keys they
    see; slots past Tq (a prompt written into a larger, empty KV cache) hold no key yet, so the
    selector ranks the first Tq slots and the tiles past them stay dropped."""
    tq, tk = q.shape[1], k.shape[1]
    if tq > tk:
        raise ConfigError(f"tile_selector={config.tile_selector!r} selects tiles for queries at slots 0..Tq-1; this "
                          f"call has {tq} queries against {tk} keys.")
    k = k[:, :tq]
    probs = (masked_softmax(attention_scores(q, k, scale), visible[..., :tq]) if config.tile_selector == "oracle"
             else None)
    tiles = select_tiles(q, k, scale=scale, block_q=config.block_q, block_k=config.block_k,
                         tile_budget=config.tile_budget, sink_tiles=config.sink_tiles,
                         selector=config.tile_selector, probs=probs, sub_block=config.sub_block or None,
                         shared_heads=config.shared_heads)
    missing = tile_count(tk, config.block_k) - tiles.shape[-1]
    return jnp.pad(tiles, [(0, 0)] * 3 + [(0, missing)])


def gate_mask(
    q: jax.Array, k: jax.Array, visible: jax.Array, *, scale: float, layer, config
) -> jax.Array:
    """Elements [B, H, Tq, Tk] that lie in kept tiles and are visible. `layer`: a LayerThresholds
    (None for the selectors that need none)."""
    tq, tk = q.shape[1], k.shape[1]
    selector = config.tile_selector
    # one query against a cache decodes; a lone token without one (tk == 1) is prefill for the selectors
    decoding = (config.decode_gate_rows and tq > 1) or (tq == 1 and (tk > 1 or selector == "gate"))
    if decoding and not config.tile_choice_decodes:
        raise ConfigError(f"tile_selector={selector!r} selects tiles for prefill only; decoding runs the calibrated "
                          f"gate or one of {', '.join(DECODE_SELECTORS)} (with whole-tile summaries, sub_block=0).")
    decode_rule = dict(tile_theta_decode=None if layer is None else layer.tile_theta_decode, block_k=config.block_k,
                       tile_budget=config.tile_budget, sink_tiles=config.sink_tiles, tile_cap=config.tile_cap,
                       selector=selector, shared_heads=config.shared_heads)
    if config.decode_gate_rows and tq > 1:
        if tq != tk:
            raise ConfigError(f"decode_gate_rows gates {tq} queries as decoding steps from slot 0, but there are {tk} "
                              "keys; it needs the whole sequence at once (no KV cache).")
        tiles = decode_rows_kept_tiles(q, k, scale=scale, **decode_rule)
        return visible & expand_tiles(tiles, 1, config.block_k, tq, tk)
    if decoding:
        tiles = decode_kept_tiles(q, k, scale=scale, visible=visible, **decode_rule)
        return visible & expand_tiles(tiles, 1, config.block_k, 1, tk)
    if selector != "gate":
        tiles = selector_kept_tiles(q, k, visible, scale=scale, config=config)
        return visible & expand_tiles(tiles, config.block_q, config.block_k, tq, tk)
    tiles = prefill_kept_tiles(
        q, k, scale=scale, key_valid=key_validity(visible), tile_theta=layer.tile_theta,
        block_q=config.block_q, block_k=config.block_k, tile_budget=config.tile_budget, sink_tiles=config.sink_tiles,
        tile_cap=config.tile_cap,
    )
    return visible & expand_tiles(tiles, config.block_q, config.block_k, tq, tk)

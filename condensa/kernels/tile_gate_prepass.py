"""The tile gate's pre-pass: which key tiles each query tile visits, as compacted lists.

Pooling q and k per tile and scoring `s_bt = scale * mean(q_b) . mean(k_t)` costs
O(T^2 / (b_q b_k) * D), a rounding error next to attention itself, so it is plain jax.numpy that
XLA fuses; only the compaction matters for the kernel. As in splash attention's
`MaskInfo.data_next`, each query tile gets a dense list of the key tiles to visit plus a count,
so the main pass loops over exactly those tiles and never loads a dropped one.

Tile layout (shared with the kernel): queries in tiles of `block_q` rows, keys in tiles of
`block_k` columns, `block_q` a multiple of `block_k`, so query tile b overlaps key tiles
[b*r, (b+1)*r) with r = block_q // block_k. Those r "diagonal" tiles are partly masked and always
visited; the lists below hold only the off-diagonal (fully visible) tiles the gate keeps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from condensa.kernels.tiling import cap_at_budget, tile_budgets
from condensa.kernels.tiling.selectors import select_tiles


def pooled_tiles(x: jax.Array, tile: int, length: int) -> jax.Array:
    """Mean of the real (un-padded) rows of each tile: [B, Tp, H, D] -> [B, H, Tp/tile, D] float32."""
    b, tp, h, d = x.shape
    n = tp // tile
    sums = x.astype(jnp.float32).reshape(b, n, tile, h, d).sum(axis=2)
    real = jnp.clip(length - jnp.arange(n) * tile, 1, tile).astype(jnp.float32)
    return jnp.transpose(sums / real[None, :, None, None], (0, 2, 1, 3))


def gate_scores(q, k, *, scale: float, block_q: int, block_k: int, length: int) -> jax.Array:
    """`scale * q̄_b · k̄_t` for every (query tile, key tile): float32 [B, H, nq, nk].

    k may have Hkv = H / G heads (grouped-query attention): query head h is scored against the
    pooled keys of KV head h // G, without repeating them.
    """
    q_bar = pooled_tiles(q, block_q, length)  # [B, H, nq, D]
    k_bar = pooled_tiles(k, block_k, length)  # [B, Hkv, nk, D]
    b, h, nq, d = q_bar.shape
    hkv = k_bar.shape[1]
    grouped = q_bar.reshape(b, hkv, h // hkv, nq, d)
    scores = jnp.einsum("bjgqd,bjkd->bjgqk", grouped, k_bar) * jnp.float32(scale)
    return scores.reshape(b, h, nq, k_bar.shape[2])


def prepass_keep(q, k, tile_theta, *, scale: float, block_q: int, block_k: int, length: int, sink_tiles: int,
                 tile_budget: float | None, tile_cap: bool, selector: str = "gate", sub_block: int | None = None,
                 shared_heads: bool = False) -> jax.Array:
    """Bool [B, H, nq, nk] over q, k padded to whole query tiles: the off-diagonal tiles to visit.

    `selector="gate"` thresholds the pooled scores with `tile_theta` (`offdiagonal_keep`). Any
    other selector is a budgeted one of `condensa.kernels.tiling.selectors`, run on the real `length`
    positions exactly as the reference op runs it; the diagonal tiles are dropped from its choice
    because the kernel always visits them. The oracle needs the attention itself: no pre-pass."""
    if selector == "gate":
        scores = gate_scores(q, k, scale=scale, block_q=block_q, block_k=block_k, length=length)
        return offdiagonal_keep(scores, tile_theta, block_q=block_q, block_k=block_k, sink_tiles=sink_tiles,
                                tile_budget=tile_budget, tile_cap=tile_cap)
    kept = select_tiles(q[:, :length], k[:, :length], scale=scale, block_q=block_q, block_k=block_k,
                        tile_budget=tile_budget, sink_tiles=sink_tiles, selector=selector, sub_block=sub_block,
                        shared_heads=shared_heads)
    nq, nk = q.shape[1] // block_q, k.shape[1] // block_k
    kept = jnp.pad(kept, [(0, 0), (0, 0), (0, nq - kept.shape[2]), (0, nk - kept.shape[3])])
    off_diagonal = np.arange(nk)[None, :] < np.arange(nq)[:, None] * (block_q // block_k)
    return kept & off_diagonal


def offdiagonal_keep(
    scores, tile_theta, *, block_q: int, block_k: int, sink_tiles: int, tile_budget: float | None = None,
    tile_cap: bool = False,
) -> jax.Array:
    """Bool [B, H, nq, nk]: off-diagonal visible tiles that the gate keeps (sinks, or `s > Θ`).

    `tile_theta` is [H, nq]; the diagonal tiles are not in this mask since they are always visited.
    With `tile_budget` f, a query tile with no more optional tiles than its budget
    m_b = max(1, ceil(f (b + 1))) keeps them all, as the reference gate does (DESIGN.md), and with
    `tile_cap` no query tile keeps more than m_b optional tiles (`cap_at_budget`).
    """
    nq, nk = scores.shape[-2:]
    ratio = block_q // block_k
    q_tile = np.arange(nq)[:, None]
    k_tile = np.arange(nk)[None, :]
    off_diagonal = k_tile < q_tile * ratio
    sink = k_tile < sink_tiles
    chosen = scores > tile_theta.astype(jnp.float32)[None, :, :, None]
    if tile_budget is not None:
        optional = np.maximum(0, np.arange(nq) * ratio - sink_tiles)
        budget = tile_budgets(nq, tile_budget)
        if tile_cap:
            chosen = cap_at_budget(chosen & off_diagonal & ~sink, scores, budget)
        chosen = chosen | (optional <= budget)[:, None]
    elif tile_cap:
        raise ValueError("tile_cap needs tile_budget: the cap is the budget m_b.")
    return off_diagonal & (sink | chosen)


def table_width(n_key_tiles: int) -> int:
    """The visit table's width: the count plus the tiles, rounded up to a power of two (Triton's
    block shapes must be powers of two)."""
    return max(2, 1 << int(n_key_tiles).bit_length())


def compact_tile_lists(keep: jax.Array) -> jax.Array:
    """int32 [B, H, nq, W]: column 0 is the count, columns 1.. the kept key tiles in ascending order.

    W is a power of two (block shapes on the Triton path must be). A cumulative sum gives each kept
    tile its slot; the dropped ones are scattered into a spare column that is cut off afterwards.
    """
    *lead, nk = keep.shape
    slot = jnp.cumsum(keep, axis=-1, dtype=jnp.int32)  # 1-based position among kept tiles
    dest = jnp.where(keep, slot, nk + 1)
    tiles = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), keep.shape)
    table = jnp.zeros((*lead, nk + 2), jnp.int32)
    table = jnp.put_along_axis(table, dest, tiles, axis=-1, inplace=False)
    table = table.at[..., 0].set(slot[..., -1])
    width = table_width(nk)
    return jnp.pad(table[..., : nk + 1], [(0, 0)] * len(lead) + [(0, width - nk - 1)])

"""Sparsity metrics from attention probabilities (DESIGN.md, "Metrics").

Each function takes one layer's probabilities [B, H, Tq, Tk] (zeros where an element was not
kept) and returns per-head float32 values (jit-compatible); `sparsity_report` runs a model and aggregates
them per layer and overall. Kept means p > 0, so a rule that keeps an element always marks it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.attention import AttentionConfig
from condensa.attention.gqa import kv_groups
from condensa.attention.tiles import top_m_tiles
from condensa.kernels.tiling import tile_count, visible_tiles
from condensa.kernels.tiling.pooling import tile_masses
from condensa.sparsity.gated_forward import forward_probs_and_gates


def nanmean(values) -> float:
    """Mean over the finite entries; NaN (without a warning) when there are none."""
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values)
    return float(values[finite].mean()) if finite.any() else float("nan")


def _per_head(num, den) -> jax.Array:
    """num / den per head, float32, NaN where there was nothing to measure."""
    num, den = jnp.asarray(num, jnp.float32), jnp.asarray(den, jnp.float32)
    return jnp.where(den > 0, num / jnp.maximum(den, 1e-30), jnp.nan)


def causal_visible(tq: int, tk: int | None = None) -> jnp.ndarray:
    """bool [1, 1, Tq, Tk]: the prefill causal mask (query i sees keys j <= i)."""
    tk = tq if tk is None else tk
    return jnp.tril(jnp.ones((tq, tk), bool))[None, None]


def kept_fraction(probs, visible) -> jax.Array:
    """Kept elements / visible causal elements, per head [H]."""
    vis = jnp.broadcast_to(visible, probs.shape)
    return _per_head(((probs > 0) & vis).sum(axis=(0, 2, 3)), vis.sum(axis=(0, 2, 3)))


def kept_per_row(probs, visible, min_length: int = 0) -> jax.Array:
    """Mean kept elements per row, over rows longer than `min_length` (pass k), per head [H]."""
    vis = jnp.broadcast_to(visible, probs.shape)
    rows = vis.sum(axis=-1) > min_length  # [B, H, Tq]
    kept = ((probs > 0) & vis).sum(axis=-1)
    return _per_head(jnp.where(rows, kept, 0).sum(axis=(0, 2)), rows.sum(axis=(0, 2)))


def v_rows_fraction(probs, visible, n_kv_head: int | None = None) -> jax.Array:
    """Decoding: the fraction of visible V rows that some kept element needs, per KV head [Hkv].

    Pass one decode step's probabilities (Tq = 1) to get the V traffic a kernel must load. With
    grouped-query attention (`n_kv_head` < H), the G = H / Hkv query heads of a group read one
    shared V head, so the group needs the union of the rows its query heads keep (as the Top-θ
    paper counts it). Without `n_kv_head` (or with Hkv = H) this is per head, as for GPT-2.
    """
    vis = jnp.broadcast_to(visible, probs.shape)
    needed = ((probs > 0) & vis).any(axis=2)  # [B, H, Tk]
    seen = vis.any(axis=2)
    b, h, tk = needed.shape
    n_kv_head = h if n_kv_head is None else int(n_kv_head)
    if n_kv_head != h:
        groups = kv_groups(h, n_kv_head)
        needed = needed.reshape(b, n_kv_head, groups, tk).any(axis=2)  # a row any query head of the group keeps
        seen = seen.reshape(b, n_kv_head, groups, tk).any(axis=2)
    return _per_head(needed.sum(axis=(0, 2)), seen.sum(axis=(0, 2)))


def topk_mass(probs, visible, k: int) -> jax.Array:
    """Mean over rows with n > k of the mass in the k largest probabilities, per head [H]."""
    vis = jnp.broadcast_to(visible, probs.shape)
    rows = vis.sum(axis=-1) > k
    top = jax.lax.top_k(probs, min(k, probs.shape[-1]))[0].sum(axis=-1)
    return _per_head(jnp.where(rows, top, 0).sum(axis=(0, 2)), rows.sum(axis=(0, 2)))


def elements_to_cover(probs, visible, mass: float) -> jax.Array:
    """Mean number of largest elements whose sum reaches `mass` of each row's total, per head [H]."""
    vis = jnp.broadcast_to(visible, probs.shape)
    rows = vis.any(axis=-1)
    ordered = jnp.sort(probs, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(ordered, axis=-1)
    total = cumulative[..., -1:]
    needed = (cumulative < mass * total - 1e-7).sum(axis=-1) + 1
    return _per_head(jnp.where(rows, needed, 0).sum(axis=(0, 2)), rows.sum(axis=(0, 2)))


def tile_kept_fraction(probs, block_q: int, block_k: int) -> jax.Array:
    """Causal tiles holding at least one kept element / causal tiles, per head [H] (prefill layout)."""
    tq, tk = probs.shape[-2:]
    nq, nk = tile_count(tq, block_q), tile_count(tk, block_k)
    used = tile_masses((probs > 0).astype(jnp.float32), block_q, block_k) > 0
    vis = visible_tiles(nq, nk, block_q, block_k)
    return _per_head((used & vis).sum(axis=(0, 2, 3)), vis.sum() * probs.shape[0] * np.ones(probs.shape[1]))


def captured_mass(dense_probs, kept_tiles, block_q: int, block_k: int) -> jax.Array:
    """Mean over query tiles of the true (dense) mass inside `kept_tiles` [B|1, H|1, nq, nk], per head [H]."""
    masses = tile_masses(dense_probs, block_q, block_k)
    captured = jnp.where(kept_tiles, masses, 0.0).sum(axis=-1)  # [B, H, nq]
    return _per_head(captured.sum(axis=(0, 2)), captured.shape[0] * captured.shape[2] * np.ones(captured.shape[1]))


def oracle_tiles(dense_probs, block_q: int, block_k: int, tile_budget: float, sink_tiles: int = 1) -> jax.Array:
    """The oracle tile choice: mandatory tiles plus the m_b optional tiles of largest true mass."""
    return top_m_tiles(tile_masses(dense_probs, block_q, block_k), block_q, block_k, tile_budget, sink_tiles)


def layer_metrics(probs, visible, *, k: int, dense_probs=None, gate_tiles=None, attention=None) -> dict[str, Any]:
    """Every metric for one layer, per head (lists) plus the mean over heads."""
    tiles = None if attention is None else (attention.block_q, attention.block_k, attention.tile_budget,
                                            attention.sink_tiles)
    values = _layer_arrays(probs, visible, dense_probs, gate_tiles, k=k, tiles=tiles)
    return {name: {"per_head": np.asarray(v, np.float64).tolist(), "mean": nanmean(v)} for name, v in values.items()}


@functools.partial(jax.jit, static_argnames=("k", "tiles"))
def _layer_arrays(probs, visible, dense_probs, gate_tiles, *, k: int, tiles) -> dict[str, jax.Array]:
    """All metrics of one layer in one compiled program (eagerly, each op would compile alone)."""
    out = {
        "kept_fraction": kept_fraction(probs, visible),
        "kept_per_row": kept_per_row(probs, visible, k),
        "topk_mass": topk_mass(probs, visible, k),
        "cover_90": elements_to_cover(probs, visible, 0.90),
        "cover_95": elements_to_cover(probs, visible, 0.95),
    }
    if tiles is not None:
        bq, bk, f, sink = tiles
        out["tile_kept_fraction"] = tile_kept_fraction(probs, bq, bk)
        if dense_probs is not None:
            out["oracle_tile_mass"] = captured_mass(dense_probs, oracle_tiles(dense_probs, bq, bk, f, sink), bq, bk)
            if gate_tiles is not None:
                out["gate_tile_mass"] = captured_mass(dense_probs, gate_tiles, bq, bk)
    return out


def sparsity_report(model, input_ids, *, attention, thresholds=None) -> dict[str, Any]:
    """Runs `model` on `input_ids` [B, T] with `attention` (and densely, for the true masses) and
    returns the metrics per layer and their mean over layers."""
    ids = jnp.asarray(input_ids, jnp.int32)
    graphdef, state = nnx.split(model)
    sparse, gates = forward_probs_and_gates(graphdef, state, ids, thresholds, attention=attention)
    # the default config, so every report on this model and shape shares one compiled dense pass
    dense, _ = forward_probs_and_gates(graphdef, state, ids, None, attention=AttentionConfig())
    gates = gates[0] if gates is not None else [None] * len(sparse)
    visible = causal_visible(ids.shape[1])
    layers = []
    for layer, (p, d, g) in enumerate(zip(sparse, dense, gates)):
        layers.append(layer_metrics(p, visible, k=attention.k_for(layer), dense_probs=d, gate_tiles=g,
                                    attention=attention if attention.tile_gate else None))
    overall = {name: nanmean([entry[name]["mean"] for entry in layers]) for name in layers[0]}
    return {"layers": layers, "mean": overall}

"""The budgeted selectors while decoding: one query against a KV cache, ranked from the cache's
tile-mean keys. The reference op against a NumPy brute force, its teacher-forced rows
(`decode_gate_rows`) against one decoding step per row, and the decode kernel (interpret mode)
against the reference op."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensa.attention import AttentionConfig, attend
from condensa.attention.tile_gate import decode_kept_tiles, decode_rows_kept_tiles
from condensa.errors import ConfigError
from condensa.kernels.toptheta_decode import toptheta_decode
from condensa.sparsity.thresholds import Thresholds

BK, SINK, F = 16, 1, 0.25
RULES = [("rowmean", True), ("rowmean", False), ("window", False)]


def _cache(seed, b, s, h, hkv, d):
    """q [B, 1, H, D] and a cache k, v [B, S, Hkv, D] whose tiles differ along q's direction, so the
    tile scores spread out and no two tie."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, 1, h, d)).astype(np.float32)
    k = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    v = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    bias = np.repeat(rng.normal(0.0, 2.0, size=(b, -(-s // BK), hkv, 1)), BK, axis=1)[:, :s]
    k += (bias * q[:, :, :: h // hkv] / math.sqrt(d)).astype(np.float32)
    return q, k, v


def _visible(lengths, starts, s):
    vis = np.zeros((len(lengths), 1, 1, s), bool)
    for b, (start, n) in enumerate(zip(starts, lengths)):
        vis[b, 0, 0, start:n] = True
    return vis


def _numpy_kept(q, k, vis, scale, selector, shared):
    """bool [B, H, nk]: DESIGN.md's decoding selector, one sequence and head at a time."""
    b, _, h, d = q.shape
    s = k.shape[1]
    nk = -(-s // BK)
    kept = np.zeros((b, h, nk), bool)
    for bi in range(b):
        valid = np.flatnonzero(vis[bi, 0, 0])
        last = valid[-1] // BK
        count = np.array([sum(1 for j in valid if j // BK == t) for t in range(nk)])
        sink = min(SINK, last)
        optional = [t for t in range(nk) if sink <= t < last and count[t] > 0]
        m = max(1, math.ceil(F * (last + 1)))
        pairs = []
        for hh in range(h):
            kept[bi, hh, last] = True
            kept[bi, hh, :sink] = True
            if selector == "window":
                score = {t: float(t) for t in optional}
            else:
                logit = {t: scale * float(q[bi, 0, hh] @ k[bi, [j for j in valid if j // BK == t], hh * k.shape[2] // h]
                                          .astype(np.float64).mean(0)) + math.log(count[t])
                         for t in range(nk) if count[t]}
                top = max(logit.values())
                total = sum(math.exp(x - top) for x in logit.values())
                score = {t: math.exp(logit[t] - top) / total for t in optional}
            if shared:
                pairs += [(score[t], hh, t) for t in optional]
            else:
                for t in sorted(optional, key=lambda t: -score[t])[:m]:
                    kept[bi, hh, t] = True
        for _, hh, t in sorted(pairs, reverse=True)[: h * m]:
            kept[bi, hh, t] = True
    return kept


@pytest.mark.parametrize("selector,shared", RULES)
def test_reference_decoding_selector_matches_numpy(selector, shared):
    b, s, h, d = 3, 150, 4, 8
    lengths, starts = [150, 97, 120], [0, 0, 21]  # ragged, and left padding on the last
    q, k, _ = _cache(1, b, s, h, h, d)
    vis = _visible(lengths, starts, s)
    got = decode_kept_tiles(jnp.asarray(q), jnp.asarray(k), scale=0.3, visible=jnp.asarray(vis),
                            tile_theta_decode=None, block_k=BK, tile_budget=F, sink_tiles=SINK, selector=selector,
                            shared_heads=shared)
    want = _numpy_kept(q, k, vis, 0.3, selector, shared)
    np.testing.assert_array_equal(np.asarray(got)[:, :, 0], want)
    assert want.sum() < want.size // 2  # the budget binds


@pytest.mark.parametrize("selector,shared", RULES)
def test_rows_gated_as_decoding_steps_equal_one_step_per_row(selector, shared):
    """`decode_gate_rows` scores every row at once, the own tile from running means; one decoding
    step per row scores it from the cache's valid keys."""
    t, h, d = 70, 3, 8
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.normal(size=(2, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, t, h, d)) + rng.normal(size=(2, t, h, 1)), jnp.float32)
    rows = decode_rows_kept_tiles(q, k, scale=0.5, tile_theta_decode=None, block_k=BK, tile_budget=F,
                                  sink_tiles=SINK, selector=selector, shared_heads=shared)
    for i in range(t):
        vis = jnp.asarray(np.arange(t) <= i)[None, None, None].repeat(2, axis=0)
        step = decode_kept_tiles(q[:, i:i + 1], k, scale=0.5, visible=vis, tile_theta_decode=None, block_k=BK,
                                 tile_budget=F, sink_tiles=SINK, selector=selector, shared_heads=shared)
        np.testing.assert_array_equal(np.asarray(rows[:, :, i]), np.asarray(step[:, :, 0]), err_msg=f"row {i}")


def _tile_means(k, vis_row):
    b, s, hkv, d = k.shape
    out = np.zeros((b, -(-s // BK), hkv, d), np.float32)
    for bi, t in np.ndindex(b, out.shape[1]):
        rows = [j for j in range(t * BK, min(s, (t + 1) * BK)) if vis_row[bi, j]]
        if rows:
            out[bi, t] = k[bi, rows].astype(np.float64).mean(axis=0)
    return out


@pytest.mark.parametrize("theta", [None, 0.0])
@pytest.mark.parametrize("selector,shared", RULES)
def test_decode_kernel_runs_the_selectors_as_the_reference_op_does(selector, shared, theta):
    """Grouped-query attention (4 query heads on 2 KV heads), ragged lengths and left padding; dense
    inside the kept tiles, or Top-θ at θ = 0."""
    b, s, h, hkv, d = 3, 150, 4, 2, 64
    lengths, starts = [150, 97, 120], [0, 0, 21]
    scale = 1 / 8
    q, k, v = _cache(2, b, s, h, hkv, d)
    vis = _visible(lengths, starts, s)
    table = None if theta is None else np.full((h, s), theta, np.float32)
    got, stats = toptheta_decode(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths),
                                 starts=jnp.asarray(starts), scale=scale, theta=table,
                                 k_tile_mean=jnp.asarray(_tile_means(k, vis[:, 0, 0])), tile_selector=selector,
                                 shared_heads=shared, tile_budget=F, sink_tiles=SINK, block_k=BK, num_splits=2,
                                 backend="interpret")
    config = AttentionConfig(mode="dense" if theta is None else "toptheta", k=1, tile_gate=True, tile_selector=selector,
                             shared_heads=shared, block_q=BK, block_k=BK, tile_budget=F, sink_tiles=SINK)
    thresholds = None if theta is None else Thresholds(theta=table[None], sdc_delta=np.zeros((1, h, s), np.float32), k=1)
    want, _ = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), visible=jnp.asarray(vis), scale=scale,
                     layer_idx=0, config=config, thresholds=thresholds)
    err = np.linalg.norm(np.asarray(got) - np.asarray(want)) / np.linalg.norm(np.asarray(want))
    assert err < 1e-5, f"relative error {err:.2e}"
    assert int(stats.k_loaded) <= int(stats.visible) // 2  # the budget binds


def test_prefill_only_selectors_refuse_to_decode():
    q, k, v = _cache(3, 1, 64, 2, 2, 64)
    vis = _visible([64], [0], 64)
    config = AttentionConfig(tile_gate=True, tile_selector="moment", block_q=BK, block_k=BK)
    with pytest.raises(ConfigError, match="decoding runs the calibrated gate or one of window, rowmean"):
        attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), visible=jnp.asarray(vis), scale=0.3, layer_idx=0,
               config=config)
    with pytest.raises(ConfigError, match="does not run while decoding"):
        toptheta_decode(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray([64]), tile_selector="moment",
                        tile_budget=F, k_tile_mean=jnp.zeros((1, 4, 2, 64)), block_k=BK, backend="interpret")
    with pytest.raises(ConfigError, match="decode_gate_rows"):
        AttentionConfig(tile_gate=True, tile_selector="rowmean", sub_block=4, decode_gate_rows=True)


def test_a_lone_token_without_a_cache_is_prefill_for_every_selector():
    """One query against one key (a one-token prompt, no cache) is not a decoding step: the
    prefill-only selectors run on it."""
    q, k, v = _cache(4, 1, 1, 2, 2, 8)
    vis = np.ones((1, 1, 1, 1), bool)
    config = AttentionConfig(tile_gate=True, tile_selector="moment", block_q=BK, block_k=BK)
    out, _ = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), visible=jnp.asarray(vis), scale=0.3,
                    layer_idx=0, config=config)
    np.testing.assert_allclose(np.asarray(out)[0, 0], np.repeat(v[0, 0], 1, axis=0), rtol=1e-6)


def test_shared_budget_decodes_one_query_per_sequence():
    q, k, v = _cache(5, 1, 64, 2, 2, 64)
    with pytest.raises(ConfigError, match="one new query per sequence"):
        toptheta_decode(jnp.asarray(np.repeat(q, 2, axis=1)), jnp.asarray(k), jnp.asarray(v), jnp.asarray([64]),
                        tile_selector="rowmean", shared_heads=True, tile_budget=F, k_tile_mean=jnp.zeros((1, 4, 2, 64)),
                        block_k=BK, backend="interpret")

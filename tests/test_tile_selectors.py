"""The tile selectors of `condensa.kernels.tiling.selectors` against a NumPy brute force, loop by loop."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from condensa.kernels.tiling.selectors import (
    ROW_SELECTORS, estimated_tile_mass, key_tile_stats, row_tile_logits, select_tiles, tile_scores,
)

B, T, H, HKV, D = 2, 45, 4, 2, 8
BQ, BK = 8, 4
SCALE = 1 / math.sqrt(D)


@pytest.fixture(scope="module")
def qk():
    rng = np.random.default_rng(0)
    return rng.normal(size=(B, T, H, D)).astype(np.float32), rng.normal(size=(B, T, HKV, D)).astype(np.float32)


def _np_probs(q, k):
    kk = np.repeat(k, H // HKV, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, kk).astype(np.float64) * SCALE
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _np_tile_mass(p):
    nq, nk = -(-T // BQ), -(-T // BK)
    mass = np.zeros(p.shape[:2] + (nq, nk))
    for b in range(nq):
        rows = range(b * BQ, min(T, (b + 1) * BQ))
        for t in range(nk):
            mass[:, :, b, t] = np.mean([p[:, :, i, t * BK:(t + 1) * BK].sum(-1) for i in rows], axis=0)
    return mass


def _np_keep(scores, f, sink=1):
    """Mandatory (diagonal + sinks) + the m_b best optional tiles, written out with loops."""
    nq, nk = scores.shape[-2:]
    keep = np.zeros(scores.shape, bool)
    for b in range(nq):
        first_row, last_row = b * BQ, min(T, (b + 1) * BQ) - 1
        visible = [t for t in range(nk) if t * BK <= last_row]
        diagonal = [t for t in visible if t * BK + BK - 1 >= first_row]
        mandatory = set(diagonal) | {t for t in visible if t < sink}
        optional = [t for t in visible if t not in mandatory]
        m = max(1, math.ceil(round(f * (b + 1), 9)))
        for t in mandatory:
            keep[..., b, t] = True
        for idx in np.ndindex(scores.shape[:-2]):
            best = sorted(optional, key=lambda t: -scores[idx + (b, t)])[:m]
            for t in best:
                keep[idx + (b, t)] = True
    return keep


@pytest.mark.parametrize("f", [0.125, 0.5])
def test_oracle_keeps_the_tiles_of_largest_true_mass(qk, f):
    q, k = qk
    p = _np_probs(q, k)
    mass = _np_tile_mass(p)
    ours = tile_scores(jnp.asarray(q), jnp.asarray(k), scale=SCALE, block_q=BQ, block_k=BK, selector="oracle",
                       probs=jnp.asarray(p, jnp.float32))
    np.testing.assert_allclose(np.asarray(ours), mass, rtol=1e-5, atol=1e-7)
    keep = select_tiles(jnp.asarray(q), jnp.asarray(k), scale=SCALE, block_q=BQ, block_k=BK, tile_budget=f,
                        sink_tiles=1, selector="oracle", probs=jnp.asarray(p, jnp.float32))
    np.testing.assert_array_equal(np.asarray(keep), _np_keep(mass, f))


def test_window_keeps_the_sink_the_diagonal_and_the_latest_tiles(qk):
    q, k = qk
    keep = np.asarray(select_tiles(jnp.asarray(q), jnp.asarray(k), scale=SCALE, block_q=BQ, block_k=BK,
                                   tile_budget=0.25, sink_tiles=1, selector="window"))
    nk = keep.shape[-1]
    recency = np.broadcast_to(np.arange(nk, dtype=float), keep.shape)
    np.testing.assert_array_equal(keep, _np_keep(recency, 0.25))
    b = 5  # rows 40..44 see key tiles 0..11; tile 10 and 11 are diagonal, m_5 = ceil(0.25 * 6) = 2
    assert list(np.flatnonzero(keep[0, 0, b])) == [0, 8, 9, 10, 11]


def _np_row_logits(q, k, selector):
    nk = -(-T // BK)
    out = np.zeros((B, H, T, nk))
    for t in range(nk):
        keys = np.repeat(k[:, t * BK:(t + 1) * BK], H // HKV, axis=2).astype(np.float64)  # [B, n, H, D]
        n = keys.shape[1]
        mean, var = keys.mean(1), keys.var(1)
        for i in range(T):
            qi = q[:, i].astype(np.float64)  # [B, H, D]
            if selector == "rowmean":
                s = (qi * mean).sum(-1) * SCALE
            elif selector == "moment":
                s = (qi * mean).sum(-1) * SCALE + 0.5 * SCALE**2 * (qi**2 * var).sum(-1)
            else:
                s = np.maximum(qi * keys.max(1), qi * keys.min(1)).sum(-1) * SCALE
            out[:, :, i, t] = s + np.log(n)
    return out


@pytest.mark.parametrize("selector", ROW_SELECTORS)
def test_row_selectors_match_a_loop_over_rows_and_tiles(qk, selector):
    q, k = qk
    logits = _np_row_logits(q, k, selector)
    ours = row_tile_logits(jnp.asarray(q), key_tile_stats(jnp.asarray(k), BK), scale=SCALE, selector=selector)
    np.testing.assert_allclose(np.asarray(ours), logits, rtol=1e-4, atol=1e-4)
    nk = logits.shape[-1]
    shares = np.zeros_like(logits)
    for i in range(T):
        vis = [t for t in range(nk) if t * BK <= i]
        z = np.exp(logits[:, :, i, vis] - logits[:, :, i, vis].max(-1, keepdims=True))
        shares[:, :, i, vis] = z / z.sum(-1, keepdims=True)
    expected = np.stack([shares[:, :, b * BQ:(b + 1) * BQ].mean(2) for b in range(-(-T // BQ))], axis=2)
    mass = estimated_tile_mass(jnp.asarray(q), jnp.asarray(k), scale=SCALE, block_q=BQ, block_k=BK, selector=selector)
    np.testing.assert_allclose(np.asarray(mass), expected, rtol=1e-4, atol=1e-6)
    keep = select_tiles(jnp.asarray(q), jnp.asarray(k), scale=SCALE, block_q=BQ, block_k=BK, tile_budget=0.25,
                        sink_tiles=1, selector=selector)
    np.testing.assert_array_equal(np.asarray(keep), _np_keep(expected, 0.25))


def test_bound_is_an_upper_bound_on_every_tiles_largest_score(qk):
    q, k = qk
    ours = np.asarray(row_tile_logits(jnp.asarray(q), key_tile_stats(jnp.asarray(k), BK), scale=SCALE,
                                      selector="bound"))
    kk = np.repeat(k, H // HKV, axis=2)
    scores = np.einsum("bihd,bjhd->bhij", q, kk) * SCALE
    for t in range(ours.shape[-1]):
        n = min(T, (t + 1) * BK) - t * BK
        largest = scores[..., t * BK:(t + 1) * BK].max(-1)
        assert np.all(ours[..., t] - np.log(n) >= largest - 1e-5)


def test_moment_estimates_the_log_mass_of_gaussian_keys_better_than_the_mean():
    """With Gaussian keys of unequal spread, log Σ_j exp(q·k_j) ≈ q·μ + ½ Σ q² σ² + log n: the
    variance term is what lets a tile holding a few strong keys outrank a flat one."""
    rng = np.random.default_rng(1)
    d, n = 16, 512
    q = rng.normal(size=(1, 1, 1, d)).astype(np.float32)
    spreads = np.array([0.3, 1.5], np.float32)
    k = np.concatenate([rng.normal(size=(1, n, 1, d)) * s for s in spreads], axis=1).astype(np.float32)
    scale = 1 / math.sqrt(d)
    stats = key_tile_stats(jnp.asarray(k), n)
    s = np.einsum("d,jd->j", q[0, 0, 0], k[0, :, 0]) * scale
    true = np.log(np.exp(s.reshape(2, n)).sum(-1))
    moment = np.asarray(row_tile_logits(jnp.asarray(q), stats, scale=scale, selector="moment"))[0, 0, 0]
    rowmean = np.asarray(row_tile_logits(jnp.asarray(q), stats, scale=scale, selector="rowmean"))[0, 0, 0]
    assert np.abs(moment - true).max() < 0.25 < np.abs(rowmean - true).max()


# The pre-pass calls the same `select_tiles` as the reference op for every selector, so a few
# cases cover the kernel's side: recency, a row estimate with sub-blocks, a shared budget, sampling.
@pytest.mark.parametrize("selector,sub_block,shared", [("window", 0, False), ("rowmean", 4, False),
                                                       ("rowmean", 8, True), ("sampled", 4, False)])
def test_prefill_kernel_runs_the_selectors_as_the_reference_op_does(selector, sub_block, shared):
    """The kernel's pre-pass (interpret mode) and the attention package's reference op keep the same
    tiles under each budgeted selector, so their outputs agree (GQA, two query tiles per key tile row)."""
    from condensa.attention import AttentionConfig, attend
    from condensa.kernels import toptheta_prefill

    t, d, h, hkv, bq, bk, f = 112, 64, 4, 2, 16, 16, 0.25
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(1, t, n, d)), jnp.float32) for n in (h, hkv, hkv))
    scale = 1 / math.sqrt(d)
    out, stats = toptheta_prefill(q, k, v, scale=scale, tile_selector=selector, tile_budget=f, block_q=bq,
                                  block_k=bk, backend="interpret", sub_block=sub_block or None, shared_heads=shared)
    config = AttentionConfig(tile_gate=True, tile_selector=selector, tile_budget=f, block_q=bq, block_k=bk,
                             sub_block=sub_block, shared_heads=shared)
    visible = jnp.tril(jnp.ones((t, t), bool))[None, None]
    ref, probs = attend(q, k, v, visible=visible, scale=scale, layer_idx=0, config=config)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    nq = t // bq
    budget_tiles = sum(min(b - 1, max(1, math.ceil(f * (b + 1)))) + 2 for b in range(2, nq)) + 1 + 2
    assert int(stats.listed) == h * budget_tiles  # every query tile lists exactly its budget, no more


def test_sub_blocks_sum_the_estimates_of_their_parts(qk):
    """With sub_block s, row i's log mass in tile t is log Σ over the sub-blocks of t that start by
    row i of exp(q_i·mean(sub-block) + log s), written here with loops."""
    q, k = qk
    sub, nk = 2, -(-T // BK)
    kk = np.repeat(k, H // HKV, axis=2).astype(np.float64)
    logits = np.full((B, H, T, nk), -np.inf)
    for i in range(T):
        for t in range(nk):
            parts = [np.einsum("bhd,bhd->bh", q[:, i], kk[:, s0:s0 + sub].mean(1)) * SCALE + np.log(kk[:, s0:s0 + sub].shape[1])
                     for s0 in range(t * BK, min(T, (t + 1) * BK), sub) if s0 <= i]
            if parts:
                logits[:, :, i, t] = np.logaddexp.reduce(np.stack(parts), axis=0)
    z = np.exp(logits - logits.max(-1, keepdims=True))
    shares = z / z.sum(-1, keepdims=True)
    expected = np.stack([shares[:, :, b * BQ:(b + 1) * BQ].mean(2) for b in range(-(-T // BQ))], axis=2)
    ours = estimated_tile_mass(jnp.asarray(q), jnp.asarray(k), scale=SCALE, block_q=BQ, block_k=BK,
                               selector="rowmean", sub_block=sub)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-4, atol=1e-6)
    whole = estimated_tile_mass(jnp.asarray(q), jnp.asarray(k), scale=SCALE, block_q=BQ, block_k=BK, selector="rowmean")
    assert not np.allclose(np.asarray(whole), expected, atol=1e-3)  # the sub-blocks change the estimate


def test_shared_heads_give_the_budget_of_all_heads_to_the_best_pairs(qk):
    """With one budget per query tile across heads, the kept optional (head, tile) pairs are the
    H · m_b best of all heads' optional tiles: a loop over query tiles picks them here."""
    q, k = qk
    p = _np_probs(q, k)
    mass = _np_tile_mass(p)  # [B, H, nq, nk]
    f = 0.25
    keep = np.asarray(select_tiles(jnp.asarray(q), jnp.asarray(k), scale=SCALE, block_q=BQ, block_k=BK,
                                   tile_budget=f, sink_tiles=1, selector="oracle",
                                   probs=jnp.asarray(p, jnp.float32), shared_heads=True))
    separate = _np_keep(mass, f)
    nq, nk = mass.shape[-2:]
    moved = False
    for bi in range(B):
        for b in range(nq):
            last_row = min(T, (b + 1) * BQ) - 1
            visible = [t for t in range(nk) if t * BK <= last_row]
            optional = [t for t in visible if t >= 1 and t * BK + BK - 1 < b * BQ]
            m = max(1, math.ceil(round(f * (b + 1), 9)))
            if len(optional) <= m:
                continue  # every head keeps all of them either way
            pairs = sorted(((h, t) for h in range(H) for t in optional), key=lambda ht: -mass[bi, ht[0], b, ht[1]])
            best = set(pairs[: H * m])
            for h in range(H):
                for t in optional:
                    assert keep[bi, h, b, t] == ((h, t) in best), (bi, b, h, t)
            per_head = keep[bi, :, b, optional].sum(axis=-1)
            moved |= len(set(per_head.tolist())) > 1
            assert keep[bi, :, b, optional].sum() == H * m
    assert moved and not np.array_equal(keep, separate)  # some heads took more than their own m_b


def test_sampled_measures_the_true_mass_of_its_rows(qk):
    """`sampled` averages the true per-tile mass over rows (j+1)·b_q/s - 1 of each query tile (the
    last real row for a partial tile); with s = b_q it is the oracle itself."""
    from condensa.kernels.tiling.selectors import sampled_tile_mass

    q, k = qk
    p = _np_probs(q, k)
    nq, nk = -(-T // BQ), -(-T // BK)
    rows = 2
    expected = np.zeros((B, H, nq, nk))
    for b in range(nq):
        picked = [min(b * BQ + (j + 1) * (BQ // rows) - 1, T - 1) for j in range(rows)]
        for t in range(nk):
            expected[:, :, b, t] = np.mean([p[:, :, i, t * BK:(t + 1) * BK].sum(-1) for i in picked], axis=0)
    ours = sampled_tile_mass(jnp.asarray(q), jnp.asarray(k), scale=SCALE, block_q=BQ, block_k=BK, rows=rows)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-4, atol=1e-6)
    full = np.asarray(sampled_tile_mass(jnp.asarray(q), jnp.asarray(k), scale=SCALE, block_q=BQ, block_k=BK, rows=BQ))
    np.testing.assert_allclose(full[:, :, :-1], _np_tile_mass(p)[:, :, :-1], rtol=1e-4, atol=1e-6)  # whole tiles

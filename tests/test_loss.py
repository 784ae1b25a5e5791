"""The concentration losses and metrics against NumPy brute force over rows and tiles."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensa.errors import ConfigError
from condensa.sparsity import loss as conc

B, H, T, BLOCK = 2, 3, 32, 8


@pytest.fixture(scope="module")
def probs_and_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, H, T, T)) * 2.0
    causal = np.tril(np.ones((T, T), bool))
    masked = np.where(causal, logits, -np.inf)
    p = np.exp(masked - masked.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p, np.where(causal, logits, np.nan)


def _tile_mass_np(p):
    n = T // BLOCK
    m = np.zeros((B, H, n, n))
    for b in range(n):
        for t in range(n):
            m[:, :, b, t] = p[:, :, b * BLOCK:(b + 1) * BLOCK, t * BLOCK:(t + 1) * BLOCK].sum(-1).mean(-1)
    return m


def _structure(n, sink=1):
    """(mandatory, optional) tile sets per query tile, written out from DESIGN.md's words."""
    mandatory = {b: {b} | set(range(min(sink, b + 1))) for b in range(n)}
    optional = {b: set(range(b + 1)) - mandatory[b] for b in range(n)}
    return mandatory, optional


def test_topk_loss_is_mass_outside_k_largest(probs_and_logits):
    p, _ = probs_and_logits
    k = 5
    expected = np.mean([1 - np.sort(p[bb, h, i, : i + 1])[::-1][:k].sum()
                        for bb in range(B) for h in range(H) for i in range(T) if i + 1 > k])
    got = conc.topk_loss(jnp.asarray(p, jnp.float32), k)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_topk_gradient_flows_only_through_kept_values(probs_and_logits):
    p, _ = probs_and_logits
    k = 4
    g = np.asarray(jax.grad(lambda x: conc.topk_loss(x, k))(jnp.asarray(p, jnp.float32)))
    rows = [(bb, h, i) for bb in range(B) for h in range(H) for i in range(T) if i + 1 > k]
    for bb, h, i in rows[:20]:
        kept = np.argsort(-p[bb, h, i])[:k]
        assert set(np.nonzero(g[bb, h, i])[0]) == set(kept)
    assert np.all(g[:, :, :k] == 0)  # rows with n_i <= k are not counted


@pytest.mark.parametrize("f", [0.125, 0.5])
def test_tile_loss_is_mass_outside_oracle_structure(probs_and_logits, f):
    p, _ = probs_and_logits
    n = T // BLOCK
    m = _tile_mass_np(p)
    mandatory, optional = _structure(n)
    kept = np.zeros((B, H, n))
    for b in range(n):
        budget = max(1, math.ceil(f * (b + 1)))
        for bb in range(B):
            for h in range(H):
                best = sorted((m[bb, h, b, t] for t in optional[b]), reverse=True)[:budget]
                kept[bb, h, b] = sum(m[bb, h, b, t] for t in mandatory[b]) + sum(best)
    got = conc.oracle_tile_mass(jnp.asarray(p, jnp.float32), BLOCK, f)
    np.testing.assert_allclose(np.asarray(got), kept, rtol=1e-5)
    np.testing.assert_allclose(float(conc.tile_loss(jnp.asarray(p, jnp.float32), BLOCK, f)), np.mean(1 - kept), rtol=1e-5, atol=1e-6)


def test_gate_scores_from_probs_rank_like_pooled_logits(probs_and_logits):
    """On optional tiles, the probs-derived score is the pooled logit minus a per-query-tile constant."""
    p, logits = probs_and_logits
    n = T // BLOCK
    _, optional = _structure(n)
    got = np.asarray(conc.pooled_scores_from_probs(jnp.asarray(p, jnp.float32), BLOCK))
    for b in range(n):
        ts = sorted(optional[b])
        if len(ts) < 2:
            continue
        pooled = np.array([logits[:, :, b * BLOCK:(b + 1) * BLOCK, t * BLOCK:(t + 1) * BLOCK].mean((-1, -2)) for t in ts])
        mine = np.array([got[:, :, b, t] for t in ts])
        diff = pooled - mine  # [len(ts), B, H] must not depend on t
        np.testing.assert_allclose(diff, np.broadcast_to(diff[:1], diff.shape), atol=1e-4)


def test_gate_loss_matches_cross_entropy(probs_and_logits):
    p, logits = probs_and_logits
    n = T // BLOCK
    m = _tile_mass_np(p)
    _, optional = _structure(n)
    tau = 0.7
    ces = []
    for b in range(n):
        ts = sorted(optional[b])
        if len(ts) < 2:
            continue
        for bb in range(B):
            for h in range(H):
                target = np.array([m[bb, h, b, t] for t in ts])
                target /= target.sum()
                s = np.array([logits[bb, h, b * BLOCK:(b + 1) * BLOCK, t * BLOCK:(t + 1) * BLOCK].mean() for t in ts]) / tau
                log_q = s - np.log(np.exp(s - s.max()).sum()) - s.max()
                ces.append(-(target * log_q).sum())
    got = conc.gate_loss(jnp.asarray(p, jnp.float32), BLOCK, tau=tau)
    np.testing.assert_allclose(float(got), np.mean(ces), rtol=1e-4)


def test_gate_captured_mass_uses_pooled_ranking(probs_and_logits):
    p, logits = probs_and_logits
    n, f = T // BLOCK, 0.25
    m = _tile_mass_np(p)
    mandatory, optional = _structure(n)
    expected = np.zeros((B, H, n))
    for b in range(n):
        budget = max(1, math.ceil(f * (b + 1)))
        for bb in range(B):
            for h in range(H):
                ts = sorted(optional[b], key=lambda t: -logits[bb, h, b * BLOCK:(b + 1) * BLOCK, t * BLOCK:(t + 1) * BLOCK].mean())
                expected[bb, h, b] = sum(m[bb, h, b, t] for t in mandatory[b] | set(ts[:budget]))
    got = conc.gate_captured_mass(jnp.asarray(p, jnp.float32), BLOCK, f)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_elements_for_mass(probs_and_logits):
    p, _ = probs_and_logits
    got = np.asarray(conc.elements_for_mass(jnp.asarray(p, jnp.float32), 0.95))
    for bb, h, i in [(0, 0, 0), (1, 2, 17), (0, 1, 31)]:
        c = np.cumsum(np.sort(p[bb, h, i])[::-1])
        assert got[bb, h, i] == int(np.searchsorted(c, 0.95) + 1) or abs(c[got[bb, h, i] - 1] - 0.95) < 1e-5


def test_tile_losses_refuse_partial_tiles_and_bad_layers(probs_and_logits):
    p, _ = probs_and_logits
    with pytest.raises(ConfigError, match="multiple of the tile size"):
        conc.tile_loss(jnp.asarray(p[..., :30, :30], jnp.float32), BLOCK, 0.125)
    with pytest.raises(ConfigError, match="do not exist"):
        conc.mean_over_layers(lambda x: x.mean(), [jnp.ones(2)] * 2, layers=[3])

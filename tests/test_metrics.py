"""Sparsity metrics and tile helpers against NumPy loops."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensa.sparsity import metrics
from condensa.attention.tiles import top_m_tiles
from condensa.kernels.tiling import mandatory_tiles, tile_budget, visible_tiles
from condensa.kernels.tiling.pooling import pooled_gate_scores, tile_masses

B, H, T = 2, 3, 10


@pytest.fixture(scope="module")
def sparse_probs():
    """Causal probabilities with about half of each row pruned (zeros), rows not renormalised."""
    rng = np.random.default_rng(0)
    p = rng.random((B, H, T, T)) ** 3 * np.tril(np.ones((T, T)))
    p /= p.sum(-1, keepdims=True)
    p *= rng.random(p.shape) > 0.5
    p[..., np.arange(T), np.arange(T)] += 0.01  # every row keeps its diagonal
    return p.astype(np.float32)


VIS = np.tril(np.ones((T, T), bool))


def loop_heads(fn):
    return np.array([fn(h) for h in range(H)])


def test_kept_fraction_and_per_row(sparse_probs):
    p = sparse_probs
    want = loop_heads(lambda h: (p[:, h] > 0).sum() / (B * VIS.sum()))
    np.testing.assert_allclose(metrics.kept_fraction(p, VIS[None, None]), want, rtol=1e-6)
    k = 3
    want = loop_heads(lambda h: np.mean([(p[b, h, i] > 0).sum() for b in range(B) for i in range(T) if i + 1 > k]))
    np.testing.assert_allclose(metrics.kept_per_row(p, VIS[None, None], k), want, rtol=1e-6)


def test_v_rows_fraction_for_decoding():
    rng = np.random.default_rng(1)
    p = rng.random((B, H, 1, T)) * (rng.random((B, H, 1, T)) > 0.6)
    vis = np.ones((B, 1, 1, T), bool)
    vis[0, ..., 7:] = False  # empty cache slots
    p = p * vis
    want = loop_heads(lambda h: sum((p[b, h, 0] > 0).sum() for b in range(B)) / vis.sum())
    np.testing.assert_allclose(metrics.v_rows_fraction(p, vis), want, rtol=1e-6)


def test_topk_mass_and_cover(sparse_probs):
    p = sparse_probs
    k = 2
    want = loop_heads(lambda h: np.mean([np.sort(p[b, h, i])[::-1][:k].sum() for b in range(B) for i in range(T) if i + 1 > k]))
    np.testing.assert_allclose(metrics.topk_mass(p, VIS[None, None], k), want, rtol=1e-6)

    def cover(row, mass):
        ordered = np.sort(row)[::-1]
        total = ordered.sum()
        return next(c for c in range(1, len(row) + 1) if ordered[:c].sum() >= mass * total - 1e-7)

    for mass in (0.9, 0.95):
        want = loop_heads(lambda h: np.mean([cover(p[b, h, i], mass) for b in range(B) for i in range(T)]))
        np.testing.assert_allclose(metrics.elements_to_cover(p, VIS[None, None], mass), want, rtol=1e-6)


def np_tile_masses(p, bq, bk):
    nq, nk = -(-p.shape[-2] // bq), -(-p.shape[-1] // bk)
    out = np.zeros(p.shape[:2] + (nq, nk))
    for b, h, qi, ki in np.ndindex(*out.shape):
        rows = range(qi * bq, min((qi + 1) * bq, p.shape[-2]))
        out[b, h, qi, ki] = np.mean([p[b, h, i, ki * bk:(ki + 1) * bk].sum() for i in rows])
    return out


@pytest.mark.parametrize("bq,bk", [(2, 2), (4, 3)])
def test_tile_masses_kept_tiles_and_oracle(sparse_probs, bq, bk):
    p = sparse_probs
    masses = np_tile_masses(p.astype(np.float64), bq, bk)
    np.testing.assert_allclose(tile_masses(jnp.asarray(p), bq, bk), masses, rtol=1e-5)
    nq, nk = masses.shape[-2:]
    causal = np.array([[ki * bk <= (qi + 1) * bq - 1 for ki in range(nk)] for qi in range(nq)])
    np.testing.assert_array_equal(visible_tiles(nq, nk, bq, bk), causal)
    used = np_tile_masses((p > 0).astype(np.float64), bq, bk) > 0
    want = loop_heads(lambda h: (used[:, h] & causal).sum() / (B * causal.sum()))
    np.testing.assert_allclose(metrics.tile_kept_fraction(p, bq, bk), want, rtol=1e-6)

    f, sink = 0.3, 1
    oracle = np.zeros(masses.shape, bool)
    mandatory = mandatory_tiles(nq, nk, bq, bk, sink)
    for b, h, qi in np.ndindex(B, H, nq):
        optional = [ki for ki in range(nk) if causal[qi, ki] and not mandatory[qi, ki]]
        best = sorted(optional, key=lambda ki: (-masses[b, h, qi, ki], ki))[: max(1, math.ceil(f * (qi + 1)))]
        oracle[b, h, qi] = mandatory[qi]
        oracle[b, h, qi, best] = True
    np.testing.assert_array_equal(metrics.oracle_tiles(jnp.asarray(p), bq, bk, f, sink), oracle)
    want = loop_heads(lambda h: np.mean([masses[b, h, qi][oracle[b, h, qi]].sum() for b in range(B) for qi in range(nq)]))
    np.testing.assert_allclose(metrics.captured_mass(jnp.asarray(p), oracle, bq, bk), want, rtol=1e-5)


def test_tile_geometry():
    assert [tile_budget(b, 0.125) for b in (0, 7, 8, 15, 16)] == [1, 1, 2, 2, 3]
    assert tile_budget(29, 0.1) == 3  # 0.1 * 30 is 3.0000000000000004 in floating point
    m = mandatory_tiles(4, 4, 2, 2, sink_tiles=1)
    np.testing.assert_array_equal(m, np.eye(4, dtype=bool) | (np.arange(4)[None, :] == 0))
    m = mandatory_tiles(2, 4, 4, 2, sink_tiles=0)  # query tiles of 4 span two key tiles of 2
    np.testing.assert_array_equal(m, [[1, 1, 0, 0], [0, 0, 1, 1]])
    q, k = (jax.random.normal(key, (2, 6, 3, 4)) for key in jax.random.split(jax.random.key(0), 2))
    got = pooled_gate_scores(q, k, 0.5, 4, 4)
    qn, kn = np.asarray(q), np.asarray(k)
    qbar = np.stack([qn[:, :4].mean(1), qn[:, 4:].mean(1)], 1)
    kbar = np.stack([kn[:, :4].mean(1), kn[:, 4:].mean(1)], 1)
    np.testing.assert_allclose(got, 0.5 * np.einsum("bqhd,bkhd->bhqk", qbar, kbar), rtol=1e-5)
    scores = jnp.asarray([[9.0, 1.0, 5.0, 5.0, 0.0]] * 5)
    kept = np.asarray(top_m_tiles(scores, 1, 1, 0.4, 1))
    assert kept[4].tolist() == [True, False, True, True, True]  # sink, diagonal, two best (tie -> lower index)


def test_sparsity_report_on_a_model(tiny_hf_dir):
    from condensa.attention import AttentionConfig
    from condensa.model import load_pretrained
    from condensa.sparsity import Thresholds

    model = load_pretrained(tiny_hf_dir)[0]
    ids = np.random.default_rng(0).integers(0, 98, size=(2, 16))
    report = metrics.sparsity_report(model, ids, attention=AttentionConfig(mode="topk", k=3))
    for layer in report["layers"]:
        assert layer["kept_per_row"]["mean"] == pytest.approx(3.0)  # exact top-k keeps k per long row
        assert layer["topk_mass"]["mean"] == pytest.approx(1.0, abs=1e-5)  # and renormalises over them
        assert layer["cover_95"]["mean"] <= 3.0
    assert report["mean"]["kept_fraction"] < 0.5 and len(report["layers"]) == 2

    gate = dict(tile_gate=True, block_q=4, block_k=4, tile_budget=0.25, sink_tiles=1)
    inf = np.full((2, 4, 16), np.inf, np.float32)
    closed = Thresholds(theta=inf, sdc_delta=np.zeros_like(inf), tile_theta=inf[..., :4], tile_theta_decode=inf[..., :4], block_q=4,
                        block_k=4, tile_budget=0.25, sink_tiles=1)  # Θ = +inf: the gate keeps only what it must
    report = metrics.sparsity_report(model, ids, attention=AttentionConfig(mode="dense", k=3, **gate), thresholds=closed)
    for layer in report["layers"]:
        assert layer["tile_kept_fraction"]["mean"] < 1.0
        assert layer["gate_tile_mass"]["mean"] <= layer["oracle_tile_mass"]["mean"] + 1e-6
        assert layer["kept_fraction"]["mean"] < 1.0

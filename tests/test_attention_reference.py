"""The reference attention rules against NumPy brute forces written straight from DESIGN.md."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensa.attention import AttentionConfig
from condensa.attention import attend as _attend
from condensa.attention.topk import topk_probs
from condensa.errors import ConfigError, ThresholdsError
from condensa.sparsity.thresholds import Thresholds

B, T, H, D = 2, 12, 2, 4
SCALE = 0.5


_jitted_attend = jax.jit(_attend, static_argnames=("scale", "layer_idx", "config"))


def attend(q, k, v, *, visible, scale, layer_idx, config, thresholds=None):
    """`condensa.attention.attend` under jit: one compile per config instead of one per primitive."""
    return _jitted_attend(q, k, v, visible=visible, scale=scale, layer_idx=layer_idx, config=config,
                          thresholds=thresholds)


def _qkv(seed=0, t=T, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(key, (B, t, H, D), jnp.float32).astype(dtype) for key in keys]


def _visible(t=T, pad=(0, 3)):
    """Causal mask with left padding: sequence b has its first pad[b] slots empty."""
    vis = np.tril(np.ones((t, t), bool))[None].repeat(B, 0)
    for b, p in enumerate(pad):
        vis[b, :, :p] = False
        vis[b, :p, :] = False
    return jnp.asarray(vis[:, None])


def _thresholds(theta, delta=None, tile_theta=None, tile_theta_decode=None, **meta):
    theta = np.asarray(theta, np.float32)
    delta = np.zeros_like(theta) if delta is None else np.asarray(delta, np.float32)
    return Thresholds(theta=theta, sdc_delta=delta, tile_theta=tile_theta, tile_theta_decode=tile_theta_decode, **meta)


def _scores_np(q, k):
    return SCALE * np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))


# ---- NumPy brute forces ---------------------------------------------------------------------------


def np_topk_row(a, allowed, k):
    out = np.zeros_like(a)
    idx = [j for j in np.argsort(-a, kind="stable") if allowed[j]][:k]
    if idx:
        e = np.exp(a[idx] - a[idx].max())
        out[idx] = e / e.sum()
    return out


def np_pre_row(a, vis, allowed, theta, dense, sdc, gamma, dbar):
    out = np.zeros_like(a)
    if not allowed.any():
        return out
    m = a[allowed].max()
    keep = allowed & ((a > theta) | dense)
    if not keep.any():
        keep[np.flatnonzero(allowed)[np.argmax(a[allowed])]] = True
    dropped = vis & ~keep
    if sdc == "exact":
        delta = np.exp(a[dropped] - m).sum()
    elif sdc == "exp-threshold":
        delta = dropped.sum() * math.exp(min(theta - m, 0.0)) if dropped.any() else 0.0
    elif sdc == "calibrated":
        delta = dbar if dropped.any() else 0.0
    else:
        delta = 0.0
    e = np.where(keep, np.exp(a - m), 0.0)
    return e / (e.sum() + gamma * delta)


def np_post_row(a, allowed, theta, dense):
    out = np.zeros_like(a)
    if not allowed.any():
        return out
    p = np.where(allowed, np.exp(a - a[allowed].max()), 0.0)
    p /= p.sum()
    keep = allowed & ((p > theta) | dense)
    if not keep.any():
        keep[np.flatnonzero(allowed)[np.argmax(a[allowed])]] = True
    return np.where(keep, p, 0.0)


def np_rows(fn, scores, visible, allowed=None):
    """Applies a per-row brute force to [B, H, Tq, Tk]."""
    vis = np.broadcast_to(np.asarray(visible), scores.shape)
    allowed = vis if allowed is None else np.broadcast_to(np.asarray(allowed), scores.shape)
    out = np.zeros_like(scores)
    for b, h, i in np.ndindex(*scores.shape[:3]):
        out[b, h, i] = fn(scores[b, h, i], vis[b, h, i], allowed[b, h, i], b, h, i)
    return out


# ---- top-k ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5, 20])
def test_topk_matches_numpy_with_ties_and_short_rows(k):
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 4, size=(B, H, T, T)).astype(np.float32)  # many exact ties
    visible = np.asarray(_visible())
    got = np.asarray(topk_probs(jnp.asarray(scores), jnp.asarray(visible), k))
    want = np_rows(lambda a, v, al, *_: np_topk_row(a.astype(np.float64), al, k), scores, visible)
    np.testing.assert_allclose(got, want, atol=1e-6)
    n = visible[:, 0].sum(-1)  # rows with n <= k are dense
    short = np.broadcast_to((n <= k)[:, None], got.shape[:3])
    assert np.all((got > 0).sum(-1)[~short] == k)
    assert np.all((got > 0).sum(-1)[short] == np.broadcast_to(n[:, None], got.shape[:3])[short])


def test_topk_mode_through_attend():
    q, k, v = _qkv(1)
    vis = _visible()
    cfg = AttentionConfig(mode="topk", k=3, layer_k="1:5")
    for layer, k_l in ((0, 3), (1, 5)):
        _, probs = attend(q, k, v, visible=vis, scale=SCALE, layer_idx=layer, config=cfg)
        want = np_rows(lambda a, vv, al, *_: np_topk_row(a, al, k_l), _scores_np(q, k), vis)
        np.testing.assert_allclose(np.asarray(probs), want, atol=1e-5)


def test_topk_with_exact_sdc_keeps_softmax_probabilities_without_renormalising():
    """Top-k with sdc="exact" (the Top-θ reference's top-k at calibration for post-softmax
    Top-θ): the full row's softmax, zero outside the k largest; the rows sum to less than 1."""
    q, k, v = _qkv(2)
    vis = _visible()
    cfg = AttentionConfig(mode="topk", k=3, sdc="exact")
    _, probs = attend(q, k, v, visible=vis, scale=SCALE, layer_idx=0, config=cfg)

    def row(a, vv, al, *_):
        if not al.any():  # a padding row
            return np.zeros_like(a)
        e = np.where(al, np.exp(a - a[al].max()), 0.0)
        p = e / e.sum()
        top = [j for j in np.argsort(-a, kind="stable") if al[j]][:3]
        return np.where(np.isin(np.arange(a.size), top), p, 0.0)

    want = np_rows(row, _scores_np(q, k), vis)
    np.testing.assert_allclose(np.asarray(probs), want, atol=1e-6)
    sums = np.asarray(probs).sum(-1)
    long_rows = np.broadcast_to(np.asarray(vis)[:, :, :, :].sum(-1) > 3, sums.shape)
    assert (sums[long_rows] < 1 - 1e-4).all()


# ---- Top-θ ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def theta_tables():
    rng = np.random.default_rng(0)
    theta = rng.normal(0.2, 0.3, size=(2, H, T)).astype(np.float32)
    delta = rng.uniform(0.0, 2.0, size=(2, H, T)).astype(np.float32)
    return theta, delta


@pytest.mark.parametrize("sdc", ["none", "exact", "exp-threshold", "calibrated"])
def test_toptheta_pre_matches_numpy(sdc, theta_tables):
    theta, delta = theta_tables
    q, k, v = _qkv(2)
    vis = _visible()
    cfg = AttentionConfig(mode="toptheta", k=2, sdc=sdc, gamma=0.7)
    _, probs = attend(q, k, v, visible=vis, scale=SCALE, layer_idx=1, config=cfg,
                      thresholds=_thresholds(theta, delta, k=2))
    n = np.asarray(vis)[:, 0].sum(-1)

    def row(a, vv, al, b, h, i):
        return np_pre_row(a, vv, al, theta[1, h, max(n[b, i], 1) - 1], n[b, i] <= 2, sdc, 0.7,
                          delta[1, h, max(n[b, i], 1) - 1])

    np.testing.assert_allclose(np.asarray(probs), np_rows(row, _scores_np(q, k), vis), atol=1e-5)


def test_toptheta_post_matches_numpy():
    rng = np.random.default_rng(3)
    theta = rng.uniform(0.02, 0.3, size=(1, H, T)).astype(np.float32)
    q, k, v = _qkv(3)
    vis = _visible()
    cfg = AttentionConfig(mode="toptheta", placement="post", k=1)
    _, probs = attend(q, k, v, visible=vis, scale=SCALE, layer_idx=0, config=cfg,
                      thresholds=_thresholds(theta, placement="post", k=1))
    n = np.asarray(vis)[:, 0].sum(-1)
    want = np_rows(lambda a, vv, al, b, h, i: np_post_row(a, al, theta[0, h, max(n[b, i], 1) - 1], n[b, i] <= 1),
                   _scores_np(q, k), vis)
    np.testing.assert_allclose(np.asarray(probs), want, atol=1e-6)


def test_exact_sdc_with_gamma_one_equals_post_softmax_pruning(theta_tables):
    theta, _ = theta_tables
    q, k, v = _qkv(4)
    vis = _visible()
    th = _thresholds(theta, k=2)
    _, exact = attend(q, k, v, visible=vis, scale=SCALE, layer_idx=0, thresholds=th,
                      config=AttentionConfig(mode="toptheta", k=2, sdc="exact", gamma=1.0))
    _, dense = attend(q, k, v, visible=vis, scale=SCALE, layer_idx=0, config=AttentionConfig())
    kept = np.asarray(exact) > 0
    assert 0 < kept.sum() < np.asarray(vis).sum() * H  # something was pruned
    np.testing.assert_allclose(np.asarray(exact), np.where(kept, np.asarray(dense), 0.0), atol=1e-6)


def test_vmc_matches_formula(theta_tables):
    theta, delta = theta_tables
    q, k, v = _qkv(5)
    vis = _visible()
    th = _thresholds(theta, delta, k=2)
    base = AttentionConfig(mode="toptheta", k=2, sdc="calibrated")
    out_plain, probs = attend(q, k, v, visible=vis, scale=SCALE, layer_idx=0, config=base, thresholds=th)
    out_vmc, _ = attend(q, k, v, visible=vis, scale=SCALE, layer_idx=0, config=base.replace(vmc=True), thresholds=th)
    p = np.asarray(probs, np.float64)
    visn = np.broadcast_to(np.asarray(vis), p.shape)
    vn = np.asarray(v, np.float64)
    want = np.zeros(out_vmc.shape)
    for b, h, i in np.ndindex(B, H, T):
        if not visn[b, h, i].any():
            continue
        v_bar = vn[b, visn[b, h, i], h].mean(axis=0)
        want[b, i, h] = p[b, h, i] @ vn[b, :, h] + (1 - p[b, h, i].sum()) * v_bar
    np.testing.assert_allclose(np.asarray(out_vmc), want, atol=1e-5)
    assert np.abs(np.asarray(out_vmc) - np.asarray(out_plain)).max() > 1e-3  # it did something


def test_exp_threshold_counts_only_visible_keys(theta_tables):
    """Invisible slots (padding, empty cache slots) must not add to Δ: the same row with extra
    invisible keys in front gives the same probabilities."""
    theta, _ = theta_tables
    q, k, v = _qkv(6)
    cfg = AttentionConfig(mode="toptheta", k=2, sdc="exp-threshold")
    th = _thresholds(theta, k=2)
    pad = 4
    vis_short = jnp.asarray(np.tril(np.ones((T - pad, T - pad), bool))[None, None].repeat(B, 0))
    _, short = attend(q[:, pad:], k[:, pad:], v[:, pad:], visible=vis_short, scale=SCALE, layer_idx=0,
                      config=cfg, thresholds=th)
    _, padded = attend(q, k, v, visible=_visible(pad=(pad, pad)), scale=SCALE, layer_idx=0, config=cfg, thresholds=th)
    np.testing.assert_allclose(np.asarray(padded)[:, :, pad:, pad:], np.asarray(short), atol=1e-6)


# ---- the empty-row rule -------------------------------------------------------------------------------

_EMPTY_CASES = [
    dict(mode="toptheta", sdc=s) for s in ("none", "exact", "exp-threshold", "calibrated")
] + [dict(mode="toptheta", placement="post"), dict(mode="toptheta", vmc=True, sdc="exact"),
     dict(mode="toptheta", tile_gate=True, block_q=4, block_k=4, tile_budget=0.5, sdc="calibrated", vmc=True)]


@functools.partial(jax.jit, static_argnames=("configs",))
def _all_empty_cases(q, k, v, vis, thresholds, configs):
    """Every case in one compiled program (one compile per dtype keeps the test fast)."""
    return [_attend(q, k, v, visible=vis, scale=SCALE, layer_idx=0, config=c, thresholds=t)
            for c, t in zip(configs, thresholds)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_rows_where_nothing_survives_keep_their_largest(dtype):
    """θ = +inf everywhere (and Θ = +inf for the gate): every mode must keep exactly the row's
    largest element, and produce no NaN, in every compute dtype."""
    q, k, v = _qkv(7, dtype=dtype)
    vis = _visible()
    inf = np.full((1, H, T), np.inf, np.float32)
    configs, thresholds = [], []
    for case in _EMPTY_CASES:
        gate = dict(tile_theta=np.full((1, H, 3), np.inf, np.float32), tile_theta_decode=np.full((1, H, 3), np.inf, np.float32),
                    block_q=4, block_k=4, tile_budget=0.5, sink_tiles=1) if case.get("tile_gate") else {}
        configs.append(AttentionConfig(k=1, **case))
        thresholds.append(_thresholds(inf, np.ones((1, H, T)), placement=case.get("placement", "pre"), k=1, **gate))
    results = _all_empty_cases(q, k, v, vis, thresholds, tuple(configs))
    scores = np.where(np.broadcast_to(np.asarray(vis), (B, H, T, T)),
                      _scores_np(q.astype(jnp.float32), k.astype(jnp.float32)), -np.inf)
    rows = np.broadcast_to(np.asarray(vis), scores.shape).any(-1)
    n = np.asarray(vis)[:, 0].sum(-1)
    long_rows = rows & np.broadcast_to((n > 1)[:, None], rows.shape)
    for case, (out, probs) in zip(_EMPTY_CASES, results):
        probs, out = np.asarray(probs), np.asarray(out.astype(jnp.float32))
        assert np.isfinite(probs).all() and np.isfinite(out).all(), case
        kept = probs > 0
        assert np.all(kept.sum(-1)[long_rows] == 1), case
        if not case.get("tile_gate"):  # with the gate the largest is taken among the kept tiles only
            assert np.all((kept.argmax(-1) == scores.argmax(-1))[long_rows]), case
        assert not kept[~rows].any(), case


# ---- the tile gate --------------------------------------------------------------------------------------


def np_prefill_gate(q, k, key_valid, tile_theta, bq, bk, f, sink):
    """[B, H, nq, nk] kept tiles, written from DESIGN.md with loops."""
    bsz, t = q.shape[:2]
    nq, nk = -(-t // bq), -(-t // bk)
    kept = np.zeros((bsz, H, nq, nk), bool)
    for b_, h, bi in np.ndindex(bsz, H, nq):
        rows = range(bi * bq, min((bi + 1) * bq, t))
        qbar = np.mean([q[b_, i, h] for i in rows], axis=0)
        m = max(1, math.ceil(round(f * (bi + 1), 9)))
        visible_t = [tt for tt in range(nk) if tt * bk <= (bi + 1) * bq - 1]
        mandatory = {tt for tt in visible_t if tt < sink or (tt * bk <= (bi + 1) * bq - 1 and (tt + 1) * bk - 1 >= bi * bq)}
        optional = [tt for tt in visible_t if tt not in mandatory]
        for tt in mandatory:
            kept[b_, h, bi, tt] = True
        for tt in optional:
            cols = [j for j in range(tt * bk, min((tt + 1) * bk, t)) if key_valid[b_, j]]
            kbar = np.mean([k[b_, j, h] for j in cols], axis=0) if cols else np.zeros(D)
            s = SCALE * qbar @ kbar
            kept[b_, h, bi, tt] = len(optional) <= m or s > tile_theta[h, min(bi, tile_theta.shape[1] - 1)]
    return kept


@pytest.mark.parametrize("bq,bk,f,sink", [(4, 4, 0.34, 1), (4, 2, 0.2, 2), (3, 3, 0.5, 0)])
def test_prefill_gate_matches_numpy(bq, bk, f, sink):
    from condensa.attention.tile_gate import prefill_kept_tiles

    t = 16
    q, k, _ = _qkv(8, t=t)
    rng = np.random.default_rng(bq + bk)
    tile_theta = rng.normal(0.0, 0.3, size=(H, 3)).astype(np.float32)  # shorter than nq: last entry reused
    key_valid = np.ones((B, t), bool)
    key_valid[1, :3] = False
    got = prefill_kept_tiles(q, k, scale=SCALE, key_valid=jnp.asarray(key_valid), tile_theta=tile_theta,
                             block_q=bq, block_k=bk, tile_budget=f, sink_tiles=sink)
    want = np_prefill_gate(np.asarray(q, np.float64), np.asarray(k, np.float64), key_valid, tile_theta, bq, bk, f, sink)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_gate_always_keeps_diagonal_and_sink_tiles_and_prunes_elements():
    q, k, v = _qkv(9, t=16)
    vis = jnp.asarray(np.tril(np.ones((16, 16), bool))[None, None])
    gate = dict(block_q=4, block_k=4, tile_budget=0.25, sink_tiles=1)
    th = _thresholds(np.zeros((1, H, 16)), tile_theta=np.full((1, H, 4), np.inf, np.float32),
                     tile_theta_decode=np.full((1, H, 4), np.inf, np.float32), k=1, **gate)
    _, probs = attend(q, k, v, visible=vis, scale=SCALE, layer_idx=0, thresholds=th,
                      config=AttentionConfig(mode="dense", tile_gate=True, **gate))
    used = np.asarray(probs).reshape(B, H, 4, 4, 4, 4).sum(axis=(3, 5)) > 0  # [B, H, nq, nk]
    for bi in range(4):
        assert used[:, :, bi, bi].all() and used[:, :, bi, 0].all()  # diagonal and sink
    # query tile 3 has optional tiles {1, 2} > its budget 1 and Θ = inf, so both are dropped
    assert not used[:, :, 3, 1:3].any()
    # query tile 2 has one optional tile <= budget: kept by rule
    assert used[:, :, 2, 1].all()
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)  # dense inside kept tiles renormalises


def test_decode_gate_matches_numpy():
    slots, bk, f, sink = 20, 4, 0.3, 1
    q, k, v = _qkv(10, t=slots)
    q1 = q[:, :1]
    positions = [17, 10]  # each sequence's query slot
    key_valid = np.zeros((B, slots), bool)
    for b_, p in enumerate(positions):
        key_valid[b_, : p + 1] = True
    key_valid[1, :2] = False  # left padding
    vis = jnp.asarray(key_valid[:, None, None, :])
    rng = np.random.default_rng(1)
    dec = rng.normal(0.0, 0.3, size=(1, H, 5)).astype(np.float32)
    gate = dict(block_q=4, block_k=bk, tile_budget=f, sink_tiles=sink)
    th = _thresholds(np.full((1, H, slots), -np.inf), tile_theta=np.zeros((1, H, 5), np.float32), tile_theta_decode=dec, k=1, **gate)
    _, probs = attend(q1, k, v, visible=vis, scale=SCALE, layer_idx=0, thresholds=th,
                      config=AttentionConfig(mode="dense", tile_gate=True, **gate))
    got = np.asarray(probs)[:, :, 0] > 0
    qn, kn = np.asarray(q1, np.float64), np.asarray(k, np.float64)
    for b_, p in enumerate(positions):
        last = p // bk
        optional = [t for t in range(last) if t >= min(sink, last)]
        m = max(1, math.ceil(round(f * (last + 1), 9)))
        for h in range(H):
            for t in range(5):
                cols = [j for j in range(t * bk, (t + 1) * bk) if key_valid[b_, j]]
                if not cols:
                    continue
                kbar = kn[b_, cols, h].mean(axis=0)
                s = SCALE * qn[b_, 0, h] @ kbar
                keep = t == last or t < min(sink, last) or (t in optional and (len(optional) <= m or s > dec[0, h, last]))
                assert got[b_, h, cols].all() == keep and got[b_, h, cols].any() == keep, (b_, h, t)


# ---- config and usage errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="topp"), "Did you mean 'topk'"),
    (dict(placement="middle"), "placement"),
    (dict(mode="toptheta", sdc="exactly"), "Did you mean 'exact'"),
    (dict(mode="toptheta", placement="post", sdc="exact"), "only applies"),
    (dict(mode="topk", sdc="calibrated"), "only applies"),
    (dict(k=0), "k must be"),
    (dict(gamma=-1.0), "gamma"),
    (dict(layer_k="0=5"), "LAYER:K"),
    (dict(layer_k="a:5"), "whole numbers"),
    (dict(tile_budget=0.0), "tile_budget"),
    (dict(block_q=0), "tile sizes"),
    (dict(sink_tiles=-1), "sink_tiles"),
    (dict(backend="cuda"), "backend"),
    (dict(decode_gate_rows=True), "needs tile_gate"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AttentionConfig(**kwargs)


def test_layer_k_forms_and_dense_layers():
    assert AttentionConfig(layer_k="1:8, 0:4").layer_k == ((0, 4), (1, 8))
    assert AttentionConfig(layer_k={1: 8}).k_for(1) == 8 and AttentionConfig(layer_k={1: 8}).k_for(0) == 64
    q, k, v = _qkv(11)
    vis = _visible()
    cfg = AttentionConfig(mode="topk", k=1, dense_layers=(1,))
    _, dense = attend(q, k, v, visible=vis, scale=SCALE, layer_idx=0, config=AttentionConfig())
    _, layer1 = attend(q, k, v, visible=vis, scale=SCALE, layer_idx=1, config=cfg)
    np.testing.assert_array_equal(np.asarray(layer1), np.asarray(dense))


def test_missing_thresholds_are_user_errors():
    q, k, v = _qkv(12)
    vis = _visible()
    with pytest.raises(ThresholdsError, match="calibrate"):
        attend(q, k, v, visible=vis, scale=SCALE, layer_idx=0, config=AttentionConfig(mode="toptheta"))
    with pytest.raises(ThresholdsError, match="--tile"):
        attend(q, k, v, visible=vis, scale=SCALE, layer_idx=0, thresholds=_thresholds(np.zeros((1, H, T))),
               config=AttentionConfig(mode="toptheta", tile_gate=True))


def test_for_layer_resolves_a_layers_rule_once():
    """A layer in dense_layers runs plain dense attention (on the same backend); another layer runs
    the rule with its own k, and the resolved config no longer depends on the layer index."""
    rule = AttentionConfig(mode="topk", k=8, layer_k="2:16", dense_layers=(1,), tile_gate=True, block_q=8, block_k=8,
                           tile_budget=0.25, tile_selector="window", backend="pallas")
    dense = rule.for_layer(1)
    assert dense.is_dense and dense == AttentionConfig(backend="pallas")
    assert rule.for_layer(0).k == 8 and rule.for_layer(2).k == 16
    assert rule.for_layer(2) == rule.replace(k=16, layer_k=(), dense_layers=())
    assert not rule.for_layer(0).is_dense and rule.for_layer(0).for_layer(1) == rule.for_layer(0)

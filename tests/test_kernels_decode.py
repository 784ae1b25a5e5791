"""The Pallas decode kernel (interpret mode, fp32) against the reference attention op.

The oracle is `condensa.attention.attend` on a single query row with the cache's visibility mask:
the model-facing Top-θ decode semantics (gate, θ, calibrated SDC, VMC, empty-row rule). The block
counts are checked against a NumPy count of the tiles the gate keeps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensa.attention import AttentionConfig, attend
from condensa.errors import ConfigError
from condensa.kernels.toptheta_decode import toptheta_decode
from condensa.sparsity.thresholds import Thresholds

H = 2
BK = 16
SINK = 1
BUDGET = 0.25
RTOL = 1e-5

_attend = jax.jit(attend, static_argnames=("scale", "layer_idx", "config"))


def _inputs(seed, b, s, d, tq=1):
    """Random cache with a per-tile offset along a direction q shares, so gate scores vary by tile."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, tq, H, d)).astype(np.float32)
    k = rng.normal(size=(b, s, H, d)).astype(np.float32)
    v = rng.normal(size=(b, s, H, d)).astype(np.float32)
    tile_bias = rng.normal(0.0, 1.5, size=(b, -(-s // BK), H, 1))
    k += (np.repeat(tile_bias, BK, axis=1)[:, :s] * q[:, :1] / math.sqrt(d)).astype(np.float32)
    return q, k, v


def _visible(lengths, s, tq=1, starts=None):
    """bool [B, 1, Tq, S]: query r of Tq sees slots [start, length - (Tq - 1 - r))."""
    vis = np.zeros((len(lengths), 1, tq, s), bool)
    for b, n in enumerate(lengths):
        for r in range(tq):
            vis[b, 0, r, (0 if starts is None else starts[b]):n - (tq - 1 - r)] = True
    return vis


def _tile_means(k, vis_row, bk):
    """k̄_t over the valid keys of each tile (zeros for a tile without one): what the cache keeps."""
    b, s, h, d = k.shape
    nk = -(-s // bk)
    out = np.zeros((b, nk, h, d), np.float32)
    for bi in range(b):
        for t in range(nk):
            rows = [j for j in range(t * bk, min(s, (t + 1) * bk)) if vis_row[bi, j]]
            if rows:
                out[bi, t] = k[bi, rows].astype(np.float64).mean(axis=0)
    return out


def _v_mean(v, vis):
    """[B, Tq, H, D]: mean of the V rows each query sees."""
    w = vis[:, 0].astype(np.float64)  # [B, Tq, S]
    return (np.einsum("bqs,bshd->bqhd", w, v) / w.sum(-1)[..., None, None]).astype(np.float32)


def _scores(q, k, scale):
    return scale * np.einsum("bqhd,bshd->bhqs", q.astype(np.float64), k.astype(np.float64))


def _between(values, quantile):
    """A threshold near `quantile` of `values` but halfway inside the widest nearby gap, so float32
    rounding of a score can never flip a comparison with it."""
    x = np.unique(np.asarray(values, np.float64).ravel())
    i = int(np.clip(round(quantile * (len(x) - 1)), 2, len(x) - 4))
    j = i - 2 + int(np.argmax(np.diff(x[i - 2:i + 3])))
    return np.float32((x[j] + x[j + 1]) / 2)


def _theta_table(q, k, vis, scale, quantile):
    """θ[h, n - 1]: per head, a value near a quantile of the visible scores (±inf passed through)."""
    s = vis.shape[-1]
    if quantile in (-np.inf, np.inf):
        return np.full((H, s), quantile, np.float32)
    a = _scores(q, k, scale)
    values = [_between(a[:, h][np.broadcast_to(vis[:, 0], a[:, h].shape)], quantile) for h in range(H)]
    return np.repeat(np.asarray(values, np.float32)[:, None], s, axis=1)


def _gate_table(q, k_bar, scale, nk, quantile=0.5):
    """Θ_dec[h, t]: near a quantile of this batch's gate scores (same value for every t)."""
    g = scale * np.einsum("bhd,bthd->bht", q[:, 0].astype(np.float64), k_bar.astype(np.float64))
    values = [_between(g[:, h], quantile) for h in range(H)]
    return np.repeat(np.asarray(values, np.float32)[:, None], nk, axis=1)


def _reference(q, k, v, vis, scale, *, theta, sdc_delta, vmc, gate_theta):
    mode = "dense" if theta is None else "toptheta"
    config = AttentionConfig(mode=mode, sdc="calibrated" if sdc_delta is not None else "none", vmc=vmc, k=1,
                             tile_gate=gate_theta is not None, block_q=BK, block_k=BK, tile_budget=BUDGET,
                             sink_tiles=SINK)
    s = k.shape[1]
    th = None
    if theta is not None or gate_theta is not None:
        nk = -(-s // BK)
        th = Thresholds(
            theta=(theta if theta is not None else np.zeros((H, s), np.float32))[None],
            sdc_delta=(sdc_delta if sdc_delta is not None else np.zeros((H, s), np.float32))[None],
            tile_theta=None if gate_theta is None else np.zeros((1, H, nk), np.float32),
            tile_theta_decode=None if gate_theta is None else gate_theta[None], k=1)
    out, _ = _attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), visible=jnp.asarray(vis), scale=scale,
                     layer_idx=0, config=config, thresholds=th)
    return np.asarray(out)


def _check(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < RTOL, f"relative error {err:.2e}"


# ---- parity with the reference -------------------------------------------------------------------

CASES = [  # (head_dim, theta quantile or None, gate, sdc, vmc, splits, how V is skipped)
    (64, None, False, False, False, 1, "rows"),
    (64, np.inf, True, True, True, 2, "rows"),
    (64, 0.8, False, True, False, 3, "blocks"),
    (64, 0.9, True, True, True, 3, "rows"),
    (128, 0.8, True, False, True, 2, "blocks"),
    (128, None, True, False, False, 2, "rows"),
    (64, 0.8, False, True, True, 2, "rows_branch"),
]


# the Triton-style kernel in interpret mode, and the Mosaic TPU kernel in TPU interpret mode (which
# reads V in whole blocks only), the latter on the cases that cover every feature and both head dims
KERNEL_BACKENDS = ["interpret", "tpu_interpret"]


# the other walks (V rows only). Per lane: nothing survives (gate, SDC, VMC), and hd 128 with
# survivors. Tensor cores: dense, survivors with the gate, SDC and VMC, and hd 128 without the gate.
HD128_SURVIVORS = (128, 0.8, False, True, True, 2, "rows")
WALK_CASES = [(CASES[1], "lanes"), (HD128_SURVIVORS, "lanes"),
              (CASES[0], "mma"), (CASES[3], "mma"), (HD128_SURVIVORS, "mma")]


@pytest.mark.parametrize("d,quantile,gate,sdc,vmc,splits,skip_v,backend,walk",
                         [(*case, "interpret", "reduce") for case in CASES]
                         + [(*CASES[i], "tpu_interpret", "reduce") for i in (1, 2, 4, 5)]
                         + [(*case, "interpret", walk) for case, walk in WALK_CASES])
def test_decode_matches_reference(d, quantile, gate, sdc, vmc, splits, skip_v, backend, walk):
    skip_v = "blocks" if backend == "tpu_interpret" else skip_v
    b, s = 3, 96
    lengths = [96, 41, 70]  # ragged, none a multiple of the block except the full one
    scale = 1.0 / math.sqrt(d)
    q, k, v = _inputs(d + splits, b, s, d)
    vis = _visible(lengths, s)
    theta = None if quantile is None else _theta_table(q, k, vis, scale, quantile)
    sdc_delta = None
    if sdc:
        sdc_delta = np.abs(np.random.default_rng(1).normal(1.0, 0.5, size=(H, s))).astype(np.float32)
    k_bar = _tile_means(k, vis[:, 0, 0], BK)
    gate_theta = _gate_table(q, k_bar, scale, k_bar.shape[1]) if gate else None
    v_mean = _v_mean(v, vis)
    got, stats = toptheta_decode(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), theta=theta, sdc_delta=sdc_delta,
        vmc=vmc, v_mean=jnp.asarray(v_mean), k_tile_mean=jnp.asarray(k_bar) if gate else None,
        tile_theta_decode=gate_theta, sink_tiles=SINK, tile_budget=BUDGET, block_k=BK, num_splits=splits,
        skip_v=skip_v, walk=walk, backend=backend)
    want = _reference(q, k, v, vis, scale, theta=theta, sdc_delta=sdc_delta, vmc=vmc, gate_theta=gate_theta)
    _check(got, want)
    assert int(stats.v_loaded) <= int(stats.k_loaded) <= int(stats.visible)
    if quantile == np.inf:  # nothing survives: every row keeps its largest element, and no V block is read
        assert int(stats.v_loaded) == 0


def test_theta_minus_inf_without_gate_equals_dense_decoding():
    """θ = -inf keeps every key: the output is plain softmax attention over each cache (NumPy)."""
    b, s, d = 2, 80, 64
    lengths = [80, 37]
    q, k, v = _inputs(5, b, s, d)
    got, stats = toptheta_decode(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths),
                                 theta=np.full((H, s), -np.inf, np.float32), block_k=BK, num_splits=2,
                                 backend="interpret")
    a = _scores(q, k, 1 / 8)[:, :, 0]  # [B, H, S]
    want = np.zeros((b, 1, H, d))
    for bi, n in enumerate(lengths):
        p = np.exp(a[bi, :, :n] - a[bi, :, :n].max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        want[bi, 0] = np.einsum("hs,shd->hd", p, v[bi, :n])
    _check(got, want)
    assert int(stats.k_loaded) == int(stats.v_loaded) == int(stats.visible) == H * (5 + 3)


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cache_not_a_multiple_of_the_block_and_left_padding(backend, gate):
    """Without the gate the tile list is a range built elementwise (`contiguous_tiles`); with it,
    the compacted gate list: both must start at the first visible tile."""
    b, s, d = 2, 75, 64  # 75 slots: the wrapper pads the cache to 80
    lengths, starts = [75, 60], [0, 21]
    scale = 1 / 8
    q, k, v = _inputs(7, b, s, d)
    vis = _visible(lengths, s, starts=starts)
    theta = _theta_table(q, k, vis, scale, 0.85)
    k_bar = _tile_means(k, vis[:, 0, 0], BK)
    gate_theta = _gate_table(q, k_bar, scale, k_bar.shape[1], 0.4) if gate else None
    got, _ = toptheta_decode(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths),
                             starts=jnp.asarray(starts), theta=theta, k_tile_mean=jnp.asarray(k_bar) if gate else None,
                             tile_theta_decode=gate_theta, sink_tiles=SINK, tile_budget=BUDGET if gate else None,
                             block_k=BK, num_splits=2, backend=backend)
    want = _reference(q, k, v, vis, scale, theta=theta, sdc_delta=None, vmc=False, gate_theta=gate_theta)
    _check(got, want)
    if not gate:  # dense: every visible key counts, so a range that starts at the wrong tile shows
        got, _ = toptheta_decode(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths),
                                 starts=jnp.asarray(starts), block_k=BK, num_splits=2, backend=backend)
        _check(got, _reference(q, k, v, vis, scale, theta=None, sdc_delta=None, vmc=False, gate_theta=None))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_several_new_queries_per_sequence(backend):
    """Tq = 3 new tokens: query r sees lengths - (2 - r) keys (no gate: the reference gates Tq > 1 as prefill)."""
    b, s, d, tq = 2, 64, 64, 3
    lengths = [64, 30]
    scale = 1 / 8
    q, k, v = _inputs(9, b, s, d, tq=tq)
    vis = _visible(lengths, s, tq=tq)
    theta = _theta_table(q, k, vis, scale, 0.8)
    sdc_delta = np.full((H, s), 0.7, np.float32)
    v_mean = _v_mean(v, vis)
    got, _ = toptheta_decode(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), theta=theta,
                             sdc_delta=sdc_delta, vmc=True, v_mean=jnp.asarray(v_mean), block_k=BK,
                             num_splits=2, backend=backend)
    want = _reference(q, k, v, vis, scale, theta=theta, sdc_delta=sdc_delta, vmc=True, gate_theta=None)
    _check(got, want)


# ---- block counts --------------------------------------------------------------------------------


def _numpy_counts(q, k, lengths, k_bar, gate_theta, theta, scale):
    """K blocks = tiles the gate keeps; V blocks = kept tiles that hold a surviving element;
    V rows = the surviving elements."""
    k_blocks = v_blocks = v_rows = 0
    a = _scores(q, k, scale)[:, :, 0]
    for bi, n in enumerate(lengths):
        last = (n - 1) // BK
        optional = [t for t in range(last) if t >= SINK]
        budget = max(1, math.ceil(round(BUDGET * (last + 1), 9)))
        for h in range(H):
            th_gate = gate_theta[h, min(last, gate_theta.shape[1] - 1)]
            kept = []
            for t in range(last + 1):
                score = scale * q[bi, 0, h].astype(np.float64) @ k_bar[bi, t, h]
                if t == last or t < min(SINK, last) or len(optional) <= budget or score > th_gate:
                    kept.append(t)
            k_blocks += len(kept)
            for t in kept:
                survivors = int(np.sum(a[bi, h, t * BK:min(n, (t + 1) * BK)] > theta[h, n - 1]))
                v_blocks += survivors > 0
                v_rows += survivors
    return k_blocks, v_blocks, v_rows


@pytest.mark.parametrize("skip_v,backend", [("rows", "interpret"), ("rows_branch", "interpret"),
                                            ("blocks", "interpret"), ("blocks", "tpu_interpret")])
def test_loaded_block_counts_match_numpy(skip_v, backend):
    """rows (and rows_branch): the V rows read are the survivors; blocks: whole blocks of the tiles
    holding one."""
    b, s, d = 3, 160, 64
    lengths = [160, 97, 33]
    scale = 1 / 8
    q, k, v = _inputs(11, b, s, d)
    vis = _visible(lengths, s)
    theta = _theta_table(q, k, vis, scale, 0.97)
    k_bar = _tile_means(k, vis[:, 0, 0], BK)
    gate_theta = _gate_table(q, k_bar, scale, k_bar.shape[1], 0.6)
    got, stats = toptheta_decode(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), theta=theta,
                                 k_tile_mean=jnp.asarray(k_bar), tile_theta_decode=gate_theta, sink_tiles=SINK,
                                 tile_budget=BUDGET, block_k=BK, num_splits=3, backend=backend,
                                 poison_output=True, skip_v=skip_v)
    k_blocks, v_blocks, v_rows = _numpy_counts(q, k, lengths, k_bar, gate_theta, theta, scale)
    if skip_v == "blocks":
        v_rows = v_blocks * BK
    assert (int(stats.k_loaded), int(stats.v_loaded), int(stats.v_rows)) == (k_blocks, v_blocks, v_rows)
    assert int(stats.visible) == H * (10 + 7 + 3)
    assert v_blocks < k_blocks < int(stats.visible)  # the gate and θ both pruned something
    want = _reference(q, k, v, vis, scale, theta=theta, sdc_delta=None, vmc=False, gate_theta=gate_theta)
    _check(got, want)


# ---- user mistakes -------------------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    (dict(block_k=24), "power of two"),
    (dict(lengths=jnp.asarray([5])), "lengths must be"),
    (dict(tile_theta_decode=np.zeros((H, 4), np.float32)), "needs k_tile_mean"),
    (dict(tile_theta_decode=np.zeros((H, 4), np.float32), k_tile_mean=jnp.zeros((2, 3, H, 64))), "k_tile_mean has"),
    (dict(vmc=True), "v_mean"),
    (dict(theta=np.zeros((H + 1, 32), np.float32)), "theta must be"),
    (dict(sdc_delta=np.zeros((H, 32), np.float32)), "needs theta"),
    (dict(q=jnp.zeros((2, 1, H, 32))), "head_dim"),
    (dict(skip_v="some"), "skip_v"),
    (dict(backend="tpu_interpret", skip_v="rows"), "Triton feature"),
    (dict(walk="lanes", skip_v="blocks", theta=np.zeros((H, 32), np.float32)), "walk='lanes'"),
    (dict(walk="lanes"), "needs theta"),
    (dict(walk="mma", backend="tpu_interpret", skip_v="blocks"), "walk='mma'"),
    (dict(walk="sideways"), "walk='sideways'"),
])
def test_mistakes_raise_config_error(change, message):
    args = dict(q=jnp.zeros((2, 1, H, 64)), k=jnp.zeros((2, 32, H, 64)), v=jnp.zeros((2, 32, H, 64)),
                lengths=jnp.asarray([32, 20]), block_k=BK, backend="interpret")
    if "q" in change and change["q"].shape[-1] != 64:
        args["k"] = args["v"] = jnp.zeros((2, 32, H, change["q"].shape[-1]))
    args.update(change)
    with pytest.raises(ConfigError, match=message):
        toptheta_decode(**args)


def test_ungated_tile_list_is_the_visible_range():
    """`contiguous_tiles` lists what the gate-free `kept_tiles` keeps, compacted, for ragged lengths
    and left padding (the entries past each row's count are never read, so not compared)."""
    from condensa.kernels.toptheta_decode import compact, contiguous_tiles, kept_tiles

    lengths, starts, nk, bk = jnp.asarray([80, 60, 17, 1]), jnp.asarray([0, 21, 16, 0]), 5, BK
    tiles, count = contiguous_tiles(lengths, starts, heads=H, n_tiles=nk, block_k=bk)
    keep = kept_tiles(jnp.zeros((4, H, 64)), None, lengths, starts, n_tiles=nk, scale=1.0, block_k=bk,
                      tile_theta_decode=None, sink_tiles=SINK, budgets=None, queries_per_seq=1)
    want_tiles, want_count = np.asarray(compact(keep)), np.asarray(keep).sum(-1)
    np.testing.assert_array_equal(np.asarray(count), want_count)
    assert tiles.shape == want_tiles.shape
    for row, n in np.ndindex(*want_count.shape):
        np.testing.assert_array_equal(np.asarray(tiles)[row, n, :want_count[row, n]], want_tiles[row, n, :want_count[row, n]])

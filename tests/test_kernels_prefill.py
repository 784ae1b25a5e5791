"""The Pallas prefill kernel (interpret mode on CPU) against a NumPy float64 brute force of DESIGN.md.

The brute force below is written row by row from the semantics, independently of the kernel's
tiling: the gate's kept tiles, m_i over the allowed keys, S_i = {a > θ} (or the single largest
element), Δ̄ added only to rows that dropped something, and VMC over all visible V rows. Sizes are
tiny (T <= 96, blocks of 16/32) because interpret mode evaluates the kernel body op by op.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensa.errors import ConfigError
from condensa.kernels import compact_tile_lists, resolve_backend, toptheta_prefill, toptheta_prefill_reference

RTOL = 1e-5


# ---- the independent oracle -----------------------------------------------------------------


def tile_keep_oracle(q, k, *, scale, tile_theta, block_q, block_k, sink_tiles, tile_budget):
    """kept[qb, kt] for one (batch, head): mandatory diagonal/sink tiles, else the gate's choice."""
    t = q.shape[0]
    nq, nk = -(-t // block_q), -(-t // block_k)
    q_bar = np.stack([q[i * block_q:(i + 1) * block_q].mean(0) for i in range(nq)])
    k_bar = np.stack([k[j * block_k:(j + 1) * block_k].mean(0) for j in range(nk)])
    scores = scale * q_bar @ k_bar.T
    kept = np.zeros((nq, nk), bool)
    for qb in range(nq):
        optional = [kt for kt in range(nk) if (kt + 1) * block_k <= qb * block_q and kt >= sink_tiles]
        budget = max(1, math.ceil(round(tile_budget * (qb + 1), 9))) if tile_budget is not None else -1
        for kt in range(nk):
            if kt * block_k > min(t - 1, (qb + 1) * block_q - 1):
                continue  # not visible
            if kt not in optional:
                kept[qb, kt] = True  # diagonal or sink
            else:
                kept[qb, kt] = len(optional) <= budget or scores[qb, kt] > tile_theta[qb]
    return kept


def prefill_oracle(q, k, v, *, scale, theta=None, sdc_delta=None, gamma=1.0, vmc=False, tile_theta=None,
                   sink_tiles=1, tile_budget=None, block_q=32, block_k=16):
    """Returns (out [B, T, H, D] float64, listed tiles, causal tiles)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_size, t, h_size, _ = q.shape
    out = np.zeros_like(q)
    listed = causal = 0
    for b in range(b_size):
        for h in range(h_size):
            qh, kh, vh = q[b, :, h], k[b, :, h], v[b, :, h]
            a = scale * qh @ kh.T
            if tile_theta is not None:
                kept = tile_keep_oracle(qh, kh, scale=scale, tile_theta=np.asarray(tile_theta[h], np.float64),
                                        block_q=block_q, block_k=block_k, sink_tiles=sink_tiles,
                                        tile_budget=tile_budget)
            else:
                kept = tile_keep_oracle(qh, kh, scale=scale, tile_theta=np.full(99, -np.inf), block_q=block_q,
                                        block_k=block_k, sink_tiles=0, tile_budget=None)
            nq = kept.shape[0]
            for qb in range(nq):
                last = min(t - 1, (qb + 1) * block_q - 1)
                causal += sum(1 for kt in range(kept.shape[1]) if kt * block_k <= last)
                listed += int(kept[qb].sum())
            for i in range(t):
                allowed = np.array([j <= i and kept[i // block_q, j // block_k] for j in range(t)])
                row = a[i]
                m = row[allowed].max()
                keep = allowed & (row > (theta[h, i] if theta is not None else -np.inf))
                if not keep.any():
                    keep = np.zeros(t, bool)
                    keep[np.flatnonzero(allowed)[np.argmax(row[allowed])]] = True
                e = np.where(keep, np.exp(row - m), 0.0)
                denom = e.sum()
                if sdc_delta is not None and keep.sum() < i + 1:
                    denom += gamma * float(sdc_delta[h, i])
                p = e / denom
                out[b, i, h] = p @ vh
                if vmc:
                    out[b, i, h] += (1.0 - p.sum()) * vh[: i + 1].mean(0)
    return out, listed, causal


def rel_err(x, ref) -> float:
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x)), "kernel output holds NaN/inf (unwritten or broken rows)"
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def random_qkv(seed, t, d, b=2, h=2):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))


# ---- kernel vs oracle -----------------------------------------------------------------------

CASES = {
    # name: (T, D, block_q, block_k, options)
    "dense": (72, 64, 32, 16, dict()),
    "theta_minus_inf_is_dense": (40, 128, 32, 16, dict(theta="-inf")),
    "theta_sdc_none": (96, 64, 32, 16, dict(theta="random")),
    "theta_sdc_calibrated_vmc": (50, 128, 32, 16, dict(theta="random", sdc=True, vmc=True)),
    "gate_theta": (72, 64, 32, 16, dict(theta="random", gate=True)),
    "gate_theta_sdc_vmc_budget": (90, 128, 32, 16, dict(theta="random", gate=True, sdc=True, vmc=True,
                                                        tile_budget=0.25, gamma=0.7)),
    "theta_plus_inf_nothing_survives": (45, 64, 16, 16, dict(theta="+inf", gate=True, sdc=True, vmc=True)),
    "gate_dense_inside_tiles": (64, 64, 16, 16, dict(gate=True, sink_tiles=2)),
}


# the Triton-style kernel in interpret mode, and the Mosaic TPU kernel in TPU interpret mode (on
# the cases that between them cover every feature and both head dims, to keep CI short)
KERNEL_BACKENDS = ["interpret", "tpu_interpret"]
TPU_CASES = ["dense", "theta_sdc_calibrated_vmc", "gate_theta_sdc_vmc_budget", "theta_plus_inf_nothing_survives",
             "gate_dense_inside_tiles"]


@pytest.mark.parametrize("name,backend", [(name, "interpret") for name in CASES]
                         + [(name, "tpu_interpret") for name in TPU_CASES])
def test_kernel_matches_numpy_oracle(name, backend):
    t, d, bq, bk, opt = CASES[name]
    q, k, v = random_qkv(len(name), t, d)
    rng = np.random.default_rng(len(name) + 1)
    h, scale = q.shape[2], 1.0 / math.sqrt(d)
    kwargs = dict(scale=scale, vmc=opt.get("vmc", False), sink_tiles=opt.get("sink_tiles", 1),
                  tile_budget=opt.get("tile_budget"), block_q=bq, block_k=bk)
    theta = {"random": rng.normal(1.0, 0.6, (h, t)), "-inf": np.full((h, t), -np.inf),
             "+inf": np.full((h, t), np.inf), None: None}[opt.get("theta")]
    sdc = rng.uniform(0.0, 3.0, (h, t)) if opt.get("sdc") else None
    nq = -(-t // bq)
    tile_theta = rng.normal(0.0, 0.05, (h, nq)) if opt.get("gate") else None
    gamma = opt.get("gamma", 1.0)
    as_jnp = lambda x: None if x is None else jnp.asarray(x, jnp.float32)  # noqa: E731
    out, stats = toptheta_prefill(q, k, v, theta=as_jnp(theta), sdc_delta=as_jnp(sdc), sdc_gamma=gamma,
                                  tile_theta=as_jnp(tile_theta), backend=backend, poison_output=True,
                                  **kwargs)
    theta32 = None if theta is None else np.asarray(as_jnp(theta), np.float64)  # compare in float32 θ
    ref, listed, causal = prefill_oracle(q, k, v, theta=theta32, sdc_delta=sdc, gamma=gamma,
                                         tile_theta=None if tile_theta is None else np.float32(tile_theta),
                                         **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < RTOL
    assert int(stats.causal) == causal
    assert int(stats.listed) == listed == int(stats.visited)
    if opt.get("gate") and name != "theta_plus_inf_nothing_survives":
        assert listed < causal, "the random gate should drop some tiles"


def test_dense_mode_equals_library_attention():
    """θ = None and θ = -inf both give jax.nn.dot_product_attention's causal result."""
    q, k, v = random_qkv(3, 48, 64)
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    dense, _ = toptheta_prefill(q, k, v, block_q=16, block_k=16, backend="interpret")
    assert rel_err(dense, np.asarray(expected)) < RTOL


@pytest.mark.parametrize("skip_empty,backend", [(True, "interpret"), (False, "interpret"), (False, "tpu_interpret")])
def test_tiles_below_theta_are_skipped_and_counted(skip_empty, backend):
    """With a strong sink in key tile 0, every row's max comes first; a later off-diagonal tile whose
    scores all fall below θ is empty, so it must be counted and (skipped or not) not change the output."""
    t, d, bq, bk = 64, 64, 16, 16
    q, k, v = random_qkv(11, t, d, b=1, h=1)
    direction = jnp.ones((d,), jnp.float32) / math.sqrt(d)
    q = q + 2.0 * direction
    k = k.at[:, 0].add(40.0 * direction)
    theta = np.full((1, t), 3.5, np.float32)
    out, stats = toptheta_prefill(q, k, v, theta=jnp.asarray(theta), block_q=bq, block_k=bk, backend=backend,
                                  skip_empty=skip_empty)
    ref, _, _ = prefill_oracle(q, k, v, theta=theta.astype(np.float64), block_q=bq, block_k=bk,
                               scale=1.0 / math.sqrt(d))
    assert rel_err(out, ref) < RTOL
    a = np.asarray(q[0, :, 0], np.float64) @ np.asarray(k[0, :, 0], np.float64).T / math.sqrt(d)
    empty = sum(1 for qb in range(t // bq) for kt in range(1, qb)
                if (a[qb * bq:(qb + 1) * bq, kt * bk:(kt + 1) * bk] <= theta[0, 0]).all())
    assert empty > 0, "the test input should have empty tiles"
    assert int(stats.empty) == empty


def test_matches_the_attention_reference_op():
    """The model-facing reference (condensa.attention) and the kernel agree, gate + SDC + VMC on."""
    from condensa.attention.dense import attention_scores
    from condensa.attention.tile_gate import prefill_kept_tiles
    from condensa.attention.toptheta import toptheta_pre_probs, v_mean_compensation
    from condensa.attention.tiles import expand_tiles

    t, d, bq, bk, f = 80, 64, 32, 16, 0.25
    q, k, v = random_qkv(5, t, d)
    b, _, h, _ = q.shape
    scale = 1.0 / math.sqrt(d)
    rng = np.random.default_rng(6)
    theta = jnp.asarray(rng.normal(1.0, 0.6, (h, t)), jnp.float32)
    sdc = jnp.asarray(rng.uniform(0.0, 3.0, (h, t)), jnp.float32)
    tile_theta = jnp.asarray(rng.normal(0.0, 0.05, (h, -(-t // bq))), jnp.float32)
    out, _ = toptheta_prefill(q, k, v, scale=scale, theta=theta, sdc_delta=sdc, sdc_gamma=0.8, vmc=True,
                              tile_theta=tile_theta, tile_budget=f, block_q=bq, block_k=bk, backend="interpret")

    visible = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, 1, t, t))
    kept = prefill_kept_tiles(q, k, scale=scale, key_valid=jnp.ones((b, t), bool), tile_theta=tile_theta,
                              block_q=bq, block_k=bk, tile_budget=f, sink_tiles=1)
    allowed = visible & expand_tiles(kept, bq, bk, t, t)
    per_row = lambda x: jnp.broadcast_to(x[None], (b, h, t))  # noqa: E731
    probs = toptheta_pre_probs(attention_scores(q, k, scale), allowed=allowed,
                               visible=jnp.broadcast_to(visible, (b, h, t, t)), theta=per_row(theta),
                               dense_rows=jnp.zeros((b, 1, t), bool), sdc="calibrated", gamma=0.8,
                               sdc_delta=per_row(sdc))
    ref = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision="highest")
    ref = v_mean_compensation(ref, probs, v, visible)
    assert rel_err(out, np.asarray(ref, np.float64)) < RTOL


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradients_flow_through_kept_values(backend):
    """jax.grad through the kernel (its custom VJP) matches a float64 finite difference of the oracle."""
    t, d, bq, bk = 32, 64, 16, 16
    q, k, v = random_qkv(8, t, d, b=1, h=2)
    rng = np.random.default_rng(9)
    theta = np.asarray(rng.normal(0.8, 0.5, (2, t)), np.float32)
    tile_theta = np.asarray(rng.normal(0.0, 0.05, (2, 2)), np.float32)
    sdc = np.asarray(rng.uniform(0, 2, (2, t)), np.float32)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    opts = dict(theta=jnp.asarray(theta), sdc_delta=jnp.asarray(sdc), vmc=True, tile_theta=jnp.asarray(tile_theta),
                block_q=bq, block_k=bk)

    def loss(q, k, v):
        return jnp.sum(toptheta_prefill(q, k, v, backend=backend, **opts)[0] * w)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    eps = 1e-4
    scale = 1.0 / math.sqrt(d)
    w64 = np.asarray(w, np.float64)

    def oracle(*x):
        out = prefill_oracle(*x, scale=scale, theta=theta.astype(np.float64), sdc_delta=sdc, vmc=True,
                             tile_theta=tile_theta, block_q=bq, block_k=bk)[0]
        return np.sum(out * w64)

    base = [np.asarray(x, np.float64) for x in (q, k, v)]
    for arg in range(3):
        direction = np.random.default_rng(arg).standard_normal(base[arg].shape)
        plus = [x.copy() for x in base]
        minus = [x.copy() for x in base]
        plus[arg] += eps * direction
        minus[arg] -= eps * direction
        numeric = (oracle(*plus) - oracle(*minus)) / (2 * eps)
        analytic = float(np.sum(np.asarray(grads[arg], np.float64) * direction))
        assert analytic == pytest.approx(numeric, rel=1e-3, abs=1e-4)


def test_reference_twin_matches_oracle():
    """The jnp twin (the kernel's backward and the benchmark's oracle) meets the same contract."""
    t, d = 40, 64
    q, k, v = random_qkv(21, t, d)
    rng = np.random.default_rng(22)
    theta = rng.normal(1.0, 0.6, (2, t)).astype(np.float32)
    tile_theta = rng.normal(0.0, 0.05, (2, 3)).astype(np.float32)
    sdc = rng.uniform(0, 3, (2, t)).astype(np.float32)
    kw = dict(scale=0.125, sdc_gamma=1.0, vmc=True, block_q=16, block_k=16)
    out = toptheta_prefill_reference(q, k, v, theta=jnp.asarray(theta), sdc_delta=jnp.asarray(sdc),
                                     tile_theta=jnp.asarray(tile_theta), **kw)
    ref, _, _ = prefill_oracle(q, k, v, scale=0.125, theta=theta.astype(np.float64), sdc_delta=sdc, vmc=True,
                               tile_theta=tile_theta, block_q=16, block_k=16)
    assert rel_err(out, ref) < RTOL


# ---- pre-pass, backend choice, user errors ------------------------------------------------------


def test_compacted_lists_hold_kept_tiles_in_order():
    keep = np.random.default_rng(0).random((2, 3, 5, 9)) > 0.6
    table = np.asarray(compact_tile_lists(jnp.asarray(keep)))
    assert table.shape[-1] == 16  # a power of two >= 9 + 1
    for idx in np.ndindex(keep.shape[:-1]):
        expected = np.flatnonzero(keep[idx])
        assert table[idx][0] == len(expected)
        assert list(table[idx][1: 1 + len(expected)]) == list(expected)


def test_backend_choice_and_override(monkeypatch):
    assert resolve_backend() == "interpret"  # CPU
    assert resolve_backend("auto") == "interpret"
    monkeypatch.setenv("CONDENSA_KERNEL_BACKEND", "interpret")
    assert resolve_backend() == "interpret"
    with pytest.raises(ConfigError, match="needs a GPU"):
        resolve_backend("triton")
    with pytest.raises(ConfigError, match="needs a TPU"):
        resolve_backend("mosaic_tpu")
    assert resolve_backend("tpu_interpret") == "tpu_interpret"
    with pytest.raises(ConfigError, match="unknown kernel backend"):
        resolve_backend("cuda-magic")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(head_dim=32), "head_dim 32"),
        (dict(block_q=48), "power of two"),
        (dict(block_q=16, block_k=32), "multiple of block_k"),
        (dict(theta_shape=(2, 7)), "theta has shape"),
        (dict(tile_theta_shape=(2, 9)), "tile_theta has shape"),
        (dict(k_shape=(1, 8, 2, 64)), "one shape"),
    ],
)
def test_user_mistakes_raise_config_errors(change, message):
    d = change.get("head_dim", 64)
    q = jnp.zeros((1, 16, 2, d))
    k = jnp.zeros(change.get("k_shape", q.shape))
    theta = jnp.zeros(change["theta_shape"]) if "theta_shape" in change else None
    tile_theta = jnp.zeros(change["tile_theta_shape"]) if "tile_theta_shape" in change else None
    with pytest.raises(ConfigError, match=message):
        toptheta_prefill(q, k, q, theta=theta, tile_theta=tile_theta, block_q=change.get("block_q", 16),
                         block_k=change.get("block_k", 16), backend="interpret")


def test_bench_thresholds_and_cli_errors(tmp_path, capsys):
    """The benchmark's θ is each row's (k+1)-th largest score; a bad option exits with status 2."""
    from condensa.eval.bench.prefill import main, row_thresholds

    q, k, _ = random_qkv(4, 64, 64, b=1, h=2)
    theta, delta = row_thresholds(q, k, 0.125, 8, chunk=32)
    a = np.einsum("qhd,khd->hqk", np.asarray(q[0], np.float64), np.asarray(k[0], np.float64)) * 0.125
    for h in range(2):
        for i in (3, 8, 40, 63):
            row = np.sort(a[h, i, : i + 1])[::-1]
            expected = row[8] if i + 1 > 8 else -np.inf
            assert float(theta[h, i]) == pytest.approx(expected, rel=1e-5, abs=1e-5)
            if i + 1 > 8:
                assert float(delta[h, i]) == pytest.approx(np.exp(row[8:] - row[0]).sum(), rel=1e-4)
    assert main(["--out_dir", str(tmp_path), "--dtype", "int8"]) == 2
    assert "dtype" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_tpu_kernel_takes_half_precision_inputs(dtype):
    """bf16 / fp16 inputs with float32 statistics: the TPU kernel stays within the inputs' rounding
    of the float64 oracle, and agrees with the Triton-style kernel on the same inputs."""
    t, d, bq, bk = 72, 128, 32, 16
    q, k, v = (x.astype(dtype) for x in random_qkv(21, t, d))
    rng = np.random.default_rng(22)
    theta = jnp.asarray(rng.normal(1.0, 0.6, (2, t)), jnp.float32)
    tile_theta = jnp.asarray(rng.normal(0.0, 0.05, (2, -(-t // bq))), jnp.float32)
    kwargs = dict(theta=theta, tile_theta=tile_theta, vmc=True, block_q=bq, block_k=bk)
    out, _ = toptheta_prefill(q, k, v, backend="tpu_interpret", **kwargs)
    other, _ = toptheta_prefill(q, k, v, backend="interpret", **kwargs)
    ref, _, _ = prefill_oracle(q, k, v, scale=1.0 / math.sqrt(d), theta=np.asarray(theta, np.float64), vmc=True,
                               tile_theta=np.asarray(tile_theta), block_q=bq, block_k=bk)
    assert out.dtype == dtype
    assert rel_err(out, ref) < 1e-2
    assert rel_err(out, np.asarray(other, np.float64)) < 1e-2


# ---- post-softmax placement and exact SDC, against the attention package's reference op ---------

# name: (T, H, Hkv, block_q, block_k, AttentionConfig fields, skip_empty)
VARIANTS = {
    "post_vmc": (72, 2, 2, 32, 16, dict(placement="post", vmc=True), False),
    "post": (50, 2, 2, 16, 16, dict(placement="post"), False),
    "post_vmc_skip_empty": (72, 2, 2, 32, 16, dict(placement="post", vmc=True), True),
    "post_vmc_gate": (80, 2, 2, 16, 16, dict(placement="post", vmc=True, tile_gate=True, tile_budget=0.25), False),
    # a fused pre-pass needs at least eight key tiles (its lists are written sixteen entries at a time)
    "post_vmc_rowmean_shared_gqa": (120, 4, 2, 32, 16, dict(placement="post", vmc=True, tile_gate=True,
                                                            tile_selector="rowmean", shared_heads=True,
                                                            tile_budget=0.4), False),
    "post_rowmean_gqa_skip_empty": (120, 4, 2, 32, 16, dict(placement="post", tile_gate=True,
                                                            tile_selector="rowmean", tile_budget=0.4), True),
    "exact_vmc": (72, 2, 2, 32, 16, dict(sdc="exact", vmc=True), False),
    "exact_gamma": (50, 2, 2, 16, 16, dict(sdc="exact", gamma=0.7), False),
    "exact_vmc_skip_empty_gqa": (72, 4, 2, 32, 16, dict(sdc="exact", vmc=True), True),
}
DENSE_K = 5  # rows of at most this many keys stay dense
NOTHING_PASSES = 9  # every ninth row gets a θ that no element beats


def variant_thresholds(rng, placement, t, h, n_q):
    """θ per (head, row): probabilities near 1/n for post, logits for pre; every ninth row beyond
    the dense ones is impossible to pass (θ = 1 for post, +inf for pre)."""
    n = np.arange(1, t + 1)
    if placement == "post":
        theta = rng.uniform(0.3, 3.0, (h, t)) / n
        theta[:, NOTHING_PASSES::NOTHING_PASSES] = 1.0
    else:
        theta = rng.normal(1.0, 0.6, (h, t))
        theta[:, NOTHING_PASSES::NOTHING_PASSES] = np.inf
    from condensa.sparsity.thresholds import Thresholds

    return Thresholds(theta=jnp.asarray(theta[None], jnp.float32), sdc_delta=jnp.zeros((1, h, t), jnp.float32),
                      tile_theta=jnp.asarray(rng.normal(0.0, 0.05, (1, h, n_q)), jnp.float32), placement=placement,
                      k=DENSE_K)


class Variant(NamedTuple):
    """One case's inputs, rule, thresholds and the kernel arguments the Pallas backend derives."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    scale: float
    config: object
    thresholds: object
    kwargs: dict

    def reference(self):
        """`attend`'s reference op: (out, probs)."""
        from condensa.attention import attend

        t = self.q.shape[1]
        visible = jnp.tril(jnp.ones((t, t), bool))[None, None]
        return attend(self.q, self.k, self.v, visible=visible, scale=self.scale, layer_idx=0, config=self.config,
                      thresholds=self.thresholds)

    def kernel(self, **overrides):
        return toptheta_prefill(self.q, self.k, self.v, scale=self.scale, backend="interpret",
                                **{**self.kwargs, **overrides})


def variant(name) -> Variant:
    from condensa.attention import AttentionConfig
    from condensa.attention.pallas_backend import kernel_applies, prefill_kernel_args

    t, h, hkv, bq, bk, fields, _ = VARIANTS[name]
    rng = np.random.default_rng(len(name))
    b, d = (1 if h > hkv else 2), 64  # GQA cases hold more heads: one batch row keeps them fast
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.float32) for _ in range(2))
    config = AttentionConfig(mode="toptheta", k=DENSE_K, block_q=bq, block_k=bk, **fields)
    thresholds = variant_thresholds(rng, config.placement, t, h, -(-t // bq))
    assert kernel_applies(config, 0, causal=True, need_probs=False, dropout=None)
    kwargs = dict(prefill_kernel_args(config, thresholds.for_layer(0), 0, t), block_q=bq, block_k=bk)
    return Variant(q, k, v, 1.0 / math.sqrt(d), config, thresholds, kwargs)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_post_placement_and_exact_sdc_match_the_reference_op(name):
    """The kernel (interpret mode, NaN-poisoned output) against `attend`'s reference op, with θ
    looked up per row as the Pallas backend does: dense rows (n <= k), rows where nothing passes
    (they keep their largest element), GQA and a partial last query tile."""
    case = variant(name)
    out, _ = case.kernel(skip_empty=VARIANTS[name][-1], poison_output=True)
    ref, probs = case.reference()
    assert rel_err(out, np.asarray(ref, np.float64)) < RTOL
    # the inputs exercise what the rule does: it prunes, dense rows keep all, some rows keep one
    t = case.q.shape[1]
    per_row = (np.asarray(probs) > 0).sum(-1)  # [B, H, T]
    assert per_row.sum() < per_row.shape[0] * per_row.shape[1] * t * (t + 1) // 2
    assert (per_row[..., :DENSE_K] == np.arange(1, DENSE_K + 1)).all()
    assert (per_row[..., NOTHING_PASSES::NOTHING_PASSES] == 1).all()
    # the kernel's jnp twin (its backward pass) follows the same rule
    twin = toptheta_prefill_reference(case.q, case.k, case.v, scale=case.scale, **case.kwargs)
    assert rel_err(twin, np.asarray(ref, np.float64)) < RTOL


@pytest.mark.parametrize("name,flag", [("post_vmc", "placement"), ("exact_vmc", "sdc_exact")])
def test_variants_differ_from_the_default_rule(name, flag):
    """Without its flag the kernel runs another rule on the same θ, far from the reference: the
    checks above tell the variants apart from what the kernel computed before."""
    case = variant(name)
    ref, _ = case.reference()
    plain = {key: value for key, value in case.kwargs.items() if key != flag}
    if flag == "placement":  # probabilities read as logits would keep nearly everything
        plain["theta"] = None
    other, _ = toptheta_prefill(case.q, case.k, case.v, scale=case.scale, backend="interpret", **plain)
    assert rel_err(other, np.asarray(ref, np.float64)) > 1e-2


def sink_inputs(t, d):
    """One strong key at position 0 that every query aligns with, so most later tiles hold
    nothing a row keeps: the empty tiles that `skip_empty` skips."""
    q, k, v = random_qkv(11, t, d, b=1, h=1)
    direction = jnp.ones((d,), jnp.float32) / math.sqrt(d)
    return q + 2.0 * direction, k.at[:, 0].add(40.0 * direction), v


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_skipped_empty_tiles_keep_their_mass_in_the_denominator(placement):
    """With `skip_empty` an empty tile skips its P·V, but post's l_all and exact SDC's full sum
    must still count its mass: the output equals the unskipped kernel's and the twin's."""
    t, d, bq, bk = 64, 64, 16, 16
    q, k, v = sink_inputs(t, d)
    if placement == "post":
        kw = dict(placement="post", theta=jnp.full((1, t), 0.05, jnp.float32), vmc=True)
    else:
        kw = dict(sdc_exact=True, theta=jnp.full((1, t), 3.5, jnp.float32), vmc=True)
    skipped, stats = toptheta_prefill(q, k, v, block_q=bq, block_k=bk, backend="interpret", skip_empty=True,
                                      poison_output=True, **kw)
    computed, stats_all = toptheta_prefill(q, k, v, block_q=bq, block_k=bk, backend="interpret", **kw)
    twin = toptheta_prefill_reference(q, k, v, scale=1.0 / math.sqrt(d), block_q=bq, block_k=bk, **kw)
    assert int(stats.empty) == int(stats_all.empty) > 0
    assert rel_err(skipped, np.asarray(twin, np.float64)) < RTOL
    assert rel_err(computed, np.asarray(twin, np.float64)) < RTOL
    # the dropped mass is not negligible here, or a lost tile would not show
    dropped = 1.0 - np.asarray(_kept_mass(q, k, d, kw))
    assert dropped.max() > 1e-3


def _kept_mass(q, k, d, kw):
    """Σ_j p_ij per row under the rule in `kw` (for one batch row and head), from the scores."""
    a = np.asarray(q[0, :, 0], np.float64) @ np.asarray(k[0, :, 0], np.float64).T / math.sqrt(d)
    a = np.where(np.tril(np.ones_like(a, bool)), a, -np.inf)
    p = np.exp(a - a.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    theta = np.asarray(kw["theta"][0], np.float64)[:, None]
    keep = p > theta if kw.get("placement") == "post" else a > theta
    return np.where(keep, p, 0.0).sum(-1)


@pytest.mark.parametrize("name", ["post_vmc_gate", "exact_vmc"])
def test_variant_gradients_match_the_reference_op(name):
    """jax.grad through the kernel (its custom VJP: the twin's) equals jax.grad of `attend`'s
    reference op, so training through the kernel sees the same rule."""
    case = variant(name)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(case.q.shape), jnp.float32)

    def kernel_loss(q, k, v):
        return jnp.sum(case._replace(q=q, k=k, v=v).kernel()[0] * w)

    def reference_loss(q, k, v):
        return jnp.sum(case._replace(q=q, k=k, v=v).reference()[0] * w)

    got = jax.grad(kernel_loss, argnums=(0, 1, 2))(case.q, case.k, case.v)
    want = jax.grad(reference_loss, argnums=(0, 1, 2))(case.q, case.k, case.v)
    for g, r in zip(got, want):
        assert rel_err(g, np.asarray(r, np.float64)) < 1e-4


@pytest.mark.parametrize("change, message", [
    (dict(sdc_exact=True, tile_budget=0.5, tile_selector="rowmean"), "never reads the tiles"),
    (dict(sdc_exact=True, sdc_delta=True), "two SDC modes"),
    (dict(placement="post", sdc_exact=True), "takes no SDC"),
    (dict(placement="post", backend="tpu_interpret"), "TPU prefill kernel"),
    (dict(placement="middle"), "placement must be"),
])
def test_variants_the_kernel_cannot_run_are_refused(change, message):
    q = jnp.zeros((1, 32, 2, 64))
    change = dict(change)
    sdc = jnp.zeros((2, 32)) if change.pop("sdc_delta", False) else None
    with pytest.raises(ConfigError, match=message):
        toptheta_prefill(q, q, q, theta=jnp.zeros((2, 32)), sdc_delta=sdc, block_q=16, block_k=16,
                         **{"backend": "interpret", **change})

"""Grouped-query attention in the sparse machinery: the Pallas kernels (interpret mode) take K/V with
fewer heads than q and match the reference ops, without ever repeating K or V; and the decode-time
V-row metric counts, per KV group, the union of the rows its query heads keep."""

from __future__ import annotations

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from condensa.attention import AttentionConfig, attend
from condensa.kernels import toptheta_prefill
from condensa.kernels.toptheta_decode import toptheta_decode
from condensa.sparsity.metrics import v_rows_fraction
from condensa.sparsity.thresholds import Thresholds
from tests.test_kernels_prefill import prefill_oracle, rel_err

HQ, HKV, D = 4, 2, 64  # G = 2 query heads per KV head


def _pallas_operand_heads(fn, *args) -> list[tuple]:
    """The shapes of the arrays `fn` hands to `pallas_call` (so a test can see K/V were not repeated)."""
    shapes = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                shapes.extend(tuple(v.aval.shape) for v in eqn.invars)
        for sub in jax.extend.core.subjaxprs(jaxpr):
            visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    assert shapes, "no pallas_call was traced"
    return shapes


def test_kv_group_v_rows_are_the_union_over_its_query_heads():
    rng = np.random.default_rng(0)
    b, s = 3, 40
    probs = rng.random((b, HQ * 2, 1, s)) * (rng.random((b, HQ * 2, 1, s)) < 0.2)  # 8 query heads, sparse rows
    visible = np.zeros((b, 1, 1, s), bool)
    for bi, n in enumerate([40, 23, 9]):
        visible[bi, 0, 0, :n] = True
    probs = np.where(visible, probs, 0.0)
    got = np.asarray(v_rows_fraction(jnp.asarray(probs), jnp.asarray(visible), n_kv_head=2))
    want = np.zeros(2)
    for kv in range(2):
        needed = seen = 0
        for bi in range(b):
            group = range(kv * 4, kv * 4 + 4)  # query heads h with h // G == kv
            needed += sum(any(probs[bi, h, 0, j] > 0 for h in group) for j in range(s) if visible[bi, 0, 0, j])
            seen += visible[bi, 0, 0].sum()
        want[kv] = needed / seen
    np.testing.assert_allclose(got, want, rtol=1e-6)
    per_query_head = np.asarray(v_rows_fraction(jnp.asarray(probs), jnp.asarray(visible)))
    assert per_query_head.shape == (8,)
    assert np.all(got > per_query_head.reshape(2, 4).mean(axis=1))  # a union, not a mean


def test_prefill_kernel_with_gqa_matches_the_numpy_oracle_without_repeating_kv():
    t, bq, bk = 80, 16, 16
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, t, HQ, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, t, HKV, D)), jnp.float32) for _ in range(2))
    theta = jnp.asarray(rng.normal(1.0, 0.6, (HQ, t)), jnp.float32)
    sdc = jnp.asarray(rng.uniform(0.0, 3.0, (HQ, t)), jnp.float32)
    tile_theta = jnp.asarray(rng.normal(0.0, 0.05, (HQ, t // bq)), jnp.float32)
    kwargs = dict(scale=1 / 8, vmc=True, tile_budget=0.25, block_q=bq, block_k=bk)
    run = lambda q, k, v: toptheta_prefill(q, k, v, theta=theta, sdc_delta=sdc, tile_theta=tile_theta,  # noqa: E731
                                           backend="interpret", **kwargs)
    out, stats = run(q, k, v)
    # the oracle sees every query head with its own copy of the shared K/V head (h // G)
    k_rep, v_rep = (np.repeat(np.asarray(x), HQ // HKV, axis=2) for x in (k, v))
    ref, listed, causal = prefill_oracle(np.asarray(q), k_rep, v_rep, theta=np.asarray(theta, np.float64),
                                         sdc_delta=np.asarray(sdc), tile_theta=np.asarray(tile_theta), **kwargs)
    assert rel_err(out, ref) < 1e-5
    assert int(stats.listed) == listed < causal  # the gate dropped tiles of every query head's own scores
    shapes = _pallas_operand_heads(run, q, k, v)  # q with HQ heads; K and V with their own HKV heads
    assert shapes.count((1, t, HQ, D)) == 1 and shapes.count((1, t, HKV, D)) == 2


@pytest.mark.parametrize("variant", [dict(placement="post", vmc=True), dict(sdc_exact=True, vmc=True)])
def test_prefill_variants_with_gqa_read_kv_heads_without_repeating_them(variant):
    """Post-softmax Top-θ walks K twice and exact SDC sums every score: both still hand the kernel
    K and V with their own HKV heads, and match the reference op (which repeats them)."""
    from condensa.kernels import toptheta_prefill_reference

    t = 48
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((1, t, HQ, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, t, HKV, D)), jnp.float32) for _ in range(2))
    theta = (jnp.asarray(rng.uniform(0.3, 3.0, (HQ, t)) / np.arange(1, t + 1), jnp.float32)
             if variant.get("placement") == "post" else jnp.asarray(rng.normal(1.0, 0.6, (HQ, t)), jnp.float32))
    run = lambda q, k, v: toptheta_prefill(q, k, v, theta=theta, scale=1 / 8, block_q=16, block_k=16,  # noqa: E731
                                           backend="interpret", **variant)
    out, _ = run(q, k, v)
    ref = toptheta_prefill_reference(q, k, v, theta=theta, scale=1 / 8, block_q=16, block_k=16, **variant)
    assert rel_err(out, np.asarray(ref, np.float64)) < 1e-5
    shapes = _pallas_operand_heads(run, q, k, v)
    assert shapes.count((1, t, HQ, D)) == 1 and shapes.count((1, t, HKV, D)) == 2


def test_decode_kernel_with_gqa_matches_the_reference_op_without_repeating_kv():
    b, s, bk = 2, 96, 16
    lengths = np.asarray([96, 53])
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((b, 1, HQ, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, HKV, D)), jnp.float32) for _ in range(2))
    visible = np.zeros((b, 1, 1, s), bool)
    for bi, n in enumerate(lengths):
        visible[bi, 0, 0, :n] = True
    # what the KV cache keeps per KV head: the mean visible V row, and the mean key of each tile
    w = visible[:, 0, 0].astype(np.float32)
    v_mean = np.einsum("bs,bshd->bhd", w, np.asarray(v)) / w.sum(-1)[:, None, None]
    nk = s // bk
    k_tile_mean = np.stack([np.einsum("bs,bshd->bhd", w[:, t * bk:(t + 1) * bk], np.asarray(k)[:, t * bk:(t + 1) * bk])
                            / np.maximum(w[:, t * bk:(t + 1) * bk].sum(-1), 1)[:, None, None] for t in range(nk)], 1)
    theta = np.full((HQ, s), 1.2, np.float32)
    sdc = np.full((HQ, s), 0.7, np.float32)
    gate = np.full((HQ, nk), 0.02, np.float32)
    config = AttentionConfig(mode="toptheta", k=1, sdc="calibrated", vmc=True, tile_gate=True, block_q=bk, block_k=bk,
                             tile_budget=0.25)
    thresholds = Thresholds(theta=theta[None], sdc_delta=sdc[None], tile_theta=np.zeros((1, HQ, nk), np.float32),
                            tile_theta_decode=gate[None], k=1)

    def run(q, k, v):
        return toptheta_decode(q, k, v, jnp.asarray(lengths), scale=1 / 8, theta=theta, sdc_delta=sdc, vmc=True,
                               v_mean=jnp.asarray(v_mean[:, None]), k_tile_mean=jnp.asarray(k_tile_mean),
                               tile_theta_decode=gate, tile_budget=0.25, block_k=bk, num_splits=2, backend="interpret")

    out, stats = run(q, k, v)
    ref, probs = jax.jit(attend, static_argnames=("scale", "layer_idx", "config"))(
        q, k, v, visible=jnp.asarray(visible), scale=1 / 8, layer_idx=0, config=config, thresholds=thresholds)
    assert rel_err(out, np.asarray(ref, np.float64)) < 1e-5
    assert int(stats.v_loaded) < int(stats.k_loaded) < int(stats.visible)  # the gate and θ both pruned
    kept = np.asarray(probs) > 0
    assert 0 < kept.sum() < visible.sum() * HQ
    shapes = _pallas_operand_heads(run, q, k, v)
    # K and V in the decode kernel, V again in the combine kernel (the fallback row): never [.., HQ, ..]
    assert shapes.count((b, s, HKV, D)) == 3 and not any(len(x) == 4 and x[1] == s and x[2] == HQ for x in shapes)


@pytest.mark.parametrize("change,message", [
    (dict(k=jnp.zeros((1, 32, 3, D))), "Hkv dividing H"),
])
def test_kv_heads_that_do_not_divide_the_query_heads_are_refused(change, message):
    from condensa.errors import ConfigError

    args = dict(q=jnp.zeros((1, 32, HQ, D)), k=jnp.zeros((1, 32, HKV, D)), v=jnp.zeros((1, 32, HKV, D)))
    args.update(change)
    args["v"] = args["k"]
    with pytest.raises(ConfigError, match=message):
        toptheta_prefill(backend="interpret", **args)
    with pytest.raises(ConfigError, match=message):
        toptheta_decode(args["q"][:, :1], args["k"], args["v"], jnp.asarray([32]), backend="interpret")
    with pytest.raises(ConfigError, match="must divide the number of query heads"):
        attend(args["q"], args["k"], args["v"], visible=jnp.ones((1, 1, 32, 32), bool), scale=1 / math.sqrt(D),
               layer_idx=0, config=AttentionConfig(mode="topk", k=4))

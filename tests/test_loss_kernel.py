"""The fused mass kernel (CPU interpret mode) against the reference losses on the probabilities.

Values and gradients are compared in float32; the reference is `condensa.sparsity.loss` on
probabilities from the reference attention op, or a jnp brute force of the row tile masses.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from condensa.attention import AttentionConfig
from condensa.attention.dense import attention_scores, masked_softmax
from condensa.attention.inputs import AttentionInputs
from condensa.errors import ConfigError
from condensa.kernels import attention_masses
from condensa.kernels.attention_masses import padded_length, row_tile_masses
from condensa.sparsity import loss as conc
from condensa.sparsity import loss_from_qk
from condensa.kernels.tiling.pooling import tile_masses
from condensa.kernels.tiling.selectors import select_tiles
from condensa.train.config import GateLoss, LossConfig, SelectLoss, TileLoss, TopkLoss
from condensa.train.objective import objective, uses_mass_kernel


def _probs(q, k, scale):
    t = q.shape[1]
    return masked_softmax(attention_scores(q, k, scale), jnp.tril(jnp.ones((t, t), bool)))


def _row_tile_masses_brute(q, k, scale, tile, top_k):
    """R from the full probabilities, with the kept set from `lax.top_k` (exact)."""
    t = q.shape[1]
    p = _probs(q, k, scale)
    if top_k:
        visible = jnp.tril(jnp.ones((t, t), bool))
        s = jnp.where(visible, attention_scores(q, k, scale), -jnp.inf)
        kth = jax.lax.stop_gradient(jax.lax.top_k(s, min(top_k, t))[0][..., -1:])
        few = (jnp.arange(t) + 1 <= top_k)[:, None]  # rows with at most k keys keep them all
        p = jnp.where((s >= kth) | few, p, 0.0)
    n = -(-t // tile)
    p = jnp.pad(p, [(0, 0)] * 3 + [(0, n * tile - t)])
    return p.reshape(*p.shape[:-1], n, tile).sum(-1)


def _qk(seed, t, h=2, d=16, b=2):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(2))


def _rel(a, b):
    """Relative distance, with an absolute floor of 1e-4 for gradients that are exactly zero (a
    row keeping all its keys has a constant total mass)."""
    return float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-4))


@pytest.mark.parametrize("t,tile,top_k,group", [(64, 16, None, 256), (40, 8, 5, 256), (32, 32, 20, 256),
                                               (60, 16, 5, 16), (100, 48, 8, 256)])
def test_row_tile_masses_match_brute_force(t, tile, top_k, group, monkeypatch):
    """group 16: the threshold kernel runs 4 causal row groups, scoring 1 to 4 chunks of keys.
    tile 48: the padded length (192) is no multiple of 256, so the groups shrink to 64 rows."""
    monkeypatch.setattr(attention_masses, "THRESHOLD_GROUP", group)
    q, k = _qk(t, t)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, t, -(-t // tile))), jnp.float32)

    def fused(q, k):
        return row_tile_masses(q, k, scale=0.6, tile=tile, top_k=top_k, block_q=16, block_q_dk=16)

    def brute(q, k):
        return _row_tile_masses_brute(q, k, 0.6, tile, top_k)

    got, want = fused(q, k), brute(q, k)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
    g_got = jax.grad(lambda q, k: jnp.sum(fused(q, k) * weights), (0, 1))(q, k)
    g_want = jax.grad(lambda q, k: jnp.sum(brute(q, k) * weights), (0, 1))(q, k)
    for a, b in zip(g_got, g_want):
        assert _rel(a, b) < 1e-4  # float32 rounding, amplified where R is near 1


def test_ties_at_the_kth_score_keep_every_tied_key():
    """Integer scores tie at the k-th largest, so no lower bound keeps exactly k and the bisection
    cannot stop early; it must still end, and keep every key tied with the k-th (as the reference
    does: s >= s_(k))."""
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.integers(-1, 2, size=(1, 48, 2, 8)), jnp.float32) for _ in range(2))
    t, top_k = 48, 6
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), attention_scores(q, k, 1.0), -jnp.inf)
    kth = jax.lax.top_k(s, top_k)[0][..., -1:]
    kept = jnp.sum(s >= kth, axis=-1)[..., top_k:]  # rows with more than k visible keys
    assert int(jnp.max(kept)) > top_k  # the case under test: some row has ties past k
    got = row_tile_masses(q, k, scale=1.0, tile=16, top_k=top_k, block_q=16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_row_tile_masses_brute(q, k, 1.0, 16, top_k)), atol=2e-6)


def test_kernel_runs_with_float64_enabled():
    """Under JAX_ENABLE_X64 the bisection's loop carry must stay float32 (Python-float constants
    would turn the counts float64 and break the loop)."""
    q, k = _qk(2, 40)
    with jax.enable_x64(True):
        got = row_tile_masses(q, k, scale=0.6, tile=8, top_k=5, block_q=16, block_q_dk=16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_row_tile_masses_brute(q, k, 0.6, 8, 5)), atol=2e-6)


def test_padding_is_to_a_power_of_two_of_tiles():
    assert [padded_length(t, 64) for t in (64, 65, 192, 1024, 1025)] == [64, 128, 256, 1024, 2048]


@pytest.mark.parametrize("name", ["topk", "tile", "gate", "select"])
def test_losses_from_qk_equal_the_reference_losses(name):
    t, block = 32, 8
    q, k = _qk(7, t)
    cfg = LossConfig(topk=TopkLoss(weight=1.0, k=5), tile=TileLoss(weight=1.0, f=0.25), gate=GateLoss(weight=1.0),
                     select=SelectLoss(weight=1.0, f=0.25), tile_size=block)
    cfg = dataclasses.replace(cfg, **{other: dataclasses.replace(getattr(cfg, other), weight=0.0)
                                      for other in ("topk", "tile", "gate", "select") if other != name})

    def fused(q, k):
        return loss_from_qk.concentration_terms([AttentionInputs(q, k, 0.5)], cfg, backend="interpret")[name]

    def reference(q, k):
        p = _probs(q, k, 0.5)
        kept = lambda: select_tiles(q, k, scale=0.5, block_q=block, block_k=block, tile_budget=0.25,  # noqa: E731
                                    sink_tiles=1, selector="rowmean", shared_heads=True)
        return {"topk": lambda: conc.topk_loss(p, 5), "tile": lambda: conc.tile_loss(p, block, 0.25),
                "gate": lambda: conc.gate_loss(p, block),
                "select": lambda: jnp.mean(1 - jnp.where(kept(), tile_masses(p, block, block), 0).sum(-1))}[name]()

    np.testing.assert_allclose(float(fused(q, k)), float(reference(q, k)), rtol=1e-5)
    for a, b in zip(jax.grad(fused, (0, 1))(q, k), jax.grad(reference, (0, 1))(q, k)):
        assert _rel(a, b) < 1e-4


def _tiny_gpt2(attention=None):
    from condensa.model.gpt2.config import GPT2Config
    from condensa.model.gpt2.network import GPT2

    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    return GPT2(config, attention=attention, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("third", ["tile", "select"])
def test_objective_with_the_kernel_equals_the_reference_objective(third):
    """A whole training objective (two losses on), its value and its parameter gradients. The
    select loss's reference path takes q and k from the model and recomputes the probabilities."""
    model = _tiny_gpt2()
    batch = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 33)), jnp.int32)
    second = {"tile": TileLoss(weight=0.5, f=0.25)} if third == "tile" else {"select": SelectLoss(weight=0.5, f=0.25)}
    base = LossConfig(topk=TopkLoss(weight=0.5, k=4), tile_size=8, **second)
    results = {}
    for kernel in ("pallas", "reference"):
        cfg = dataclasses.replace(base, kernel=kernel)
        assert uses_mass_kernel(model, cfg, 32) == (kernel == "pallas")
        (value, metrics), grads = nnx.value_and_grad(lambda m: objective(m, batch, cfg, 0), has_aux=True)(model)
        results[kernel] = (float(value), {k: float(v) for k, v in metrics.items()}, jax.tree.leaves(grads))
    (v1, m1, g1), (v2, m2, g2) = results["pallas"], results["reference"]
    assert m1["L_topk"] > 0.05 and m1[f"L_{third}"] > 0.05  # the losses are really on
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for name in ("L_topk", f"L_{third}", "lm_loss"):
        np.testing.assert_allclose(m1[name], m2[name], rtol=1e-5)
    for a, b in zip(g1, g2):
        assert _rel(a, b) < 1e-4


def test_kernel_refuses_sparse_attention_clearly():
    model = _tiny_gpt2(AttentionConfig(mode="topk", k=4))
    cfg = LossConfig(topk=TopkLoss(weight=0.5, k=4), kernel="pallas")
    with pytest.raises(ConfigError, match="not plain dense"):
        uses_mass_kernel(model, cfg, 32)
    assert not uses_mass_kernel(model, dataclasses.replace(cfg, kernel="auto"), 32)


def test_kernel_refuses_sequences_past_its_length_clearly():
    model = _tiny_gpt2()
    cfg = LossConfig(topk=TopkLoss(weight=0.5, k=4), kernel="pallas")
    with pytest.raises(ConfigError, match="2048 positions with a top-k cut"):
        uses_mass_kernel(model, cfg, 4096)
    tile = LossConfig(tile=TileLoss(weight=0.5), tile_size=64, kernel="pallas")
    assert uses_mass_kernel(model, tile, 4096)  # the tile loss streams: only its tile count is limited
    with pytest.raises(ConfigError, match="64 tiles of 64"):
        uses_mass_kernel(model, tile, 8192)


def test_model_returns_attention_inputs_that_give_its_probabilities():
    """`return_attention="inputs"` hands back q and k whose causal softmax is the model's own
    attention, and leaves the logits unchanged; an unknown value is refused."""
    from condensa.errors import ModelInputError

    model = _tiny_gpt2()
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 97, (2, 16)), jnp.int32)
    with_probs = model(ids, return_attention=True)
    with_inputs = model(ids, return_attention="inputs")
    np.testing.assert_allclose(np.asarray(with_inputs.logits), np.asarray(with_probs.logits), rtol=1e-5, atol=1e-5)
    for x, probs in zip(with_inputs.attentions, with_probs.attentions):
        np.testing.assert_allclose(np.asarray(_probs(x.q, x.k, x.scale)), np.asarray(probs), atol=1e-6)
    with pytest.raises(ModelInputError, match="'inputs'"):
        model(ids, return_attention="qk")


def test_the_loss_kernel_says_it_has_no_tpu_version():
    from condensa.kernels.attention_masses import row_tile_masses

    q = jnp.zeros((1, 32, 2, 64), jnp.float32)
    with pytest.raises(ConfigError, match="no TPU version"):
        row_tile_masses(q, q, scale=0.125, tile=16, backend="tpu_interpret")

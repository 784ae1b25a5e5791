"""The tile gate's cap (`tile_cap`): no query tile or decoding row keeps more than its budget m_b of
optional tiles, the best-scored of those above Θ. Checked against a NumPy brute force (sort each
row), and the kernels (interpret mode) against the reference op with the cap on."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import condensa
from condensa.attention import AttentionConfig
from condensa.attention.tile_gate import prefill_kept_tiles
from condensa.attention.tiles import tile_budgets
from condensa.kernels.tiling import cap_at_budget
from condensa.sparsity.calibration import GateSpec, calibrate
from tests.conftest import make_hf_model


def _brute_cap(chosen: np.ndarray, scores: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Keep, per row, the chosen entries whose score beats the (m+1)-th largest chosen score."""
    out = np.zeros_like(chosen)
    for idx in np.ndindex(chosen.shape[:-1]):
        m = int(budget[idx])
        values = sorted(scores[idx][chosen[idx]], reverse=True)
        cut = values[m] if m < len(values) else -np.inf
        out[idx] = chosen[idx] & (scores[idx] > cut)
    return out


def test_cap_keeps_the_largest_scores_and_drops_ties_at_the_cut():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 4, 10)).astype(np.float32)
    scores[0, 0, :4] = 1.5  # a tie across the cut: none of the tied entries may survive a cut inside it
    chosen = rng.random((3, 4, 10)) < 0.7
    chosen[0, 0, :4] = True
    budget = rng.integers(0, 12, size=(3, 4))
    budget[0, 0] = 2
    got = np.asarray(cap_at_budget(jnp.asarray(chosen), jnp.asarray(scores), jnp.asarray(budget)))
    np.testing.assert_array_equal(got, _brute_cap(chosen, scores, budget))
    assert (got.sum(-1) <= budget).all() and not got[0, 0, :4].any()
    assert (got.sum(-1) < chosen.sum(-1)).any()  # the cap bit somewhere


def test_capped_prefill_gate_is_the_best_tiles_above_theta_within_budget():
    rng = np.random.default_rng(1)
    b, t, h, d, block, f = 2, 128, 2, 8, 16, 0.25
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, t, h, d)).astype(np.float32)
    theta = np.full((h, t // block), -1.0, np.float32)  # low: the uncapped gate keeps most tiles
    args = dict(scale=0.5, key_valid=jnp.ones((b, t), bool), tile_theta=jnp.asarray(theta), block_q=block,
                block_k=block, tile_budget=f, sink_tiles=1)
    capped = np.asarray(prefill_kept_tiles(jnp.asarray(q), jnp.asarray(k), tile_cap=True, **args))
    uncapped = np.asarray(prefill_kept_tiles(jnp.asarray(q), jnp.asarray(k), **args))
    # brute force: pooled scores, optional tiles (before the diagonal, after the sink) above Θ, top m_b
    nq = t // block
    pooled_q = q.reshape(b, nq, block, h, d).mean(2)
    pooled_k = k.reshape(b, nq, block, h, d).mean(2)
    scores = 0.5 * np.einsum("bqhd,bkhd->bhqk", pooled_q, pooled_k)
    optional = np.tril(np.ones((nq, nq), bool), -1) & (np.arange(nq)[None, :] >= 1)
    budget = tile_budgets(nq, f)
    chosen = optional & (scores > theta[None, :, :, None])
    expect = _brute_cap(chosen, scores, np.broadcast_to(budget, (b, h, nq)))
    keep_all = optional.sum(-1) <= budget
    expect |= optional & keep_all[:, None]
    np.testing.assert_array_equal(capped & optional, expect)
    np.testing.assert_array_equal(capped & ~optional, uncapped & ~optional)  # diagonal and sinks untouched
    assert ((capped & optional).sum(-1) <= np.maximum(budget, optional.sum(-1) * keep_all)).all()
    assert (uncapped & optional).sum() > (capped & optional).sum()  # the cap bit


T = 96


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tile_cap")
    make_hf_model(seed=11, n_positions=T, n_embd=128, n_head=2).save_pretrained(path)
    model, _ = condensa.load_pretrained(path)
    blocks = np.random.default_rng(3).integers(0, 98, size=(8, T))
    thresholds = calibrate(model, blocks, k=6, gate=GateSpec(16, 16, 0.2, 1), batch_size=8, sigma_add=0.0)
    # Θ far below every score: the uncapped gate keeps every tile, so only the cap chooses
    low = dataclasses.replace(thresholds, tile_theta=np.full_like(np.asarray(thresholds.tile_theta), -1e4),
                              tile_theta_decode=np.full_like(np.asarray(thresholds.tile_theta_decode), -1e4))
    return model, low


CONFIG = AttentionConfig(mode="toptheta", k=6, tile_gate=True, tile_cap=True, block_q=16, block_k=16, tile_budget=0.2)


def test_prefill_kernel_with_the_cap_gives_the_reference_logits(setup):
    model, thresholds = setup
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 98, size=(2, T)))
    ref = model(ids, attention=CONFIG, thresholds=thresholds).logits
    ker = model(ids, attention=CONFIG.replace(backend="pallas"), thresholds=thresholds).logits
    np.testing.assert_allclose(np.asarray(ker), np.asarray(ref), rtol=1e-5, atol=1e-5)
    uncapped = model(ids, attention=CONFIG.replace(tile_cap=False), thresholds=thresholds).logits
    assert float(jnp.abs(uncapped - ref).max()) > 1e-3  # the cap changed what the model computes


def test_decode_kernel_with_the_cap_gives_the_reference_tokens(setup):
    model, thresholds = setup
    prompt = np.random.default_rng(5).integers(0, 98, size=(2, 16))
    reference = condensa.generate(model, prompt, 64, attention=CONFIG, thresholds=thresholds)
    kernel = condensa.generate(model, prompt, 64, attention=CONFIG.replace(backend="pallas"), thresholds=thresholds)
    np.testing.assert_array_equal(kernel, reference)
    uncapped = condensa.generate(model, prompt, 64, attention=CONFIG.replace(tile_cap=False), thresholds=thresholds)
    assert (uncapped != reference).any()  # the cap changed the decode gate's choice


def test_the_cap_needs_the_gate():
    with pytest.raises(condensa.CondensaError, match="tile_gate"):
        AttentionConfig(mode="toptheta", tile_cap=True)


def test_sweep_caps_every_gated_rule_and_labels_it():
    from condensa.eval.sweep import variants

    rules = variants([8], [None, 0.25], ["none"], gate_alone=True, decode_gate=True, tile_cap=True)
    gated = [v for v in rules if v.tile_budget is not None]
    assert gated and all(v.tile_cap and v.attention(16, 1).tile_cap for v in gated)
    assert all(not v.tile_cap and not v.attention(16, 1).tile_gate for v in rules if v.tile_budget is None)
    assert {v.label for v in gated} == {"capped gate f=0.25 + Top-θ", "capped decode gate f=0.25 + Top-θ",
                                        "capped gate f=0.25 alone", "capped decode gate f=0.25 alone"}
    assert not any(v.tile_cap for v in variants([8], [None, 0.25], ["none"]))

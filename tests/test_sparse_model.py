"""Sparse attention wired into GPT-2: every layer uses the config, decode agrees with prefill."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from condensa.attention import AttentionConfig
from condensa.model import generate, load_pretrained
from condensa.sparsity.calibration import GateSpec, calibrate
from condensa.sparsity.metrics import kept_fraction

T = 32


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_pretrained(tiny_hf_dir)[0]


@pytest.fixture(scope="module")
def thresholds(model):
    """Calibrated on random tokens (the property under test does not depend on the text)."""
    blocks = np.random.default_rng(0).integers(0, 98, size=(8, T))
    return calibrate(model, blocks, k=4, gate=GateSpec(8, 8, 0.25, 1), batch_size=8, sigma_add=0.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def _forward(graphdef, state, ids, mask, cache, thresholds, attention):
    m = nnx.merge(graphdef, state)
    out = m(ids, attention_mask=mask, cache=cache, attention=attention, thresholds=thresholds, return_attention=True)
    return out.logits, out.attentions, out.cache


def forward(model, ids, *, attention, thresholds=None, mask=None, cache=None):
    graphdef, state = nnx.split(model)
    mask = jnp.ones(ids.shape, jnp.int32) if mask is None else mask
    return _forward(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), cache, thresholds, attention=attention)


def test_decode_with_cache_matches_prefill(model, thresholds):
    """Element-level Top-θ looks θ up by row length, so decoding one token at a time against the
    cache gives the prefill logits. exp-threshold SDC and VMC both count visible keys, so this
    also checks that padding and the cache's empty slots are never counted."""
    attention = AttentionConfig(mode="toptheta", k=4, sdc="exp-threshold", vmc=True)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 98, size=(2, 24))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding: row lengths count real tokens in both paths
    full_logits, probs, _ = forward(model, ids, attention=attention, thresholds=thresholds, mask=mask)
    real = mask.astype(bool)
    visible = np.tril(np.ones((24, 24), bool))[None] & real[:, None, :] & real[:, :, None]
    assert max(kept_fraction(p, visible[:, None]).max() for p in probs) < 0.8  # the rule really prunes

    prompt = 10
    cache = model.init_cache(2, 24)
    logits, _, cache = forward(model, ids[:, :prompt], attention=attention, thresholds=thresholds,
                               mask=mask[:, :prompt], cache=cache)
    steps = [logits[:, -1]]
    for t in range(prompt, 23):
        logits, _, cache = forward(model, ids[:, t:t + 1], attention=attention, thresholds=thresholds,
                                   mask=mask[:, t:t + 1], cache=cache)
        steps.append(logits[:, -1])
    np.testing.assert_allclose(np.asarray(logits_prefill := full_logits[:, prompt - 1:23]),
                               np.stack([np.asarray(s) for s in steps], axis=1), atol=2e-4, rtol=1e-4)
    assert np.isfinite(np.asarray(logits_prefill)).all()


def test_keep_everything_thresholds_reproduce_dense(model, thresholds):
    ids = np.random.default_rng(3).integers(0, 98, size=(2, T))
    everything = jax.tree_util.tree_map(lambda a: jnp.full_like(a, -jnp.inf), thresholds)
    dense_logits, dense_probs, _ = forward(model, ids, attention=AttentionConfig())
    logits, probs, _ = forward(model, ids, attention=AttentionConfig(mode="toptheta", k=4), thresholds=everything)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(dense_logits), atol=1e-5)
    for p, d in zip(probs, dense_probs):
        np.testing.assert_allclose(np.asarray(p), np.asarray(d), atol=1e-6)


def test_dense_layers_stay_dense(model, thresholds):
    ids = np.random.default_rng(4).integers(0, 98, size=(2, T))
    _, dense_probs, _ = forward(model, ids, attention=AttentionConfig())
    _, probs, _ = forward(model, ids, attention=AttentionConfig(mode="topk", k=2, dense_layers=(0,)))
    np.testing.assert_array_equal(np.asarray(probs[0]), np.asarray(dense_probs[0]))
    assert (np.asarray(probs[1]) > 0).sum(-1).max() == 2


def test_tile_gate_in_the_model_prunes_tiles_and_decodes(model, thresholds):
    gate = dict(tile_gate=True, block_q=8, block_k=8, tile_budget=0.25)
    attention = AttentionConfig(mode="toptheta", k=4, sdc="calibrated", **gate)
    ids = np.random.default_rng(5).integers(0, 98, size=(2, T))
    logits, probs, _ = forward(model, ids, attention=attention, thresholds=thresholds)
    assert np.isfinite(np.asarray(logits)).all()
    tiles_used = np.asarray(probs[1]).reshape(2, 4, 4, 8, 4, 8).sum(axis=(3, 5)) > 0
    causal_tiles = np.tril(np.ones((4, 4), bool))
    assert tiles_used[..., ~causal_tiles].sum() == 0
    assert tiles_used[..., causal_tiles].mean() < 1.0  # some causal tile was skipped
    out = generate(model, ids[:, :16], max_new_tokens=8, attention=attention, thresholds=thresholds)
    assert out.shape == (2, 24) and (out >= 0).all() and (out < 99).all()


def test_decode_gate_rows_equal_token_by_token_decoding(model, thresholds):
    """`decode_gate_rows` gates each row of a full sequence as its decoding step would, so one
    forward pass gives the logits of decoding every token against the cache (prompt of one token,
    so every step runs the single-query decode gate)."""
    gate = dict(tile_gate=True, block_q=8, block_k=8, tile_budget=0.25)
    attention = AttentionConfig(mode="toptheta", k=4, sdc="calibrated", vmc=True, **gate)
    ids = np.random.default_rng(6).integers(0, 98, size=(2, T))
    rows_logits, probs, _ = forward(model, ids, attention=attention.replace(decode_gate_rows=True), thresholds=thresholds)
    # the decode gate really drops tiles: some row of the last query tile has no mass in tile 1 or 2
    p = np.asarray(probs[1])[:, :, 24:]
    dropped = (p[..., 8:16].sum(-1) == 0) | (p[..., 16:24].sum(-1) == 0)
    assert dropped.any()
    # ... and the prefill gate (query tiles) would give other logits, so the comparison below can fail
    prefill_logits, _, _ = forward(model, ids, attention=attention, thresholds=thresholds)
    assert np.abs(np.asarray(prefill_logits) - np.asarray(rows_logits)).max() > 1e-3

    cache = model.init_cache(2, T)
    steps = []
    for t in range(T):
        logits, _, cache = forward(model, ids[:, t:t + 1], attention=attention, thresholds=thresholds, cache=cache)
        steps.append(np.asarray(logits[:, -1]))
    np.testing.assert_allclose(np.asarray(rows_logits), np.stack(steps, axis=1), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("selector,shared", [("rowmean", True), ("window", False)])
def test_decoding_selectors_rows_equal_token_by_token_decoding(model, selector, shared):
    """The budgeted selectors decode against the cache as `decode_gate_rows` scores the rows of a
    full sequence; a prompt written into the larger cache is selected as its own prefill is."""
    attention = AttentionConfig(mode="dense", tile_gate=True, block_q=8, block_k=8, tile_budget=0.25,
                                tile_selector=selector, shared_heads=shared)
    ids = np.random.default_rng(8).integers(0, 98, size=(2, T))
    rows_logits, probs, _ = forward(model, ids, attention=attention.replace(decode_gate_rows=True))
    assert (np.asarray(probs[0])[:, :, 24:, 8:24] == 0).any()  # the budget drops tiles of the last rows

    prompt = 12
    prefill_logits, _, _ = forward(model, ids[:, :prompt], attention=attention)
    cache = model.init_cache(2, T, tile_size=8)
    logits, _, cache = forward(model, ids[:, :prompt], attention=attention, cache=cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(prefill_logits), atol=2e-4, rtol=1e-4)
    steps = []
    for t in range(prompt, T):
        logits, _, cache = forward(model, ids[:, t:t + 1], attention=attention, cache=cache)
        steps.append(np.asarray(logits[:, -1]))
    # the prompt's rows (one tile and a half) keep every tile either way: from there on, the rows
    np.testing.assert_allclose(np.asarray(rows_logits)[:, prompt:], np.stack(steps, axis=1), atol=2e-4, rtol=1e-4)


def test_decode_gate_rows_needs_the_whole_sequence(model, thresholds):
    from condensa.errors import ConfigError

    attention = AttentionConfig(mode="dense", tile_gate=True, block_q=8, block_k=8, decode_gate_rows=True)
    cache = model.init_cache(1, T)
    with pytest.raises(ConfigError, match="whole sequence"):
        forward(model, np.zeros((1, 4), np.int64), attention=attention, thresholds=thresholds, cache=cache)


@pytest.mark.parametrize("attention", [
    AttentionConfig(mode="topk", k=4),
    AttentionConfig(mode="toptheta", k=4, sdc="exp-threshold", vmc=True),
    AttentionConfig(mode="toptheta", k=4, sdc="calibrated", vmc=True, tile_gate=True, block_q=8, block_k=8,
                    tile_budget=0.25),
    AttentionConfig(mode="dense", tile_gate=True, block_q=8, block_k=8, tile_budget=0.25, decode_gate_rows=True),
], ids=["topk", "toptheta-exp-sdc-vmc", "gate-toptheta-sdc-vmc", "decode-gate-rows"])
def test_long_sequences_run_the_reference_in_row_chunks(model, thresholds, attention, monkeypatch):
    """Past ROW_CHUNK_SCORES the reference op works through the query rows in chunks (so a 16k
    context fits in memory); the logits are those of the one-pass op, which still returns probs."""
    import condensa.attention.reference as attention_module

    ids = np.random.default_rng(7).integers(0, 98, size=(2, T))
    whole, _, _ = forward(model, ids, attention=attention, thresholds=thresholds)  # with probs: one pass
    monkeypatch.setattr(attention_module, "ROW_CHUNK_SCORES", T * T // 4)
    assert attention_module.row_chunks(T, T) == 4
    calls = []
    original = attention_module.attend_in_row_chunks
    monkeypatch.setattr(attention_module, "attend_in_row_chunks", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    chunked = model(jnp.asarray(ids), attention=attention, thresholds=thresholds).logits  # eager, no probs
    assert calls
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=2e-5, rtol=1e-5)

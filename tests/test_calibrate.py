"""Calibration: per-row statistics against NumPy, thresholds that reproduce k on held-out real
text, and the `python -m condensa.calibrate` CLI."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from condensa.attention import AttentionConfig
from condensa.sparsity import load_thresholds
from condensa.sparsity.calibration import (
    GateSpec, RunningStats, achieved_sparsity, calibrate, layer_dropped_mass, layer_row_statistics,
)
from tests.conftest import CORPUS_DIR, TOKENIZER_DIR, WIKITEXT_TEST, make_hf_model, require_shared
from tests.metrics_doc import undocumented

SEQ = 256
SIGMA_ADD = 0.3  # see test_thresholds_reproduce_k_on_held_out_text


# ---- statistics against brute force ---------------------------------------------------------------------


@pytest.mark.parametrize("rows", [16, 4, 5])
def test_row_statistics_match_numpy(rows, monkeypatch):
    """`rows`: the element statistics taken that many rows at a time, as at long T (5: a padded last chunk)."""
    import condensa.sparsity.calibration as calibrate_module

    monkeypatch.setattr(calibrate_module, "_chunk_rows", lambda b, h, t: rows)
    t, h, d, k_l, scale = 16, 2, 4, 3, 0.7
    gate = GateSpec(4, 4, 0.25, 1)
    keys = jax.random.split(jax.random.key(0), 2)
    q, k = (jax.random.normal(key, (2, t, h, d)) for key in keys)
    stats = jax.jit(lambda q, k: layer_row_statistics(q, k, scale, k_l=k_l, placement="pre", gate=gate))
    got = jax.tree_util.tree_map(np.asarray, stats(q, k))
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    a = scale * np.einsum("bqhd,bkhd->bhqk", qn, kn)
    qbar = qn.reshape(2, 4, 4, h, d).mean(2)
    kbar = kn.reshape(2, 4, 4, h, d).mean(2)
    pooled = scale * np.einsum("bqhd,bkhd->bhqk", qbar, kbar)
    for b, hh in np.ndindex(2, h):
        for bi in range(4):  # prefill gate: optional tiles of query tile bi are 1..bi-1
            optional = list(range(1, bi))
            m = max(1, math.ceil(0.25 * (bi + 1)))
            want = sorted(pooled[b, hh, bi, optional], reverse=True)[m] if len(optional) > m else np.nan
            np.testing.assert_allclose(got["tile"][b, hh, bi], want, rtol=1e-5)
        for i in range(t):
            last = i // 4
            optional = [tt for tt in range(last) if tt >= min(1, last)]
            m = max(1, math.ceil(0.25 * (last + 1)))
            s = scale * kbar[b, optional, hh] @ qn[b, i, hh]
            want = sorted(s, reverse=True)[m] if len(optional) > m else np.nan
            np.testing.assert_allclose(got["decode"][b, hh, i], want, rtol=1e-5)
            # element statistics inside the exact gate (mandatory + top-m pooled tiles)
            bi = i // 4
            opt_q = list(range(1, bi))
            m_q = max(1, math.ceil(0.25 * (bi + 1)))
            chosen = sorted(opt_q, key=lambda tt: (-pooled[b, hh, bi, tt], tt))[:m_q]
            tiles = {0, bi, *chosen}
            cols = [j for j in range(i + 1) if j // 4 in tiles]
            row = a[b, hh, i, cols]
            theta = sorted(row, reverse=True)[k_l] if len(cols) > k_l else np.nan
            np.testing.assert_allclose(got["theta"][b, hh, i], theta, rtol=1e-5)
    assert "delta" not in got  # Δ̄ needs the finished θ: the second pass


@pytest.mark.parametrize("rows", [16, 5])
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_dropped_mass_matches_numpy(placement, rows, monkeypatch):
    """The second pass, gated: Σ exp(a − m) over the visible elements that θ (looked up by row
    length) drops, the elements of the tiles the exact gate drops included, m the max over the
    gate's tiles; rows n <= k_l keep their tiles whole; a row with nothing above θ keeps its max."""
    import condensa.sparsity.calibration as calibrate_module

    monkeypatch.setattr(calibrate_module, "_chunk_rows", lambda b, h, t: rows)
    t, h, d, k_l, scale = 16, 2, 4, 3, 0.7
    gate = GateSpec(4, 4, 0.25, 1)
    keys = jax.random.split(jax.random.key(2), 3)
    q, k = (jax.random.normal(key, (2, t, h, d)) for key in keys[:2])
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    a = scale * np.einsum("bqhd,bkhd->bhqk", qn, kn)
    if placement == "pre":  # around the row's (k_l+1)-th score, with rows where nothing passes
        theta = np.asarray(jax.random.normal(keys[2], (h, t + 3)), np.float32) + np.float32(0.5)
    else:
        theta = np.asarray(jax.random.uniform(keys[2], (h, t + 3), maxval=0.4), np.float32)
    got = np.asarray(jax.jit(lambda q, k, th: layer_dropped_mass(q, k, scale, th, k_l=k_l, placement=placement,
                                                                  gate=gate))(q, k, theta))
    qbar, kbar = qn.reshape(2, 4, 4, h, d).mean(2), kn.reshape(2, 4, 4, h, d).mean(2)
    pooled = scale * np.einsum("bqhd,bkhd->bhqk", qbar, kbar)
    empty_rows = 0
    for b, hh, i in np.ndindex(2, h, t):
        bi = i // 4
        opt_q = list(range(1, bi))
        m_q = max(1, math.ceil(0.25 * (bi + 1)))
        tiles = {0, bi, *sorted(opt_q, key=lambda tt: (-pooled[b, hh, bi, tt], tt))[:m_q]}
        cols = [j for j in range(i + 1) if j // 4 in tiles]
        m_i = a[b, hh, i, cols].max()
        e = {j: math.exp(a[b, hh, i, j] - m_i) for j in cols}
        values = a[b, hh, i] if placement == "pre" else {j: e[j] / sum(e.values()) for j in cols}
        kept = set(cols) if i + 1 <= k_l else {j for j in cols if values[j] > theta[hh, i]}
        if not kept:
            kept, empty_rows = {max(cols, key=lambda j: a[b, hh, i, j])}, empty_rows + 1
        want = sum(math.exp(a[b, hh, i, j] - m_i) for j in range(i + 1) if j not in kept)
        np.testing.assert_allclose(got[b, hh, i], want, rtol=1e-4, atol=1e-6)
    assert placement == "post" or empty_rows > 0  # the empty-row rule was exercised


def test_length_pooling_merges_the_samples_of_nearby_lengths():
    """`pooled_over_lengths` against the mean and std of the raw samples of lengths n (1 ± s), with
    rows that have no sample (NaN) and batches merged one at a time."""
    from condensa.sparsity.calibration import RunningStats

    rng = np.random.default_rng(3)
    samples = rng.normal(np.arange(40) / 8.0, 1.0, size=(6, 2, 40))  # [blocks, heads, lengths]
    samples[rng.random(samples.shape) < 0.2] = np.nan
    stats = RunningStats()
    for block in np.split(samples, 3):
        stats.update(block, axis=0)
    spread = 0.25
    pooled = stats.pooled_over_lengths(spread)
    for h, i in np.ndindex(2, 40):
        n = i + 1
        lo = max(1, int(np.floor(n * (1 - spread))))
        hi = min(40, int(np.ceil(n * (1 + spread))))
        values = samples[:, h, lo - 1:hi].ravel()
        values = values[np.isfinite(values)]
        assert pooled.count[h, i] == values.size
        np.testing.assert_allclose(pooled.mean[h, i], values.mean(), rtol=1e-10)
        np.testing.assert_allclose(pooled.std[h, i], values.std(), rtol=1e-8)
    same = stats.pooled_over_lengths(0.0)
    np.testing.assert_array_equal(same.mean, stats.mean)


def test_length_pooling_out_of_range_is_a_config_error():
    from condensa.errors import ConfigError
    from condensa.sparsity.calibration import CalibrationConfig

    with pytest.raises(ConfigError, match="length_pooling must be in"):
        CalibrationConfig(model="m", data=("d",), out="o", length_pooling=1.5)


def test_post_placement_thresholds_probabilities():
    q, k = (jax.random.normal(key, (1, 10, 1, 4)) for key in jax.random.split(jax.random.key(1), 2))
    stats = jax.jit(lambda q, k: layer_row_statistics(q, k, 1.0, k_l=2, placement="post", gate=None))
    got = np.asarray(stats(q, k)["theta"])
    a = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))[0, 0]
    for i in range(10):
        p = np.exp(a[i, : i + 1] - a[i, : i + 1].max())
        p /= p.sum()
        want = np.sort(p)[::-1][2] if i + 1 > 2 else np.nan
        np.testing.assert_allclose(got[0, 0, i], want, rtol=1e-5)


def _tiny_model(family: str):
    """A random GPT-2 (4 heads) or LLaMA (4 query heads sharing 2 KV heads, rotary) of 3 layers, 32 positions."""
    from flax import nnx

    from condensa.model.registry import build_model, preset

    config = (preset("tiny", n_embd=32, n_layer=3, n_positions=32, vocab_size=97) if family == "gpt2" else
              preset("llama-tiny", hidden_size=64, intermediate_size=96, head_dim=16, vocab_size=97,
                     num_hidden_layers=3, max_position_embeddings=32))
    model = build_model(config, rngs=nnx.Rngs(3))
    model.eval()
    return model


def _brute_force_two_pass(inputs, ks, placement, sigma_add):
    """DESIGN.md's calibration in NumPy from each layer's q and k [N, T, H, D] over all N blocks at
    once: θ[l, h, n] = mean + σ_add · std of the rows' (k_l+1)-th largest value (rows n > k_l), then
    Δ̄[l, h, n] = the mean over the same rows of Σ exp(a − max) over the elements that θ drops."""
    thetas, deltas = [], []
    for layer, (q, k, scale) in enumerate(inputs):
        k_l = ks[layer]
        a = scale * np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))
        n_blocks, h, t, _ = a.shape
        visible = np.tril(np.ones((t, t), bool))
        e = np.exp(np.where(visible, a - np.where(visible, a, -np.inf).max(-1, keepdims=True), -np.inf))
        values = a if placement == "pre" else e / e.sum(-1, keepdims=True)
        rows = np.full((n_blocks, h, t), np.nan)
        for b, hh, i in np.ndindex(n_blocks, h, t):
            if i + 1 > k_l:
                rows[b, hh, i] = np.sort(values[b, hh, i, : i + 1])[::-1][k_l]
        theta = (np.nanmean(rows, 0) + sigma_add * np.nanstd(rows, 0)).astype(np.float32)  # as saved
        delta = np.zeros((n_blocks, h, t))
        for b, hh, i in np.ndindex(n_blocks, h, t):
            if i + 1 > k_l:
                kept = values[b, hh, i, : i + 1] > theta[hh, i]
                if not kept.any():
                    kept[np.argmax(a[b, hh, i, : i + 1])] = True
                delta[b, hh, i] = e[b, hh, i, : i + 1][~kept].sum()
        thetas.append(theta)
        deltas.append(delta.mean(0))
    return np.stack(thetas), np.stack(deltas)


@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:Degrees of freedom")
@pytest.mark.parametrize("family,placement,topk_walk", [
    ("gpt2", "pre", False), ("gpt2", "post", True), ("llama", "pre", True), ("llama", "post", False),
])
def test_calibrate_matches_two_pass_brute_force(family, placement, topk_walk):
    """θ and Δ̄ of `calibrate` (layer by layer, two passes, batches padded) against NumPy on the
    q and k of the model's own whole-model forward: Δ̄ is the mass the calibrated θ drops, not the
    mass outside each row's exact top-k. A k of its own in the middle layer checks that, walking
    with top-k, each layer runs its own k although the layers share one compiled function."""
    model = _tiny_model(family)
    blocks = np.random.default_rng(4).integers(0, 97, size=(5, 32))
    k, layer_k, sigma_add = 4, {1: 6}, 0.1
    got = calibrate(model, blocks, k=k, layer_k=layer_k, placement=placement, sigma_add=sigma_add, batch_size=2,
                    topk_at_calibration=topk_walk)
    sdc = "exact" if placement == "post" else "none"  # post-softmax: top-k without renormalisation
    walk = AttentionConfig(mode="topk", k=k, layer_k=layer_k, sdc=sdc) if topk_walk else AttentionConfig()
    inputs = model(jnp.asarray(blocks), attention=walk, return_attention="inputs").attentions
    ks = [k, 6, k]
    theta, delta = _brute_force_two_pass(inputs, ks, placement, sigma_add)
    for layer, k_l in enumerate(ks):
        np.testing.assert_allclose(got.theta[layer, :, k_l:], theta[layer, :, k_l:], rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(got.sdc_delta[layer, :, k_l:], delta[layer, :, k_l:], rtol=2e-4, atol=1e-6)
        assert np.all(got.sdc_delta[layer, :, :k_l] == 0)  # dense rows drop nothing without a gate


@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:Degrees of freedom")
def test_layer_by_layer_matches_whole_model_walk():
    """With a gate and top-k walking a GQA model: every table of `calibrate` equals the same
    statistics taken along one whole-model walk (`walk_layers` under one jit), as calibration ran
    before it went layer by layer."""
    from condensa.sparsity.calibration import _by_key_tile

    model = _tiny_model("llama")
    blocks = np.random.default_rng(5).integers(0, 97, size=(3, 32))
    gate, k, sigma_add = GateSpec(8, 8, 0.25, 1), 4, 0.1
    got = calibrate(model, blocks, k=k, gate=gate, sigma_add=sigma_add, batch_size=2, topk_at_calibration=True)
    walk = AttentionConfig(mode="topk", k=k)

    @jax.jit
    def whole_model(ids, theta):
        def per_layer(layer, q, kk, v, scale):
            out = layer_row_statistics(q, kk, scale, k_l=k, placement="pre", gate=gate)
            out["delta"] = layer_dropped_mass(q, kk, scale, theta[layer], k_l=k, placement="pre", gate=gate)
            return out

        return model.walk_layers(ids, walk, None, per_layer)

    layers = jax.device_get(whole_model(jnp.asarray(blocks), jnp.asarray(got.theta)))
    stacked = {name: np.stack([entry[name] for entry in layers]) for name in layers[0]}  # [L, N, H, X]

    def threshold(samples, axis):
        return np.nanmean(samples, axis) + sigma_add * np.nanstd(samples, axis)

    np.testing.assert_allclose(got.theta[:, :, k:], threshold(stacked["theta"], 1)[:, :, k:], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sdc_delta, stacked["delta"].mean(1), rtol=1e-4, atol=1e-6)
    tile = threshold(stacked["tile"], 1)
    calibrated = np.isfinite(tile)
    assert calibrated.any()
    np.testing.assert_allclose(got.tile_theta[calibrated], tile[calibrated], rtol=1e-5, atol=1e-7)
    decode = threshold(_by_key_tile(stacked["decode"], gate.block_k), (1, 4))
    calibrated = np.isfinite(decode)
    assert calibrated.any()
    np.testing.assert_allclose(got.tile_theta_decode[calibrated], decode[calibrated], rtol=1e-5, atol=1e-7)


def test_running_stats_match_numpy():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=(n, 2, 5)) for n in (4, 1, 7)]
    chunks[1][0, 0, 0] = np.nan  # missing samples are skipped
    chunks[0][:, 1, 4] = np.nan
    stats = RunningStats()
    for c in chunks:
        stats.update(c, axis=0)
    allv = np.concatenate(chunks)
    np.testing.assert_allclose(stats.mean, np.nanmean(allv, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.std, np.nanstd(allv, axis=0), rtol=1e-12)
    np.testing.assert_array_equal(stats.count, np.isfinite(allv).sum(0))


# ---- real text acceptance ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gpt2_vocab")
    make_hf_model(vocab_size=50257, n_embd=64, n_layer=2, n_head=4, n_positions=SEQ,
                  bos_token_id=50256, eos_token_id=50256).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def real_model(real_model_dir):
    from condensa.model import load_pretrained

    return load_pretrained(real_model_dir)[0]


@pytest.fixture(scope="module")
def text_blocks(tokenizer):
    """Calibration blocks from the first 60% of a corpus file, held-out blocks from the rest, and
    WikiText-2 test blocks (another domain)."""
    from condensa.data import pack_blocks, tokenize_documents

    text = require_shared(CORPUS_DIR / "misc" / "inaugural.txt").read_text()
    cut = int(len(text) * 0.6)  # ~4.5 characters per token: enough text for the blocks used
    calibration = pack_blocks(tokenize_documents([text[:cut][:40_000]], tokenizer), SEQ)[:24]
    held_out = pack_blocks(tokenize_documents([text[cut:][:12_000]], tokenizer), SEQ)[:8]
    wiki = require_shared(WIKITEXT_TEST).read_text()[:12_000]
    return calibration, held_out, pack_blocks(tokenize_documents([wiki], tokenizer), SEQ)[:8]


def test_thresholds_reproduce_k_on_held_out_text(real_model, text_blocks):
    """Mean kept elements per row within ±15% of k in every layer, at k = 4, 8, 16; at k = 8 with
    the tile gate, whose thresholds must keep m_b tiles per query tile (prefill) and per decoding
    query, also within ±15%.

    σ_add = 0.3 rather than the default 0.1: a mean threshold keeps more than k on average (the
    kept count is convex in θ), most at small k; on this tiny random model σ_add = 0.1 gives
    about 1.2 k at k = 4 and 1.0 k at k = 16.
    """
    calibration, held_out, wiki = text_blocks
    lines = []
    for k in (4, 8, 16):
        gate = GateSpec(32, 32, 0.25, 1) if k == 8 else None
        thresholds = calibrate(real_model, calibration, k=k, gate=gate, sigma_add=SIGMA_ADD, batch_size=8)
        attention = AttentionConfig(mode="toptheta", k=k, tile_gate=gate is not None, block_q=32, block_k=32,
                                    tile_budget=0.25)
        held = achieved_sparsity(real_model, held_out, thresholds, attention)
        other = achieved_sparsity(real_model, wiki, thresholds, attention)
        lines.append(f"k={k}{' + tile gate' if gate else ''}: kept/k on held-out corpus text "
                     f"{[round(e['ratio'], 3) for e in held]}, on WikiText-2 {[round(e['ratio'], 3) for e in other]}")
        for entry in held:
            assert 0.85 <= entry["ratio"] <= 1.15, (k, held)
        if gate is not None:
            lines.append(f"  gate tiles/m_b prefill {[round(e['tiles_ratio'], 3) for e in held]}, "
                         f"decode {[round(e['decode_tiles_ratio'], 3) for e in held]}")
            for entry in held:
                assert 0.85 <= entry["tiles_ratio"] <= 1.15, held
                assert 0.85 <= entry["decode_tiles_ratio"] <= 1.15, held
            assert thresholds.tile_theta.shape == (2, 4, SEQ // 32) == thresholds.tile_theta_decode.shape
    print("\n" + "\n".join(lines))


# ---- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_calibrate_save_load_evaluate(real_model_dir, real_model, tmp_path, capsys):
    from condensa.calibrate import cli

    out = tmp_path / "run"
    corpus = tmp_path / "inaugural-part.txt"  # a slice keeps tokenization quick
    corpus.write_text(require_shared(CORPUS_DIR / "misc" / "inaugural.txt").read_text()[:8_000])
    config = tmp_path / "cal.yaml"
    config.write_text(yaml.safe_dump({"k": 99, "samples": 4, "seq_len": 128, "check_blocks": 2, "batch_size": 4}))
    code = cli(["--config", str(config), "--model", str(real_model_dir), "--tokenizer", str(TOKENIZER_DIR),
                "--data", str(corpus), "--k", "8", "--layer-k", "1:12", "--tile", "32", "--tile-budget", "0.25",
                "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["k"] == 8 and resolved["layer_k"] == "1:12" and resolved["samples"] == 4  # flags beat YAML
    summary = json.loads((out / "summary.json").read_text())
    assert [e["k"] for e in summary["layers"]] == [8, 12] and summary["samples"] == 4
    assert not undocumented(summary), "add these keys to docs/metrics.md"

    attention = AttentionConfig(mode="toptheta", k=8, layer_k="1:12", sdc="calibrated", tile_gate=True,
                                block_q=32, block_k=32, tile_budget=0.25)
    thresholds = load_thresholds(out / "thresholds.safetensors", real_model.config, attention)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50257, size=(1, 128)))
    logits = real_model(ids, attention=attention, thresholds=thresholds).logits
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1).mean()
    assert np.isfinite(float(loss))


@pytest.mark.parametrize("args,match", [
    (["--k", "4"], "no model given"),
    (["--model", "/nonexistent/model", "--data", "x.txt", "--out", "o"], "does not exist"),
    (["--model", "MODEL_DIR", "--data", "x.txt", "--out", "o"], "--tokenizer"),
    (["--model", "m", "--data", "x.txt", "--out", "o", "--sigma_ad", "1"], "Did you mean 'sigma_add'"),
    (["--model", "m", "--data", "x.txt", "--out", "o", "--placement", "middle"], "placement"),
    (["--model", "m", "--data", "x.txt", "--out", "o", "--layer-k", "1=4"], "LAYER:K"),
    (["--model", "m", "--data", "x.txt", "--out", "o", "--tile-budget", "2"], "tile_budget"),
])
def test_cli_user_errors_exit_2(args, match, capsys, tmp_path, monkeypatch, tiny_hf_dir):
    from condensa.calibrate import cli

    monkeypatch.chdir(tmp_path)
    args = [str(tiny_hf_dir) if a == "MODEL_DIR" else a for a in args]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err


def test_seq_len_not_above_k_is_refused(real_model):
    from condensa.errors import ConfigError

    with pytest.raises(ConfigError, match="must exceed k"):
        calibrate(real_model, np.zeros((2, 8), np.int32), k=8)

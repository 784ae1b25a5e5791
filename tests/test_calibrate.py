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
from condensa.sparsity.calibrate import (
    GateSpec, RunningStats, achieved_sparsity, calibrate, layer_row_statistics,
)
from tests.conftest import CORPUS_DIR, TOKENIZER_DIR, WIKITEXT_TEST, make_hf_model, require_shared

SEQ = 256
SIGMA_ADD = 0.3  # see test_thresholds_reproduce_k_on_held_out_text


# ---- statistics against brute force ---------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [1, 4])
def test_row_statistics_match_numpy(chunks, monkeypatch):
    """`chunks`: the element statistics taken a chunk of rows at a time, as at long T."""
    import condensa.sparsity.calibrate as calibrate_module

    monkeypatch.setattr(calibrate_module, "row_chunks", lambda tq, tk: chunks)
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
            top = set(np.asarray(cols)[np.argsort(-row, kind="stable")[:k_l]]) if len(cols) > k_l else set(cols)
            m_i = row.max()
            delta = sum(math.exp(a[b, hh, i, j] - m_i) for j in range(i + 1) if j not in top)
            np.testing.assert_allclose(got["delta"][b, hh, i], delta, rtol=1e-4, atol=1e-6)


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

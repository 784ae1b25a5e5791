"""Top-θ on a tiny random LLaMA (GQA, head_dim 64) through the unchanged command-line tools:
python -m condensa.calibrate -> python -m condensa.eval ppl -> python -m condensa.eval generate,
the Pallas backend (prefill and decode kernels, interpret mode) against the reference op on the
same model, and python -m condensa.train from scratch with a LLaMA preset."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import condensa
from condensa.attention import AttentionConfig
from condensa.cli import run_main
from tests.conftest import CORPUS_DIR, TOKENIZER_DIR, WIKITEXT_TEST, require_shared
from tests.llama_helpers import make_hf_llama

T, K, TILE, BUDGET = 96, 8, 16, 0.34
GATED = ["--attention.mode", "toptheta", "--attention.k", str(K), "--attention.sdc", "calibrated",
         "--attention.vmc", "true", "--attention.tile_gate", "true", "--attention.block_q", str(TILE),
         "--attention.block_k", str(TILE), "--attention.tile_budget", str(BUDGET)]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tokenizer):
    """A GPT-2-vocabulary LLaMA (4 query heads, 2 KV heads, head_dim 64) and thresholds from the CLI."""
    from condensa.calibrate import cli

    root = tmp_path_factory.mktemp("llama_sparse")
    # a larger initialisation than HF's 0.02 so attention is peaked enough for pruning to matter
    hf = make_hf_llama(seed=11, vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=T,
                       tie_word_embeddings=True, initializer_range=0.15, bos_token_id=50256, eos_token_id=50256)
    hf.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = str(require_shared(CORPUS_DIR / "misc" / "inaugural.txt"))
    assert cli(["--model", str(root / "model"), "--data", data, "--k", str(K), "--tile", str(TILE), "--tile-budget",
                str(BUDGET), "--samples", "8", "--seq-len", str(T), "--check-blocks", "2", "--sigma-add", "0",
                "--out", str(root / "thresholds")]) == 0
    return root


def test_calibrate_evaluate_generate_through_the_clis(calibrated):
    from condensa.eval.__main__ import main
    from condensa.sparsity import Thresholds

    root = calibrated
    thresholds = Thresholds.load(root / "thresholds" / "thresholds.safetensors")
    assert thresholds.theta.shape == (1, 4, T)  # one threshold per query head (not per KV head)
    assert thresholds.tile_theta_decode.shape == (1, 4, T // TILE)
    summary = json.loads((root / "thresholds" / "summary.json").read_text())
    assert all(0.3 < layer["ratio"] < 3 for layer in summary["layers"])  # kept per row near k

    eval_cli = run_main(main)
    wiki = str(require_shared(WIKITEXT_TEST))
    assert eval_cli(["ppl", "--model", str(root / "model"), "--data", wiki, "--max_tokens", "300", "--max_length",
                     str(T), "--thresholds", str(root / "thresholds" / "thresholds.safetensors"), *GATED,
                     "--out", str(root / "ppl")]) == 0
    sparse = json.loads((root / "ppl" / "results.json").read_text())
    assert sparse["tokens"] > 250 and np.isfinite(sparse["ppl"]) and sparse["ppl"] > 1

    assert eval_cli(["generate", "--model", str(root / "model"), "--data", wiki, "--prompts", "2", "--prompt_tokens",
                     "32", "--max_new_tokens", "6", "--thresholds", str(root / "thresholds" / "thresholds.safetensors"),
                     *GATED, "--out", str(root / "generate")]) == 0
    result = json.loads((root / "generate" / "results.json").read_text())
    assert len(result["steps"]) == 6 and 0 <= result["token_agreement"] <= 1
    assert all(0 < s["v_rows_fraction"] < 1 and len(s["per_layer"]) == 1 for s in result["steps"])


def test_pallas_kernels_give_the_reference_numbers_on_a_gqa_llama(calibrated):
    """Prefill logits (causal, no probabilities: the prefill kernel) and the logits of a decoding
    step on the KV cache (the decode kernel) equal the reference op's."""
    from condensa.sparsity import Thresholds

    root = calibrated
    model, config = condensa.load_pretrained(root / "model")
    thresholds = Thresholds.load(root / "thresholds" / "thresholds.safetensors").validate(config)
    rule = AttentionConfig(mode="toptheta", k=K, sdc="calibrated", vmc=True, tile_gate=True, block_q=TILE,
                           block_k=TILE, tile_budget=BUDGET)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50257, (1, T)))  # query tiles 4 and 5 are gated
    forward = nnx.jit(lambda m, ids, rule: m(ids, attention=rule, thresholds=thresholds).logits, static_argnums=2)
    reference = np.asarray(forward(model, ids, rule))
    kernel = np.asarray(forward(model, ids, rule.replace(backend="pallas")))
    np.testing.assert_allclose(kernel, reference, rtol=1e-5, atol=1e-5)

    # one decoding step on a cache of 72 keys (5 key tiles: the decode gate chooses among the optional
    # ones), through the decode kernel on the cache's 2 KV heads and its running sums
    step = nnx.jit(lambda m, ids, cache, rule: m(ids, cache=cache, attention=rule, thresholds=thresholds).logits,
                   static_argnums=3)
    prefill = nnx.jit(lambda m, ids: m(ids, cache=m.init_cache(1, 80, tile_size=TILE), attention=rule,
                                       thresholds=thresholds).cache)
    cache = prefill(model, ids[:, :72])
    assert cache.k.shape == (1, 1, 80, 2, 64) and cache.k_tile_sum.shape == (1, 1, 5, 2, 64)
    want = np.asarray(step(model, ids[:, 72:73], cache, rule))
    got = np.asarray(step(model, ids[:, 72:73], cache, rule.replace(backend="pallas")))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_training_from_scratch_with_a_llama_preset_exports_for_transformers(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    from condensa.train.__main__ import main

    out = tmp_path / "run"
    assert main([
        "--out", str(out), "--init", "scratch", "--model_config", "llama-tiny",
        "--model_overrides", "{num_hidden_layers: 1, hidden_size: 32, head_dim: 16, intermediate_size: 64, max_position_embeddings: 32}",
        "--data.source", str(require_shared(CORPUS_DIR / "misc" / "inaugural.txt")),
        "--data.tokenizer", str(require_shared(TOKENIZER_DIR)), "--data.seq_len", "32", "--data.vocab_limit", "256",
        "--data.cache_dir", str(tmp_path / "token-cache"), "--train.steps", "2", "--train.batch_size", "4",
        "--train.log_every", "1", "--train.eval_every", "2", "--train.eval_batches", "1", "--loss.tile_size", "8",
        "--loss.topk.weight", "0.1", "--dropout", "0", "--train.remat", "false", "--checkpoint.every", "2",
    ]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert any(r["kind"] == "train" and r["L_topk"] > 0 for r in records)
    hf, info = LlamaForCausalLM.from_pretrained(out / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model, config = condensa.load_pretrained(out / "hf")
    assert (config.model_type, config.n_kv_head, config.tie_word_embeddings) == ("llama", 2, True)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 32))
    with torch.no_grad():
        theirs = hf.eval()(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids)).logits), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_a_prompt_fills_the_cache_on_the_fused_paths_as_the_reference_path_does(calibrated, padded):
    """`prompt=True` (attention over the new tokens alone, so the prefill kernel runs; a left-padded
    prompt with its real tokens moved to the front) gives the same logits and the same cache as
    attending to every cache slot, for dense, Top-θ and gated rules, on both backends; chunked
    prefill in `generate` gives the same greedy tokens as recomputing."""
    from condensa.sparsity import Thresholds

    root = calibrated
    model, config = condensa.load_pretrained(root / "model")
    thresholds = Thresholds.load(root / "thresholds" / "thresholds.safetensors").validate(config)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 50257, (2, 72)))
    mask = jnp.ones((2, 72), jnp.int32).at[1, :21].set(0) if padded else None
    valid = np.ones((2, 72), bool) if mask is None else np.asarray(mask, bool)
    # the prompt path promises left padding, so its padded rows run on the fused paths too
    run = nnx.jit(lambda m, rule, prompt: m(ids, attention_mask=mask, cache=m.init_cache(2, 80, tile_size=TILE),
                                            attention=rule, thresholds=thresholds, prompt=prompt, left_padded=prompt),
                  static_argnums=(1, 2))
    toptheta = AttentionConfig(mode="toptheta", k=K, sdc="calibrated", vmc=True)
    for rule in (AttentionConfig(), toptheta, toptheta.replace(tile_gate=True, block_q=TILE, block_k=TILE,
                                                               tile_budget=BUDGET, tile_cap=True)):
        for backend in ("reference", "pallas"):
            want, got = run(model, rule, False), run(model, rule.replace(backend=backend), True)
            np.testing.assert_allclose(np.asarray(got.logits)[valid], np.asarray(want.logits)[valid], atol=1e-5,
                                       err_msg=f"{rule} {backend}")
            for name in ("k", "v", "v_sum", "k_tile_sum", "key_valid", "index", "next_position"):
                a, b = np.asarray(getattr(got.cache, name)), np.asarray(getattr(want.cache, name))
                if name in ("k", "v"):
                    a, b = a[:, :, :72][:, valid], b[:, :, :72][:, valid]
                np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{name}: {rule} {backend}")
    chunked = condensa.generate(model, ids[:, :40], 8, attention_mask=None if mask is None else mask[:, :40],
                                attention=toptheta, thresholds=thresholds, prefill_chunk=16)
    whole = condensa.generate(model, ids[:, :40], 8, attention_mask=None if mask is None else mask[:, :40],
                              attention=toptheta, thresholds=thresholds, use_cache=False)
    np.testing.assert_array_equal(chunked, whole)


def test_a_prompt_needs_an_empty_cache(calibrated):
    from condensa.errors import ModelInputError

    model, _ = condensa.load_pretrained(calibrated / "model")
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 50257, (1, 8)))
    filled = model(ids, cache=model.init_cache(1, 32)).cache
    with pytest.raises(ModelInputError, match="empty KV cache"):
        model(ids, cache=filled, prompt=True)
    with pytest.raises(ModelInputError, match="empty KV cache"):
        model(ids, prompt=True)


def test_last_position_logits_and_chunking_limits(calibrated):
    from condensa.errors import ConfigError

    model, _ = condensa.load_pretrained(calibrated / "model")
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 50257, (2, 40)))
    full = np.asarray(model(ids).logits)
    last = np.asarray(model(ids, last_logits_only=True).logits)
    assert last.shape == (2, 1, full.shape[-1])
    # The head's matmul over one row and over all rows may round differently in float32.
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    gated = AttentionConfig(tile_gate=True, tile_selector="rowmean", block_q=TILE, block_k=TILE, tile_budget=BUDGET)
    with pytest.raises(ConfigError, match="prefill_chunk with the tile gate"):
        condensa.generate(model, ids, 2, attention=gated, prefill_chunk=16)


def test_sampling_and_stopping_on_the_fast_path_match_the_reference_path(calibrated):
    """Temperature, top-k and top-p sampling, EOS and left-padded prompts through the Pallas kernels
    (prompt on the prefill kernel, steps on the decode kernel) draw the same tokens as the same
    rule on the reference ops, seed for seed."""
    from condensa.sparsity import Thresholds

    model, config = condensa.load_pretrained(calibrated / "model")
    thresholds = Thresholds.load(calibrated / "thresholds" / "thresholds.safetensors").validate(config)
    ids = np.random.default_rng(4).integers(0, 50257, (2, 48))
    mask = np.ones((2, 48), np.int32)
    mask[1, :13] = 0
    gated = AttentionConfig(mode="toptheta", k=K, sdc="calibrated", vmc=True, tile_gate=True, block_q=TILE,
                            block_k=TILE, tile_budget=BUDGET, tile_cap=True)
    sampling = dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, seed=3)
    fast = condensa.generate(model, ids, 12, attention_mask=mask, attention=gated.replace(backend="pallas"),
                             thresholds=thresholds, **sampling)
    slow = condensa.generate(model, ids, 12, attention_mask=mask, attention=gated, thresholds=thresholds, **sampling)
    np.testing.assert_array_equal(fast, slow)
    eos = int(fast[0, 48 + 3])  # a token the first sequence draws: it must stop there, on both paths
    stopped = [condensa.generate(model, ids, 12, attention_mask=mask, attention=rule, thresholds=thresholds,
                                 eos_token_id=eos, **sampling) for rule in (gated.replace(backend="pallas"), gated)]
    np.testing.assert_array_equal(stopped[0], stopped[1])
    first = int(np.argmax(stopped[0][0, 48:] == eos))
    assert first <= 3 and (stopped[0][0, 48 + first:] == eos).all()


def test_a_left_padded_prompt_runs_its_real_tokens_first_under_the_plain_causal_mask():
    """What the fused paths need: plain causal visibility, positions 0.. for the real tokens moved to
    the front, and the cache's key_valid still marking each token in its own slot."""
    from condensa.model.causal_inputs import causal_inputs
    from condensa.model.kv_cache import KVCache

    ids = jnp.asarray([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = KVCache.empty(n_layer=1, batch=2, max_len=8, n_head=1, head_dim=4, dtype=jnp.float32)
    inputs = causal_inputs(ids, mask, cache, prompt=True, left_padded=True)
    assert inputs.plain_causal
    np.testing.assert_array_equal(inputs.to_front(ids), [[5, 6, 7, 0, 0], [1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(inputs.to_back(inputs.to_front(ids)), ids)
    np.testing.assert_array_equal(inputs.positions[0, :3], [0, 1, 2])
    np.testing.assert_array_equal(inputs.key_valid[:, :5], mask.astype(bool))

"""condensa's LLaMA family against transformers' eager LlamaForCausalLM / MistralForCausalLM /
Qwen2ForCausalLM (PyTorch, CPU, fp32): logits, attention probabilities, greedy generation and the
KV cache, randomly initialised at tiny shapes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import condensa
from tests.llama_helpers import LLAMA3_SCALING, make_hf_llama

# one compiled program per shape: op-by-op dispatch compiles every op separately, which is slower on CPU
_forward = nnx.jit(lambda model, ids, mask: model(ids, attention_mask=mask, return_attention=True))

SHAPES = {  # name: (kind, overrides)
    "gqa-8q-2kv-theta1e4": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=10000.0)),
    "mha-theta5e5-tied-biases": ("llama", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=4,
                                               rope_theta=500000.0, tie_word_embeddings=True, attention_bias=True,
                                               mlp_bias=True)),
    "gqa-llama3-rope-scaling": ("llama", dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    "qwen2-qkv-bias-tied-head-dim-16": ("qwen2", dict(rope_theta=1000000.0, tie_word_embeddings=True, head_dim=16,
                                                      num_key_value_heads=4)),
    "mistral-sliding-window-linear-rope": ("mistral", dict(sliding_window=32,
                                                           rope_scaling={"rope_type": "linear", "factor": 4.0})),
}


def _batch(vocab_size, seed=0):
    """Two sequences of 40 and 27 tokens, the second right-padded (padded query rows are undefined in
    both implementations, so only real rows are compared)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab_size, (2, 40))
    mask = np.ones((2, 40), np.int64)
    mask[1, 27:] = 0
    return ids, mask


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_and_attention_match_transformers(shape, tmp_path):
    kind, overrides = SHAPES[shape]
    hf = make_hf_llama(seed=1, kind=kind, **overrides)
    hf.save_pretrained(tmp_path)
    model, config = condensa.load_pretrained(tmp_path)
    assert config.model_type == kind and config.n_kv_head == hf.config.num_key_value_heads

    ids, mask = _batch(config.vocab_size)
    if kind == "mistral":  # the sliding window bounds the exact context: n_positions = min(window, max positions)
        assert config.n_positions == 32
        ids, mask = ids[:, :32], mask[:, :32]
    with torch.no_grad():
        theirs = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), output_attentions=True)
    out = _forward(model, jnp.asarray(ids), jnp.asarray(mask))

    valid = mask.astype(bool)
    assert np.abs(np.asarray(out.logits)[valid] - theirs.logits.numpy()[valid]).max() <= 1e-4
    assert len(out.attentions) == config.n_layer
    for ours, ref in zip(out.attentions, theirs.attentions):
        ours, ref = np.asarray(ours), ref.numpy()
        assert ours.shape[1] == config.n_head  # probabilities per query head
        for b in range(2):
            n = valid[b].sum()
            assert np.abs(ours[b, :, :n, :n] - ref[b, :, :n, :n]).max() <= 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = make_hf_llama(seed=7, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    path = tmp_path_factory.mktemp("llama_gen")
    hf.save_pretrained(path)
    model, _ = condensa.load_pretrained(path)
    return hf, model


def test_greedy_generation_matches_transformers_generate(pair):
    """20 greedy tokens through the KV cache (2 KV heads), for a full prompt and a left-padded one
    (position ids count real tokens only, as in HF's generate)."""
    hf, model = pair
    prompt = np.random.RandomState(0).randint(3, 101, (2, 8)).astype(np.int32)
    mask = np.ones((2, 8), np.int32)
    prompt[0, :3], mask[0, :3] = 0, 0
    ours = condensa.generate(model, prompt, 20, attention_mask=mask)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompt, dtype=torch.long), attention_mask=torch.tensor(mask),
                             max_new_tokens=20, min_new_tokens=20, do_sample=False).numpy()
    assert ours.shape == (2, 28)
    np.testing.assert_array_equal(ours, theirs)
    # the KV cache holds the 2 shared KV heads, not one per query head
    assert model.init_cache(1, 8).k.shape == (2, 1, 8, 2, 8)

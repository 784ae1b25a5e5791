"""Generation: greedy parity with transformers, KV cache vs full recompute, padding, sampling."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import condensa
from condensa.errors import CondensaError
from tests.conftest import make_hf_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = make_hf_model(seed=7)
    path = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(path)
    model, _ = condensa.load_pretrained(path)
    return hf, model


def test_greedy_matches_transformers_generate(pair):
    hf, model = pair
    prompt = np.random.RandomState(0).randint(0, 97, (2, 8))
    ours = condensa.generate(model, prompt, 20)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompt), attention_mask=torch.ones_like(torch.tensor(prompt)),
                             max_new_tokens=20, min_new_tokens=20, do_sample=False).numpy()
    assert ours.shape == (2, 28)
    np.testing.assert_array_equal(ours, theirs)


def test_kv_cache_and_full_recompute_agree(pair):
    _, model = pair
    prompt = np.random.RandomState(1).randint(0, 97, (3, 5))
    cached = condensa.generate(model, prompt, 20, use_cache=True)
    recomputed = condensa.generate(model, prompt, 20, use_cache=False)
    np.testing.assert_array_equal(cached, recomputed)


def test_cached_logits_equal_prefill_logits(pair):
    _, model = pair
    from flax import nnx

    ids = jnp.asarray(np.random.RandomState(2).randint(0, 97, (2, 12)))
    run = nnx.jit(lambda m, x, cache: m(x, cache=cache))  # eager op-by-op dispatch is slow on CPU
    full = np.asarray(model(ids).logits)
    first = run(model, ids[:, :7], model.init_cache(2, 16))
    rest = run(model, ids[:, 7:], first.cache)
    np.testing.assert_allclose(np.asarray(first.logits), full[:, :7], atol=1e-5)
    np.testing.assert_allclose(np.asarray(rest.logits), full[:, 7:], atol=1e-5)


def test_left_padded_batch_matches_unpadded_runs(pair):
    _, model = pair
    rng = np.random.RandomState(3)
    short, long = rng.randint(0, 97, 4), rng.randint(0, 97, 7)
    batch = np.zeros((2, 7), np.int32)
    mask = np.zeros((2, 7), np.int32)
    batch[0, 3:], mask[0, 3:] = short, 1
    batch[1], mask[1] = long, 1
    together = condensa.generate(model, batch, 10, attention_mask=mask)
    alone_short = condensa.generate(model, short[None], 10)
    alone_long = condensa.generate(model, long[None], 10)
    np.testing.assert_array_equal(together[0, 7:], alone_short[0, 4:])
    np.testing.assert_array_equal(together[1, 7:], alone_long[0, 7:])


def test_sampling_is_seeded_and_top_k_one_is_greedy(pair):
    _, model = pair
    prompt = np.random.RandomState(4).randint(0, 97, (2, 6))
    a = condensa.generate(model, prompt, 15, do_sample=True, seed=11)
    b = condensa.generate(model, prompt, 15, do_sample=True, seed=11)
    c = condensa.generate(model, prompt, 15, do_sample=True, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = condensa.generate(model, prompt, 15)
    # one compile: top_k=1 and a vanishing top_p each leave only the best token
    np.testing.assert_array_equal(condensa.generate(model, prompt, 15, do_sample=True, top_k=1, top_p=1e-6, seed=5), greedy)


def test_eos_is_repeated_after_a_sequence_ends(pair):
    _, model = pair
    prompt = np.random.RandomState(5).randint(0, 97, (1, 6))
    free = condensa.generate(model, prompt, 12)
    eos = int(free[0, 8])  # pretend the third generated token is EOS
    stopped = condensa.generate(model, prompt, 12, eos_token_id=eos)
    first = 6 + int(np.argmax(free[0, 6:] == eos))
    np.testing.assert_array_equal(stopped[0, : first + 1], free[0, : first + 1])
    assert (stopped[0, first:] == eos).all()


def test_generation_past_n_positions_is_refused(pair):
    _, model = pair
    with pytest.raises(CondensaError, match="n_positions"):
        condensa.generate(model, np.zeros((1, 60), np.int32), 10)

"""The output layer's padded vocabulary gives the same logits and the same loss as no padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from condensa.model.output_layer import PAD_MULTIPLE, vocab_logits


def test_padded_logits_equal_the_plain_product_and_loss():
    vocab = 3 * PAD_MULTIPLE + 5  # not a multiple: the padding path runs
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(vocab, 16)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, vocab, (2, 7)))
    plain = np.asarray(hidden) @ np.asarray(weight).T
    np.testing.assert_allclose(np.asarray(vocab_logits(hidden, weight, jnp.float32)), plain, rtol=1e-5, atol=1e-5)
    padded = vocab_logits(hidden, weight, jnp.float32, keep_padding=True)
    assert padded.shape[-1] % PAD_MULTIPLE == 0 and padded.shape[-1] > vocab

    def loss(w, keep):
        return optax.softmax_cross_entropy_with_integer_labels(
            vocab_logits(hidden, w, jnp.float32, keep_padding=keep), labels).mean()

    np.testing.assert_allclose(float(loss(weight, True)), float(loss(weight, False)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(weight, True)), np.asarray(jax.grad(loss)(weight, False)),
                               rtol=1e-5, atol=1e-7)

"""The one-pass cross-entropy against optax's, value and gradient, in float32 and bfloat16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from condensa.train.cross_entropy import cross_entropy, logsumexp_one_pass


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-6)])
def test_cross_entropy_matches_optax(dtype, tol):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 5, 300)) * 4.0, dtype)
    logits = logits.at[..., -20:].set(-1e9)  # padding columns, as the training logits have
    labels = jnp.asarray(rng.integers(0, 280, (3, 5)))

    def reference(x):
        return optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), labels).mean()

    np.testing.assert_allclose(float(cross_entropy(logits, labels)), float(reference(logits)), rtol=tol)
    got = jax.grad(lambda x: cross_entropy(x, labels))(logits)
    want = jax.grad(reference)(logits)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=1e-6 if dtype == jnp.float32 else 2e-5)


def test_logsumexp_one_pass_handles_minus_infinity_rows():
    x = jnp.asarray([[0.0, 1.0, -jnp.inf], [-jnp.inf, -jnp.inf, 2.0]])
    np.testing.assert_allclose(np.asarray(logsumexp_one_pass(x)), np.asarray(jax.nn.logsumexp(x, axis=-1)), rtol=1e-6)


def test_logsumexp_one_pass_matches_two_passes():
    """On a CPU the loss takes the two-pass log-sum-exp, so the accelerators' one-pass path is checked here."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 4099)) * 8.0, jnp.float32)
    np.testing.assert_allclose(np.asarray(logsumexp_one_pass(x)), np.asarray(jax.nn.logsumexp(x, axis=-1)), rtol=1e-6)

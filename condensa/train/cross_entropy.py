"""Next-token cross-entropy over compute-dtype logits, in one pass forward and one backward.

Why by hand: with `optax.softmax_cross_entropy_with_integer_labels` on float32 logits, XLA reads
the [tokens, vocab] logits twice for the log-sum-exp (a max, then a sum of exponentials) and
keeps float32 around them; at GPT-2 small's 50,304-wide padded vocabulary that array is the
largest of the whole step. Here the log-sum-exp is one variadic reduction carrying (max, sum)
pairs, and the backward pass writes softmax − one-hot straight in the logits' dtype. The
arithmetic is float32 throughout. On a CPU, XLA runs a variadic reduction element by element
while it vectorises a plain max and sum, so there the log-sum-exp takes the two plain passes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _combine(a, b):
    """Merges two (running max, Σ exp(x − max)) pairs."""
    (m1, s1), (m2, s2) = a, b
    m = jnp.maximum(m1, m2)
    # Equal maxima (both -inf included) scale by 1, never by exp(-inf - -inf) = exp(nan).
    w1 = jnp.where(m1 == m, 1.0, jnp.exp(m1 - m))
    w2 = jnp.where(m2 == m, 1.0, jnp.exp(m2 - m))
    return m, s1 * w1 + s2 * w2


def logsumexp_one_pass(x: jax.Array) -> jax.Array:
    """log Σ exp(x) over the last axis, float32, reading x once."""
    x = x.astype(jnp.float32)
    m, s = jax.lax.reduce((x, jnp.ones_like(x)), (jnp.float32(-jnp.inf), jnp.float32(0.0)), _combine, (x.ndim - 1,))
    return m + jnp.log(s)


def logsumexp_last_axis(x: jax.Array) -> jax.Array:
    """log Σ exp(x) over the last axis, float32: one pass on accelerators, two on a CPU."""
    x = x.astype(jnp.float32)
    return jax.lax.platform_dependent(x, cpu=lambda y: jax.nn.logsumexp(y, axis=-1), default=logsumexp_one_pass)


@jax.custom_vjp
def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over all positions of −log softmax(logits)[label]; logits [..., V], labels [...]."""
    return _forward(logits, labels)[0]


def _forward(logits, labels):
    lse = logsumexp_last_axis(logits)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return jnp.mean(lse - picked), lse


def _cross_entropy_fwd(logits, labels):
    loss, lse = _forward(logits, labels)
    return loss, (logits, labels, lse)


def _cross_entropy_bwd(residuals, g):
    logits, labels, lse = residuals
    scale = g / labels.size
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    one_hot = jnp.arange(logits.shape[-1]) == labels[..., None]
    d_logits = (jnp.where(one_hot, probs - 1.0, probs) * scale).astype(logits.dtype)
    return d_logits, None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)

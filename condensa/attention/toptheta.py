"""Top-θ attention: keep what beats a calibrated per-row threshold, with optional compensation.

No search over the row is needed: each score is compared with θ alone, which is what lets a
tiled kernel decide tile by tile. See DESIGN.md ("Attention semantics") for the formulas.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from condensa.attention.rows import keep_largest_if_empty, masked_max, safe_divide


def toptheta_pre_probs(
    scores: jax.Array,
    *,
    allowed: jax.Array,
    visible: jax.Array,
    theta: jax.Array,
    dense_rows: jax.Array,
    sdc: str,
    gamma: float,
    sdc_delta: jax.Array | None = None,
) -> jax.Array:
    """Pre-softmax Top-θ: `p_ij = exp(a_ij - m_i) / (D_i + γ Δ_i)` on `S_i = {a_ij > θ_i}`.

    scores a [B, H, Tq, Tk] float32; allowed: visible keys in tiles the gate kept; visible: the
    causal mask (for counting dropped elements); theta, sdc_delta: [B, H, Tq] per-row values;
    dense_rows [B, 1, Tq]: rows with n <= k, which keep every allowed key.
    m_i is the max over the allowed keys (the whole visible row when there is no gate).
    `exp-threshold` uses `exp(min(θ, m) - m)`: the same as `exp(θ - m)` whenever something
    survives, and finite when θ is above the whole row.
    """
    theta = theta[..., None]
    # Only the calibrated Δ̄ depends on the reference point m; for `exact` the ratio does not, and
    # the whole visible row's max keeps exp() finite when a gated-out tile holds the largest score.
    m = masked_max(scores, visible if sdc == "exact" else allowed)
    keep = allowed & ((scores > theta) | dense_rows[..., None])
    keep = keep_largest_if_empty(keep, scores, allowed)
    e = jnp.exp(jnp.where(keep, scores - m, -jnp.inf))
    denom = e.sum(axis=-1, keepdims=True)
    dropped = visible & ~keep
    if sdc == "exact":
        delta = jnp.exp(jnp.where(dropped, scores - m, -jnp.inf)).sum(axis=-1, keepdims=True)
    elif sdc == "exp-threshold":
        count = dropped.sum(axis=-1, keepdims=True).astype(jnp.float32)
        delta = jnp.where(count > 0, count * jnp.exp(jnp.minimum(theta - m, 0.0)), 0.0)
    elif sdc == "calibrated":
        delta = jnp.where(dropped.any(axis=-1, keepdims=True), sdc_delta[..., None], 0.0)
    else:
        delta = jnp.zeros_like(denom)
    return safe_divide(e, denom + jnp.float32(gamma) * delta)


def toptheta_post_probs(
    scores: jax.Array, *, allowed: jax.Array, theta: jax.Array, dense_rows: jax.Array
) -> jax.Array:
    """Post-softmax Top-θ: `p = softmax(a)` over the allowed keys, keep `p_ij > θ_i`, no renormalisation."""
    m = masked_max(scores, allowed)
    e = jnp.exp(jnp.where(allowed, scores - m, -jnp.inf))
    p = safe_divide(e, e.sum(axis=-1, keepdims=True))
    keep = allowed & ((p > theta[..., None]) | dense_rows[..., None])
    keep = keep_largest_if_empty(keep, scores, allowed)
    return jnp.where(keep, p, 0.0)


def v_mean_compensation(out: jax.Array, probs: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """VMC: `o_i += (1 - Σ_j p_ij) v̄_i`, with v̄_i the mean of the V rows visible to query i.

    out [B, Tq, H, D]; probs [B, H, Tq, Tk]; v [B, Tk, H, D]; visible [B, 1|H, Tq, Tk].
    The dropped mass is spread as if uniform over the row, which is unbiased when the dropped
    elements carry no structure.
    """
    vis = jnp.broadcast_to(visible, probs.shape).astype(jnp.float32)
    counts = vis.sum(axis=-1)  # [B, H, Tq]
    v_sum = jnp.einsum("bhqk,bkhd->bqhd", vis, v, preferred_element_type=jnp.float32)
    v_bar = v_sum / jnp.maximum(counts, 1.0).transpose(0, 2, 1)[..., None]
    missing = jnp.where(counts > 0, 1.0 - probs.sum(axis=-1), 0.0).transpose(0, 2, 1)[..., None]
    return (out.astype(jnp.float32) + missing * v_bar).astype(out.dtype)

"""The concentration losses of DESIGN.md (`topk`, `tile`, `gate`) and the matching metrics.

Everything is computed from the attention probabilities the model returns (float32
[B, H, T, T], causal prefill rows: row i sees keys 0..i). Gradients flow through the kept values,
never through which values were kept: `top_k` and `sort` pass gradients to the selected entries
only, and the selection itself is piecewise constant.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from condensa.errors import ConfigError
from condensa.kernels.tiling import mandatory_tiles, optional_tiles, tile_budgets
from condensa.kernels.tiling.pooling import tile_masses

# log(p) of a softmax output that underflowed to 0: far below any real logit gap (exp(-69) ~ 1e-30).
_LOG_FLOOR = 1e-30


def _check_tiles(t: int, block: int) -> int:
    if t % block:
        raise ConfigError(
            f"sequence length {t} is not a multiple of the tile size {block}; the tile losses need whole "
            "tiles. Choose data.seq_len as a multiple of loss.tile_size."
        )
    return t // block


# ---- topk ------------------------------------------------------------------------------------------


def topk_row_mass(probs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(Σ of each row's k largest p [B, H, T], bool [T] rows with more than k visible keys).

    `top_k` only finds each row's k-th largest value (no gradient); the mass is then a masked sum
    of p itself. Same value and the same gradient as summing `top_k`'s values, but the backward
    pass is an elementwise mask instead of a scatter of k values per row, which on a GPU cost more
    than the whole top-k search (ties at the k-th value, which softmax outputs all but never
    have, would count once per tied element).
    """
    t = probs.shape[-1]
    kth = jax.lax.stop_gradient(jax.lax.top_k(probs, min(k, t))[0][..., -1:])
    top = jnp.where(probs >= kth, probs, 0.0).sum(axis=-1)
    counted = np.arange(probs.shape[-2]) + 1 > k  # row i of a causal prefill sees n_i = i + 1 keys
    return top, counted


def topk_loss(probs: jax.Array, k: int) -> jax.Array:
    """Mean over heads and rows with n_i > k of (1 − top-k mass): the mass outside the k largest."""
    return topk_loss_of_row_mass(topk_row_mass(probs, k)[0], k)


def topk_loss_of_row_mass(top: jax.Array, k: int) -> jax.Array:
    """`topk_loss` from each causal prefill row's top-k mass [B, H, T]: rows with at most k keys
    keep everything and are left out."""
    counted = np.arange(top.shape[-1]) + 1 > k
    if not counted.any():
        return jnp.zeros((), jnp.float32)
    return jnp.mean(1.0 - top[..., counted])


# ---- tile ------------------------------------------------------------------------------------------


def oracle_tile_mass(probs: jax.Array, block: int, f: float, sink_tiles: int = 1) -> jax.Array:
    """Mass inside the gate's structure with the oracle's choice, per query tile [B, H, nq].

    The structure is the mandatory tiles (diagonal + sinks) plus the m_b = max(1, ceil(f·(b+1)))
    optional tiles with the largest true mass M_bt.
    """
    _check_tiles(probs.shape[-1], block)
    return oracle_mass_of_tiles(tile_masses(probs, block, block), block, f, sink_tiles)


def oracle_mass_of_tiles(masses: jax.Array, block: int, f: float, sink_tiles: int = 1) -> jax.Array:
    """`oracle_tile_mass` from the tile masses M_bt [B, H, n, n] (square tiles of `block`)."""
    n = masses.shape[-1]
    mandatory = jnp.asarray(mandatory_tiles(n, n, block, block, sink_tiles))
    optional = jnp.asarray(optional_tiles(n, n, block, block, sink_tiles))
    budgets = jnp.asarray(tile_budgets(n, f))
    ranked = -jnp.sort(-jnp.where(optional, masses, 0.0), axis=-1)  # largest first; non-optional count 0
    best = jnp.where(jnp.arange(n)[None, :] < budgets[:, None], ranked, 0.0).sum(axis=-1)
    return jnp.where(mandatory, masses, 0.0).sum(axis=-1) + best


def tile_loss(probs: jax.Array, block: int, f: float, sink_tiles: int = 1) -> jax.Array:
    """Mean over heads and query tiles of (1 − mass in the oracle's gate structure)."""
    _check_tiles(probs.shape[-1], block)
    return tile_loss_of_masses(tile_masses(probs, block, block), block, f, sink_tiles)


def tile_loss_of_masses(masses: jax.Array, block: int, f: float, sink_tiles: int = 1) -> jax.Array:
    """`tile_loss` from the tile masses M_bt [B, H, n, n]."""
    return jnp.mean(1.0 - oracle_mass_of_tiles(masses, block, f, sink_tiles))


# ---- gate ------------------------------------------------------------------------------------------


def pooled_scores_from_probs(probs: jax.Array, block: int) -> jax.Array:
    """The pooled gate scores s_bt = scale·q̄_b·k̄_t, up to a constant per query tile, from p alone.

    s_bt is bilinear, so it equals the mean of the logits a_ij over the tile; and a_ij = log p_ij +
    logsumexp_i, where the second term does not depend on t. Over the optional tiles (strictly
    below the diagonal, so fully visible) the mean of log p therefore ranks, and softmaxes, exactly
    like the gate's scores. This keeps the loss a function of p, as DESIGN.md asks, without the
    model having to return q and k. Entries off the optional tiles are meaningless.
    """
    n = _check_tiles(probs.shape[-1], block)
    logp = jnp.log(jnp.maximum(probs, _LOG_FLOOR))
    return logp.reshape(*probs.shape[:-2], n, block, n, block).mean(axis=(-3, -1))


def gate_loss(probs: jax.Array, block: int, tau: float = 1.0, sink_tiles: int = 1) -> jax.Array:
    """Cross-entropy between the tile-mass distribution and softmax(s/τ) over the optional tiles.

    The mass distribution is the target (no gradient): the pooled scores should point at the mass,
    not the mass bend towards whatever the scores say. Query tiles with fewer than two optional
    tiles have nothing to rank and are left out.
    """
    _check_tiles(probs.shape[-1], block)
    return gate_cross_entropy(tile_masses(probs, block, block), pooled_scores_from_probs(probs, block), block, tau,
                              sink_tiles)


def gate_cross_entropy(masses: jax.Array, scores: jax.Array, block: int, tau: float = 1.0,
                       sink_tiles: int = 1) -> jax.Array:
    """`gate_loss` from the tile masses and the pooled gate scores (both [B, H, n, n]); the scores
    matter up to a constant per query tile."""
    n = masses.shape[-1]
    optional = optional_tiles(n, n, block, block, sink_tiles)
    rows = optional.sum(axis=-1) >= 2
    if not rows.any():
        return jnp.zeros((), jnp.float32)
    optional = jnp.asarray(optional)
    masses = jax.lax.stop_gradient(jnp.where(optional, masses, 0.0))
    target = masses / jnp.maximum(masses.sum(axis=-1, keepdims=True), 1e-9)
    log_q = jax.nn.log_softmax(jnp.where(optional, scores / tau, -jnp.inf), axis=-1)
    ce = -jnp.where(optional, target * log_q, 0.0).sum(axis=-1)  # [B, H, nq]
    return jnp.mean(ce[..., rows])


def gate_captured_mass(probs: jax.Array, block: int, f: float, sink_tiles: int = 1) -> jax.Array:
    """Mass the plain pooled gate captures at budget f, per query tile [B, H, nq]: the mandatory
    tiles plus the m_b optional tiles with the highest pooled score (the calibrated threshold keeps
    m_b tiles on average; ranking is that budget without the calibration noise)."""
    n = _check_tiles(probs.shape[-1], block)
    masses = tile_masses(probs, block, block)
    mandatory = jnp.asarray(mandatory_tiles(n, n, block, block, sink_tiles))
    optional = jnp.asarray(optional_tiles(n, n, block, block, sink_tiles))
    budgets = jnp.asarray(tile_budgets(n, f))
    scores = jnp.where(optional, pooled_scores_from_probs(probs, block), -jnp.inf)
    ranks = jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)
    chosen = optional & (ranks < budgets[:, None])
    return jnp.where(mandatory | chosen, masses, 0.0).sum(axis=-1)


# ---- metrics ---------------------------------------------------------------------------------------


def elements_for_mass(probs: jax.Array, mass: float = 0.95) -> jax.Array:
    """How many of each row's largest elements it takes to reach `mass` [B, H, T]."""
    ranked = -jnp.sort(-probs, axis=-1)
    return (jnp.cumsum(ranked, axis=-1) < mass).sum(axis=-1) + 1


def mean_over_layers(fn, probs: Sequence[jax.Array], layers: Sequence[int] | None = None) -> jax.Array:
    """fn applied to the chosen layers' probs (all layers when `layers` is empty), averaged."""
    chosen = list(range(len(probs))) if not layers else list(layers)
    bad = [l for l in chosen if not 0 <= l < len(probs)]
    if bad:
        raise ConfigError(f"loss layers {bad} do not exist: the model has layers 0..{len(probs) - 1}.")
    return jnp.mean(jnp.stack([fn(probs[l]) for l in chosen]))

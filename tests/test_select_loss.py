"""The `select` loss (mass outside a budgeted selector's tiles) against a NumPy brute force."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensa.attention.inputs import AttentionInputs
from condensa.errors import ConfigError
from condensa.sparsity.selector_loss import selector_loss_of_masses
from condensa.kernels.tiling.pooling import tile_masses
from condensa.kernels.tiling.selectors import select_tiles
from condensa.train.config import TrainConfig

B, T, H, D, BLOCK = 2, 48, 3, 8, 8
SCALE = 1 / math.sqrt(D)


def _qk(seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(size=(B, T, H, D)).astype(np.float32) for _ in range(2))


def _np_probs(q, k):
    s = np.einsum("bihd,bjhd->bhij", q, k).astype(np.float64) * SCALE
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _np_window_loss(q, k, f):
    """1 − mass in the sink, the diagonal and the m_b most recent other tiles, looped."""
    p, n = _np_probs(q, k), T // BLOCK
    outside = []
    for b in range(n):
        m = max(1, math.ceil(round(f * (b + 1), 9)))
        kept = {0, b} | set(range(max(1, b - m), b))
        rows = p[:, :, b * BLOCK:(b + 1) * BLOCK]
        inside = sum(rows[..., t * BLOCK:(t + 1) * BLOCK].sum(-1) for t in kept)  # [B, H, BLOCK]
        outside.append(1 - inside.mean(-1))
    return float(np.mean(outside))


def _loss(q, k, f, selector, shared=False):
    x = AttentionInputs(jnp.asarray(q), jnp.asarray(k), SCALE)
    p = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), jnp.einsum("bihd,bjhd->bhij", x.q, x.k) * SCALE,
                                 -jnp.inf), axis=-1)
    return selector_loss_of_masses(x, tile_masses(p, BLOCK, BLOCK), block=BLOCK, f=f, selector=selector,
                                   shared_heads=shared)


@pytest.mark.parametrize("f", [0.125, 0.5])
def test_window_select_loss_is_the_mass_outside_the_latest_tiles(f):
    q, k = _qk()
    np.testing.assert_allclose(float(_loss(q, k, f, "window")), _np_window_loss(q, k, f), rtol=1e-5)


def test_rowmean_select_loss_is_the_mass_outside_the_selectors_tiles():
    q, k = _qk(1)
    kept = np.asarray(select_tiles(jnp.asarray(q), jnp.asarray(k), scale=SCALE, block_q=BLOCK, block_k=BLOCK,
                                   tile_budget=0.25, sink_tiles=1, selector="rowmean", shared_heads=True))
    p, n = _np_probs(q, k), T // BLOCK
    masses = p.reshape(B, H, n, BLOCK, n, BLOCK).sum(-1).mean(3)
    expected = np.mean(1 - np.where(kept, masses, 0).sum(-1))
    np.testing.assert_allclose(float(_loss(q, k, 0.25, "rowmean", shared=True)), expected, rtol=1e-5)
    assert kept.sum() < np.tril(np.ones((n, n))).sum() * B * H  # some tiles really are left out


def test_a_gradient_step_moves_attention_into_the_selected_tiles():
    """The loss falls along its own gradient, by about the first-order prediction (a step that
    should gain 0.005), with the selection held where it was."""
    q, k = (jnp.asarray(a) for a in _qk(2))
    value, (gq, gk) = jax.value_and_grad(lambda q, k: _loss(q, k, 0.25, "rowmean", shared=True), (0, 1))(q, k)
    lr = 0.005 / float((gq ** 2).sum() + (gk ** 2).sum())
    x_before = AttentionInputs(q, k, SCALE)
    x_after = AttentionInputs(q - lr * gq, k - lr * gk, SCALE)
    kw = dict(scale=SCALE, block_q=BLOCK, block_k=BLOCK, tile_budget=0.25, sink_tiles=1, selector="rowmean",
              shared_heads=True)
    assert bool(jnp.all(select_tiles(x_before.q, x_before.k, **kw) == select_tiles(x_after.q, x_after.k, **kw)))
    assert float(_loss(x_after.q, x_after.k, 0.25, "rowmean", shared=True)) < float(value) - 0.0025


@pytest.mark.parametrize("change,message", [
    ({"f": 0.0}, "loss.select.f is a fraction"),
    ({"selector": "oracle"}, "loss.select.selector must be one the kernels' pre-pass runs"),
])
def test_bad_select_settings_are_refused(change, message):
    from condensa.train.config import LossConfig, SelectLoss

    with pytest.raises(ConfigError, match=message):
        TrainConfig(loss=LossConfig(select=SelectLoss(weight=1.0, **change)))

"""The concentration losses computed from each layer's q and k by the fused mass kernel.

Same losses, same values and gradients as `condensa.sparsity.loss` on the probabilities (tested
against it), but the model's attention keeps its fused path and no [B, H, T, T] array is written:
see `condensa.kernels.attention_masses` for why and how. The gate loss's pooled scores
`scale · q̄_b · k̄_t` equal the tile means of the logits that `pooled_scores_from_probs` recovers
from p, so they are taken from q and k directly.
"""

from __future__ import annotations

import jax

from condensa.attention.inputs import AttentionInputs
from condensa.kernels.tiling.pooling import pooled_gate_scores
from condensa.kernels.attention_masses import row_tile_masses
from condensa.sparsity.loss import (
    _check_tiles, gate_cross_entropy, mean_over_layers, tile_loss_of_masses, topk_loss_of_row_mass,
)
from condensa.sparsity.selector_loss import selector_loss_of_masses

TOPK_TILE = 64  # the top-k loss sums R over all tiles, so its tile size only shapes the kernel


def topk_loss(x: AttentionInputs, k: int, *, backend: str | None = None) -> jax.Array:
    """`loss.topk_loss` of this layer: mean over heads and rows with more than k keys of the mass
    outside each row's k largest scores."""
    top = row_tile_masses(x.q, x.k, scale=x.scale, tile=TOPK_TILE, top_k=k, backend=backend).sum(axis=-1)
    return topk_loss_of_row_mass(top, k)


def tile_masses(x: AttentionInputs, block: int, *, backend: str | None = None) -> jax.Array:
    """M_bt [B, H, n, n]: the row tile masses averaged over each query tile's rows."""
    b, t, h, _ = x.q.shape
    n = _check_tiles(t, block)
    r = row_tile_masses(x.q, x.k, scale=x.scale, tile=block, backend=backend)  # [B, H, T, n]
    return r.reshape(b, h, n, block, n).mean(axis=3)


def gate_loss_from_masses(x: AttentionInputs, masses: jax.Array, block: int, tau: float = 1.0,
                          sink_tiles: int = 1) -> jax.Array:
    scores = pooled_gate_scores(x.q, x.k, x.scale, block, block)
    return gate_cross_entropy(masses, scores, block, tau, sink_tiles)


def select_loss(x: AttentionInputs, masses: jax.Array, cfg) -> jax.Array:
    """The `select` loss of one layer from its inputs and tile masses; `cfg` is a `LossConfig`."""
    sel = cfg.select
    return selector_loss_of_masses(x, masses, block=cfg.tile_size, f=sel.f, sink_tiles=cfg.sink_tiles,
                                   selector=sel.selector, shared_heads=sel.shared_heads)


def concentration_terms(inputs, cfg, *, backend: str | None = None) -> dict[str, jax.Array]:
    """The active losses' values (unweighted, averaged over their layers) from per-layer
    `AttentionInputs`; `cfg` is a `LossConfig`. The tile, gate and select losses share one mass
    kernel call per layer."""
    terms = {}
    if cfg.topk.weight > 0:
        terms["topk"] = mean_over_layers(lambda x: topk_loss(x, cfg.topk.k, backend=backend), inputs, cfg.topk.layers)
    masses: dict[int, jax.Array] = {}

    def layer_masses(layer: int) -> jax.Array:
        if layer not in masses:
            masses[layer] = tile_masses(inputs[layer], cfg.tile_size, backend=backend)
        return masses[layer]

    layers = list(range(len(inputs)))  # `mean_over_layers` then hands each loss a layer index
    if cfg.tile.weight > 0:
        terms["tile"] = mean_over_layers(
            lambda i: tile_loss_of_masses(layer_masses(i), cfg.tile_size, cfg.tile.f, cfg.sink_tiles),
            layers, cfg.tile.layers)
    if cfg.gate.weight > 0:
        terms["gate"] = mean_over_layers(
            lambda i: gate_loss_from_masses(inputs[i], layer_masses(i), cfg.tile_size, cfg.gate.tau, cfg.sink_tiles),
            layers, cfg.gate.layers)
    if cfg.select.weight > 0:
        terms["select"] = mean_over_layers(lambda i: select_loss(inputs[i], layer_masses(i), cfg), layers,
                                           cfg.select.layers)
    return terms

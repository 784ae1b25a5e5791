"""Forward passes that also report what the tile gate keeps in each layer: the model's
probabilities, the prefill gate's kept tiles and the decode gate's kept counts. Calibration checks
its thresholds with them, and the sparsity metrics report them."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from condensa.attention import AttentionConfig
from condensa.attention.tile_gate import decode_gate_layout, decode_rows_kept_tiles, prefill_kept_tiles


def walk_layers(model, ids: jax.Array, attention: AttentionConfig, thresholds, per_layer: Callable) -> list:
    """Runs `model` on ids [B, T] (no padding) and calls `per_layer(layer, q, k, v, scale)` on each
    layer's projections before the layer runs with `attention`. Returns the callbacks' results.

    The whole walk in one trace (`CausalLM.walk_layers`): for the metrics that run it under one jit
    at modest lengths. Calibration itself goes layer by layer (`LayerWalk`).
    """
    return model.walk_layers(ids, attention, thresholds, per_layer)


def gate_tiles_per_layer(model, ids, attention: AttentionConfig, thresholds) -> list:
    """The key tiles the prefill gate keeps in each layer, bool [B, H, nq, nk] (None for dense
    layers), with the model running `attention` so the inputs are those of the gated model."""
    ids = jnp.asarray(ids)

    def per_layer(layer, q, k, v, scale):
        if attention.for_layer(layer).is_dense:
            return None
        return prefill_kept_tiles(
            q, k, scale=scale, key_valid=jnp.ones(ids.shape, bool), tile_theta=thresholds.for_layer(layer).tile_theta,
            block_q=attention.block_q, block_k=attention.block_k, tile_budget=attention.tile_budget,
            sink_tiles=attention.sink_tiles,
        )

    return walk_layers(model, ids, attention, thresholds, per_layer)


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def forward_probs_and_gates(graphdef, state, ids, thresholds, *, attention):
    """One compiled forward: each layer's probabilities and, with a gate, its kept tiles."""
    model = nnx.merge(graphdef, state)
    probs = model(ids, attention=attention, thresholds=thresholds, return_attention=True).attentions
    gates = None
    if attention.tile_gate:
        gates = (gate_tiles_per_layer(model, ids, attention, thresholds),
                 decode_gate_kept_counts(model, ids, attention, thresholds))
    return probs, gates


def decode_gate_kept_counts(model, ids, attention: AttentionConfig, thresholds) -> list:
    """Per layer, int32 [B, H, T]: how many optional key tiles the decode gate would keep for each
    position if it were decoded as a single query (rows with nothing to gate keep all)."""
    optional, _ = decode_gate_layout(ids.shape[1], attention.block_k, attention.tile_budget, attention.sink_tiles)

    def per_layer(layer, q, k, v, scale):
        kept = decode_rows_kept_tiles(
            q, k, scale=scale, tile_theta_decode=thresholds.for_layer(layer).tile_theta_decode,
            block_k=attention.block_k, tile_budget=attention.tile_budget, sink_tiles=attention.sink_tiles)
        return (kept & optional).sum(axis=-1)

    return walk_layers(model, ids, attention, thresholds, per_layer)

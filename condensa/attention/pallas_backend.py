"""`AttentionConfig(backend="pallas")`: prefill attention through the Pallas Top-θ kernel.

The kernel covers causal prefill with no padding, for dense attention and pre-softmax Top-θ (SDC
none or calibrated, VMC, the tile gate). Everything else (decoding steps, padded batches,
top-k, post-softmax placement, exact / exp-threshold SDC, callers that need the probabilities,
attention dropout) runs the reference op, which gives the same numbers by construction.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def kernel_applies(config, layer_idx: int, *, causal: bool, need_probs: bool, dropout) -> bool:
    """Whether the prefill kernel implements this call exactly."""
    if not causal or need_probs or dropout is not None:
        return False
    if config.is_dense_layer(layer_idx) or (config.mode == "dense" and not config.tile_gate):
        return True
    if config.mode == "dense":  # dense inside gated tiles: the kernel with θ = -inf and the gate
        return True
    return config.mode == "toptheta" and config.placement == "pre" and config.sdc in ("none", "calibrated")


def kernel_tables(config, layer, layer_idx: int, t: int):
    """One layer's thresholds as the kernel takes them: θ [H, T] with -inf for rows n <= k_l
    (which stay dense), Δ̄ [H, T] when SDC is calibrated, and the gate's Θ [H, nq]."""
    rows = jnp.arange(t)
    theta = sdc = tile_theta = None
    if config.mode == "toptheta":
        idx = jnp.minimum(rows, layer.theta.shape[-1] - 1)
        theta = jnp.asarray(layer.theta, jnp.float32)[:, idx]
        theta = jnp.where((rows + 1 <= config.k_for(layer_idx))[None], -jnp.inf, theta)
        if config.sdc == "calibrated":
            sdc = jnp.asarray(layer.sdc_delta, jnp.float32)[:, idx]
    if config.tile_gate:
        nq = -(-t // config.block_q)
        tiles = jnp.minimum(jnp.arange(nq), layer.tile_theta.shape[-1] - 1)
        tile_theta = jnp.asarray(layer.tile_theta, jnp.float32)[:, tiles]
    return theta, sdc, tile_theta


def attend_with_pallas(q, k, v, *, visible, scale, layer_idx, config, thresholds, probs_dropout,
                       need_probs=True, causal=False):
    """`attend` for backend="pallas": the kernel where it applies, the reference op elsewhere."""
    from condensa.attention import _layer_thresholds, attend

    if not kernel_applies(config, layer_idx, causal=causal, need_probs=need_probs, dropout=probs_dropout):
        return attend(
            q, k, v, visible=visible, scale=scale, layer_idx=layer_idx,
            config=dataclasses.replace(config, backend="reference"), thresholds=thresholds,
            probs_dropout=probs_dropout, need_probs=need_probs, causal=causal,
        )
    from condensa.kernels import toptheta_prefill

    dense_layer = config.is_dense_layer(layer_idx)
    sparse = not dense_layer and (config.mode != "dense" or config.tile_gate)
    theta = sdc = tile_theta = None
    if sparse:
        layer = _layer_thresholds(config, thresholds, layer_idx)
        theta, sdc, tile_theta = kernel_tables(config, layer, layer_idx, q.shape[1])
    out, _ = toptheta_prefill(
        q, k, v, scale=scale, theta=theta, sdc_delta=sdc, sdc_gamma=config.gamma,
        vmc=bool(sparse and config.vmc and config.mode != "dense"), tile_theta=tile_theta,
        sink_tiles=config.sink_tiles, tile_budget=config.tile_budget if tile_theta is not None else None,
        # the gate is calibrated on its own tiles; without it the kernel's tuned 128 x 128 tiles win
        **(dict(block_q=config.block_q, block_k=config.block_k) if tile_theta is not None else {}),
    )
    return out, None

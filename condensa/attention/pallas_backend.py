"""`AttentionConfig(backend="pallas")`: prefill attention through the Pallas Top-θ kernel.

The prefill kernel covers causal prefill with no padding, and the decode kernel one new token per
sequence against the KV cache, both for dense attention and pre-softmax Top-θ (SDC none or
calibrated, VMC, the tile gate). The prefill kernel also runs post-softmax Top-θ (with the gate
too) and exact SDC without a gate, on Triton and in interpret mode. Everything else (prompts
written into a cache, padded prefill, top-k, exp-threshold SDC, exact SDC behind a gate, the TPU
twin for those variants, callers that need the probabilities, attention dropout, rows gated as
decoding steps) runs the reference op, which gives the same numbers by construction. In prefill,
layers the rule leaves dense (`dense_layers`) run the fused dense path of the reference backend
(cuDNN on the GPU); in decoding they run the decode kernel's dense mode.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from condensa.attention.reference import layer_thresholds, reference_attend, vmc_applies
from condensa.errors import ConfigError
from condensa.kernels.backend import TPU_BACKENDS, resolve_backend


def _element_rule_supported(config, layer_idx: int) -> bool:
    """Dense, or pre-softmax Top-θ with SDC none / calibrated: the rules the kernels implement."""
    if config.for_layer(layer_idx).mode == "dense":
        return True
    return config.mode == "toptheta" and config.placement == "pre" and config.sdc in ("none", "calibrated")


def _prefill_rule_supported(config, layer_idx: int) -> bool:
    """The decode kernel's rules, plus two the prefill kernel alone implements: post-softmax Top-θ
    and exact SDC without a gate (behind a gate the exact Δ needs the mass of tiles the kernel never
    reads). Neither has a TPU twin."""
    if _element_rule_supported(config, layer_idx):
        return True
    if config.mode != "toptheta" or not _variant_backend():
        return False
    if config.placement == "post":
        return True
    return config.sdc == "exact" and not _is_gated(config, layer_idx)


def _variant_backend() -> bool:
    """Whether the kernel backend this call resolves to runs the post / exact-SDC variants."""
    try:
        return resolve_backend() not in TPU_BACKENDS
    except ConfigError:
        return False


def kernel_applies(config, layer_idx: int, *, causal: bool, need_probs: bool, dropout) -> bool:
    """Whether the prefill kernel implements this call exactly (rows gated as decoding steps are
    not: the prefill kernel gates query tiles). A layer the rule leaves dense (`dense_layers`)
    runs the fused dense path instead, cuDNN on the GPU: the same numbers, and faster than the
    kernel's dense mode (docs/benchmarks.md)."""
    if not causal or need_probs or dropout is not None or (config.decode_gate_rows and _is_gated(config, layer_idx)):
        return False
    if _is_gated(config, layer_idx) and config.tile_selector == "oracle":
        return False  # the oracle ranks by the attention itself: there is nothing for a pre-pass to run
    return not config.is_dense_layer(layer_idx) and _prefill_rule_supported(config, layer_idx)


def decode_kernel_applies(config, layer_idx: int, q, decode_state, *, need_probs: bool, dropout) -> bool:
    """Whether the decode kernel implements this call: one new query per sequence, with the
    cache's running sums (and its tile means when the gate is on)."""
    if decode_state is None or q.shape[1] != 1 or need_probs or dropout is not None:
        return False
    if _is_gated(config, layer_idx) and (decode_state.k_tile_mean is None or not config.tile_choice_decodes):
        return False
    return _element_rule_supported(config, layer_idx)


def _is_gated(config, layer_idx: int) -> bool:
    return config.for_layer(layer_idx).tile_gate


def _is_sparse(config, layer_idx: int) -> bool:
    return not config.for_layer(layer_idx).is_dense


def element_tables(config, layer, layer_idx: int, n_rows: int):
    """θ [H, n_rows] (row i is for row length i + 1, -inf where n <= k_l: those rows stay dense) and
    Δ̄ [H, n_rows] when SDC is calibrated; None where the rule does not use them."""
    if config.for_layer(layer_idx).mode != "toptheta":
        return None, None
    rows = jnp.arange(n_rows)
    idx = jnp.minimum(rows, layer.theta.shape[-1] - 1)
    theta = jnp.asarray(layer.theta, jnp.float32)[:, idx]
    theta = jnp.where((rows + 1 <= config.for_layer(layer_idx).k)[None], -jnp.inf, theta)
    sdc = jnp.asarray(layer.sdc_delta, jnp.float32)[:, idx] if config.sdc == "calibrated" else None
    return theta, sdc


def gate_table(table, n_tiles: int):
    """A gate threshold table [H, N] cut or extended (nearest calibrated tile) to [H, n_tiles]."""
    idx = jnp.minimum(jnp.arange(n_tiles), table.shape[-1] - 1)
    return jnp.asarray(table, jnp.float32)[:, idx]


def attend_with_pallas(q, k, v, *, visible, scale, layer_idx, config, thresholds, probs_dropout,
                       need_probs=True, causal=False, decode_state=None):
    """`attend` for backend="pallas": a kernel where one applies, the reference op elsewhere."""
    needs = _is_sparse(config, layer_idx) and config.needs_thresholds
    layer = layer_thresholds(config, thresholds, layer_idx) if needs else None
    if decode_kernel_applies(config, layer_idx, q, decode_state, need_probs=need_probs, dropout=probs_dropout):
        return _decode(q, k, v, scale=scale, layer_idx=layer_idx, config=config, layer=layer, state=decode_state), None
    if kernel_applies(config, layer_idx, causal=causal, need_probs=need_probs, dropout=probs_dropout):
        return _prefill(q, k, v, scale=scale, layer_idx=layer_idx, config=config, layer=layer), None
    return reference_attend(
        q, k, v, visible=visible, scale=scale, layer_idx=layer_idx,
        config=dataclasses.replace(config, backend="reference"), thresholds=thresholds,
        probs_dropout=probs_dropout, need_probs=need_probs, causal=causal,
    )


def _rule_args(config, layer, layer_idx: int, n: int) -> dict:
    """The arguments both kernels take alike: θ and Δ̄ for rows of up to n keys, SDC's γ, VMC, and
    the gate's sink tiles and budget (the gate's own table and tile sizes differ per kernel)."""
    theta, sdc = element_tables(config, layer, layer_idx, n) if layer is not None else (None, None)
    return dict(theta=theta, sdc_delta=sdc, sdc_gamma=config.gamma, vmc=vmc_applies(config, layer_idx),
                sink_tiles=config.sink_tiles, tile_budget=config.tile_budget if _is_gated(config, layer_idx) else None,
                tile_cap=config.tile_cap and _is_gated(config, layer_idx))


def prefill_kernel_args(config, layer, layer_idx: int, t: int) -> dict:
    """The keyword arguments of `toptheta_prefill` that carry this layer's rule at T = t (also used
    by benchmarks that call the kernel on a model's own q, k, v)."""
    args = dict(_rule_args(config, layer, layer_idx, t), **_variant_args(config, layer_idx))
    if not _is_gated(config, layer_idx):
        return dict(args, tile_theta=None)  # without the gate the kernel's tuned 128 x 128 tiles win
    if config.tile_selector != "gate":  # a budgeted selector ranks the tiles in the pre-pass: no Θ
        return dict(args, tile_theta=None, tile_cap=False, tile_selector=config.tile_selector,
                    sub_block=config.sub_block or None, shared_heads=config.shared_heads, block_q=config.block_q,
                    block_k=config.block_k)
    # the gate is calibrated on its own tiles
    return dict(args, tile_theta=gate_table(layer.tile_theta, -(-t // config.block_q)), block_q=config.block_q,
                block_k=config.block_k)


def _variant_args(config, layer_idx: int) -> dict:
    """Post placement (θ holds probabilities) and exact SDC, for the Top-θ layers that use them;
    nothing otherwise, so the other rules call the kernel as before."""
    if config.for_layer(layer_idx).mode != "toptheta":
        return {}
    if config.placement == "post":
        return dict(placement="post")
    return dict(sdc_exact=True) if config.sdc == "exact" else {}


def _prefill(q, k, v, *, scale, layer_idx, config, layer):
    from condensa.kernels import toptheta_prefill  # lazy: looked up per call, so tests can patch it

    return toptheta_prefill(q, k, v, scale=scale, **prefill_kernel_args(config, layer, layer_idx, q.shape[1]))[0]


def decode_kernel_args(config, layer, layer_idx: int, s: int) -> dict:
    """The keyword arguments of `toptheta_decode` that carry this layer's rule for a cache of s
    slots (besides the cache state: lengths, starts, v_mean, k_tile_mean)."""
    args = _rule_args(config, layer, layer_idx, s)
    if not _is_gated(config, layer_idx):
        return dict(args, tile_theta_decode=None)
    if config.tile_selector != "gate":  # a budget ranked from the cache's tile means: no Θ_dec
        return dict(args, tile_theta_decode=None, tile_cap=False, tile_selector=config.tile_selector,
                    shared_heads=config.shared_heads, block_k=config.block_k)
    return dict(args, tile_theta_decode=gate_table(layer.tile_theta_decode, -(-s // config.block_k)),
                block_k=config.block_k)


def _decode(q, k, v, *, scale, layer_idx, config, layer, state):
    from condensa.kernels.toptheta_decode import toptheta_decode  # lazy: loads Pallas Triton; tests patch it

    gated = _is_gated(config, layer_idx)
    out, _ = toptheta_decode(
        q, k, v, state.lengths, starts=state.starts, scale=scale, v_mean=state.v_mean[:, None].astype(jnp.float32),
        k_tile_mean=state.k_tile_mean if gated else None, **decode_kernel_args(config, layer, layer_idx, k.shape[1]),
    )
    return out


def decode_cache_alignment(config) -> int:
    """Slots a KV cache should hold a multiple of, so the decode kernel reads it without padding
    (a copy at every step): the tiles of gated and of ungated layers, which may share the cache."""
    from condensa.kernels.toptheta_decode import UNGATED_BLOCK_K  # kernels load Pallas: only when asked

    return math.lcm(config.block_k, UNGATED_BLOCK_K)

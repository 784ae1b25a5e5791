"""The reference backend: every attention rule in plain jax.numpy, slow but readable, and the
oracle that every kernel backend is tested against."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from condensa.attention.config import AttentionConfig
from condensa.attention.dense import attention_scores, masked_softmax, weighted_values
from condensa.attention.gqa import repeat_kv
from condensa.attention.rows import join_rows, lookup_by_length, row_lengths, split_rows
from condensa.attention.tile_gate import gate_mask
from condensa.attention.topk import topk_probs, topk_unnormalised_probs
from condensa.attention.toptheta import toptheta_post_probs, toptheta_pre_probs, v_mean_compensation
from condensa.determinism import deterministic_ops
from condensa.errors import ThresholdsError


def layer_thresholds(config: AttentionConfig, thresholds, layer_idx: int):
    if thresholds is None:
        raise ThresholdsError(
            f"attention mode={config.mode!r} with tile_gate={config.tile_gate} needs calibrated thresholds; "
            "create them with python -m condensa.calibrate and pass thresholds=Thresholds.load(path)."
        )
    if config.gate_is_calibrated and not thresholds.has_gate:
        raise ThresholdsError("the tile gate is on but the thresholds hold no tile thresholds; "
                              "calibrate with --tile BLOCK --tile-budget F.")
    if not 0 <= layer_idx < thresholds.n_layer:
        raise ThresholdsError(f"thresholds cover {thresholds.n_layer} layers, not layer {layer_idx}; "
                              "use thresholds calibrated for this model.")
    return thresholds.for_layer(layer_idx)


def sparse_probs(q, k, *, visible, scale, layer_idx, config: AttentionConfig, thresholds=None,
                 allowed: jax.Array | None = None) -> jax.Array:
    """The attention probabilities [B, H, Tq, Tk] (float32) that `config` gives for this layer.
    k may have fewer heads than q (GQA); it is broadcast to every query head. `allowed`: the gate's
    element mask when the caller has computed it already (for a slice of the query rows)."""
    k = repeat_kv(k, q.shape[2])
    scores = attention_scores(q, k, scale)
    if is_plain_dense(config, layer_idx):
        return masked_softmax(scores, visible)
    layer = layer_thresholds(config, thresholds, layer_idx) if config.needs_thresholds else None
    if allowed is None:
        allowed = gate_mask(q, k, visible, scale=scale, layer=layer, config=config) if config.tile_gate else visible
    if config.mode == "dense":
        return masked_softmax(scores, allowed)
    k_l = config.for_layer(layer_idx).k
    if config.mode == "topk":
        if config.sdc == "exact":  # the dropped mass stays in the denominator: no renormalisation
            return topk_unnormalised_probs(scores, allowed, k_l)
        return topk_probs(scores, allowed, k_l)
    n = row_lengths(visible)
    dense_rows = (n <= k_l)[:, None, :]
    theta = lookup_by_length(layer.theta, n)
    if config.placement == "post":
        return toptheta_post_probs(scores, allowed=allowed, theta=theta, dense_rows=dense_rows)
    delta = lookup_by_length(layer.sdc_delta, n) if config.sdc == "calibrated" else None
    return toptheta_pre_probs(
        scores, allowed=allowed, visible=jnp.broadcast_to(visible, scores.shape), theta=theta,
        dense_rows=dense_rows, sdc=config.sdc, gamma=config.gamma, sdc_delta=delta,
    )


def reference_attend(q, k, v, *, visible, scale, layer_idx, config: AttentionConfig, thresholds=None,
                     probs_dropout: Callable[[jax.Array], jax.Array] | None = None, need_probs: bool = True,
                     causal: bool = False, decode_state=None) -> tuple[jax.Array, jax.Array | None]:
    """`condensa.attention.attend` (which has the contract) through the reference backend."""
    del decode_state  # the reference op recomputes the running V mean and the tile-mean keys
    fused_ok = not need_probs and probs_dropout is None
    if fused_ok and is_plain_dense(config, layer_idx):
        return fused_dense_attention(q, k, v, visible=visible, scale=scale, causal=causal), None
    k, v = repeat_kv(k, q.shape[2]), repeat_kv(v, q.shape[2])  # the reference op may broadcast GQA's K/V
    chunks = row_chunks(q.shape[1], k.shape[1]) if fused_ok else 1
    if chunks > 1:
        return attend_in_row_chunks(q, k, v, visible=visible, scale=scale, layer_idx=layer_idx, config=config,
                                    thresholds=thresholds, chunks=chunks), None
    return _reference_pass(q, k, v, visible=visible, scale=scale, layer_idx=layer_idx, config=config,
                           thresholds=thresholds, probs_dropout=probs_dropout)


def _reference_pass(q, k, v, *, visible, scale, layer_idx, config, thresholds, probs_dropout=None, allowed=None):
    """The reference op in one pass: `(out, probs)` for these query rows (`allowed`: see `sparse_probs`)."""
    probs = sparse_probs(q, k, visible=visible, scale=scale, layer_idx=layer_idx, config=config,
                         thresholds=thresholds, allowed=allowed)
    applied = probs_dropout(probs) if probs_dropout is not None else probs
    out = weighted_values(applied, v)
    if vmc_applies(config, layer_idx):
        out = v_mean_compensation(out, probs, v, visible)
    return out, probs


ROW_CHUNK_SCORES = 2**26  # float32 scores per (batch, head) that one pass of the reference op may hold


def row_chunks(tq: int, tk: int) -> int:
    """How many row chunks the reference op splits Tq query rows into, so that one chunk's
    [B, H, rows, Tk] scores stay within ROW_CHUNK_SCORES per (batch, head); the count divides Tq."""
    chunks = -(-(tq * tk) // ROW_CHUNK_SCORES)
    while tq % chunks:
        chunks += 1
    return chunks


def attend_in_row_chunks(q, k, v, *, visible, scale, layer_idx, config, thresholds, chunks: int) -> jax.Array:
    """The reference op's output, computed `Tq / chunks` query rows at a time under `lax.map`, so only
    one chunk's [B, H, rows, Tk] float32 arrays are alive (a whole pass at 16k tokens does not fit a
    GPU otherwise; docs/benchmarks.md). Every rule is row-wise once
    the gate's element mask is known (the prefill gate pools whole query tiles), so that mask is
    computed first, for all rows, as bool."""
    b, tq = q.shape[:2]
    visible = jnp.broadcast_to(visible, (b, visible.shape[1], tq, k.shape[1]))
    gated = config.for_layer(layer_idx).tile_gate
    allowed = visible
    if gated:
        layer = layer_thresholds(config, thresholds, layer_idx) if config.needs_thresholds else None
        allowed = gate_mask(q, k, visible, scale=scale, layer=layer, config=config)

    def one_chunk(args):
        q_c, visible_c, allowed_c = args
        return _reference_pass(q_c, k, v, visible=visible_c, scale=scale, layer_idx=layer_idx, config=config,
                               thresholds=thresholds, allowed=allowed_c if gated else None)[0]

    chunked = (split_rows(q, 1, chunks), split_rows(visible, 2, chunks), split_rows(allowed, 2, chunks))
    return join_rows(jax.lax.map(one_chunk, chunked), 1)  # [chunks, B, rows, H, D] -> [B, Tq, H, D]


def is_plain_dense(config: AttentionConfig, layer_idx: int) -> bool:
    """Whether this layer runs ordinary softmax attention (no threshold, no gate)."""
    return config.for_layer(layer_idx).is_dense


def vmc_applies(config: AttentionConfig, layer_idx: int) -> bool:
    """Whether this layer adds V-mean compensation (a rule that drops elements, with vmc on)."""
    rule = config.for_layer(layer_idx)
    return rule.vmc and rule.mode != "dense"


def fused_dense_attention(q, k, v, *, visible, scale, causal: bool) -> jax.Array:
    """Dense attention through `jax.nn.dot_product_attention`: cuDNN flash attention on GPUs when
    the shapes allow it, XLA elsewhere. It never materialises float32 [B, H, T, T] probabilities,
    which is what makes training without the concentration loss fast. K and V may have fewer heads
    than q (GQA): `dot_product_attention` shares them across the query groups itself."""
    deterministic = deterministic_ops()
    if causal and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and not deterministic:
        # implementation=None means XLA today, which materialises the scores; ask for cuDNN's
        # flash attention in 16 bits (it refuses float32), and keep XLA under XLA's deterministic
        # switch (cuDNN's kernel does not compile there) and for what cuDNN refuses (odd head dims).
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
        except (ValueError, NotImplementedError, TypeError):
            pass
    xla = "xla" if deterministic else None  # named, so no future default can pick cuDNN under the switch
    if causal:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=xla)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=visible, implementation=xla)

"""The decode kernel's split-K combine as one Pallas kernel (Triton lowering and CPU interpret).

Why a kernel: written in jax.numpy, the combine (the largest survivor max, the rescaled sums, the
fallback V row of a row where nothing survived, SDC and VMC) became about eight small XLA ops per
layer and decode step, each a launch and a round trip through memory (timed in
docs/benchmarks.md, "The split-K combine as one kernel"). One program per (sequence-query, head)
reads its split partials once and writes the output row.

The semantics are those of `toptheta_decode._combine` (the TPU path still runs that one):
partials of splits whose survivor max m is -inf weigh nothing; a row with no survivor at all
takes the V row of its largest score (the first split holding it); with SDC, a row that dropped
something adds `sdc` to its denominator; with VMC, `(1 - l / denom) * v̄` is added.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _combine_kernel(meta_ref, theta_ref, acc_ref, stats_ref, v_ref, *refs, num_splits, has_sdc, vmc):
    """One (sequence-query, head): partials [ns_p, D] and stats [ns_p, 8] -> output row [D]."""
    out_ref = refs[-1]
    ns_p = acc_ref.shape[0]
    valid = jax.lax.broadcasted_iota(jnp.int32, (ns_p,), 0) < num_splits  # rows past num_splits: never written
    neg = jnp.float32(-jnp.inf)
    m = jnp.where(valid, stats_ref[:, 0], neg)
    m_all = jnp.max(m)
    found = m_all > neg
    w = jnp.where(m > neg, jnp.exp(m - jnp.where(found, m_all, 0.0)), 0.0)
    acc = jnp.sum(w[:, None] * jnp.where(valid[:, None], acc_ref[...], 0.0), axis=0)  # [D]
    l = jnp.sum(w * jnp.where(valid, stats_ref[:, 1], 0.0))
    kept = jnp.sum(jnp.where(valid, stats_ref[:, 2], 0.0))

    # The fallback: the slot of the largest score, from the first split that holds it.
    best = jnp.where(valid, stats_ref[:, 4], neg)
    splits = jax.lax.broadcasted_iota(jnp.int32, (ns_p,), 0)
    first = jnp.min(jnp.where(best == jnp.max(best), splits, ns_p))
    slot = jnp.sum(jnp.where(splits == first, stats_ref[:, 5], 0.0)).astype(jnp.int32)
    fallback = jnp.sum(v_ref[pl.ds(slot, 1), :].astype(jnp.float32), axis=0)  # [D]: one V row

    acc = jnp.where(found, acc, fallback)
    l = jnp.where(found, l, 1.0)
    denom = l
    if has_sdc:  # only rows that dropped something get Δ̄
        n_visible = (meta_ref[1] - meta_ref[2]).astype(jnp.float32)
        kept = jnp.where(found, kept, 1.0)
        denom = l + jnp.where(kept < n_visible, theta_ref[1], 0.0)
    out = acc / denom
    if vmc:
        out = out + (1.0 - l / denom) * refs[0][...]
    out_ref[...] = out.astype(out_ref.dtype)


def combine_splits(meta, theta_pair, acc, stats, v, v_mean, *, num_splits, queries_per_seq, has_sdc, interpret):
    """meta int32 [Bv, H, 4] (count, length, start, -), theta_pair [Bv, H, 2] (θ, calibrated Δ̄ or 0),
    acc [Bv, H, ns_p, D] and stats [Bv, H, ns_p, 8] (the first `num_splits` rows written), the
    cache's v [B, S, Hkv, D] and v̄ [Bv, Hkv, D] (float32) or None -> out [Bv, H, D] in v's dtype."""
    bv, h, ns_p, d = acc.shape
    s, groups, tq = v.shape[1], h // v.shape[2], queries_per_seq
    per_head = lambda *block: pl.BlockSpec((None, None, *block), lambda b, hi: (b, hi) + (0,) * len(block))  # noqa: E731
    in_specs = [per_head(4), per_head(2), per_head(ns_p, d), per_head(ns_p, stats.shape[-1]),
                pl.BlockSpec((None, s, None, d), lambda b, hi: (b // tq, 0, hi // groups, 0))]
    inputs = [meta, theta_pair, acc, stats, v]
    if v_mean is not None:
        in_specs.append(pl.BlockSpec((None, None, d), lambda b, hi: (b, hi // groups, 0)))
        inputs.append(v_mean)
    kernel = functools.partial(_combine_kernel, num_splits=num_splits, has_sdc=has_sdc, vmc=v_mean is not None)
    kwargs = {}
    if not interpret:  # name Triton: without compiler params, newer jax lowers to Mosaic GPU, which refuses this kernel
        from jax.experimental.pallas import triton as pltriton

        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=4, num_stages=1)
    return pl.pallas_call(
        kernel, grid=(bv, h), in_specs=in_specs, out_specs=per_head(d),
        out_shape=jax.ShapeDtypeStruct((bv, h, d), v.dtype), interpret=interpret, name="toptheta_decode_combine",
        **kwargs,
    )(*inputs)

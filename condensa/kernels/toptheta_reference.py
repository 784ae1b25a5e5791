"""The prefill kernel's contract in plain jax.numpy, on the full [B, H, T, T] score matrix.

It is the kernel's backward pass (`jax.vjp` of this function) and the benchmark's correctness
oracle. It lives beside the kernel, not in `condensa.attention`, because kernels depend on nothing
else in condensa; the attention package's Top-θ op is the model-facing twin (see docs/kernels.md).

Semantics (DESIGN.md, "Attention semantics"), for query row i with candidates C_i = the causal
keys inside the tiles the gate keeps (all causal keys without a gate):
  m_i = max_{j in C_i} a_ij,   S_i = {j in C_i : a_ij > θ_i}  (or the single argmax when empty),
  p_ij = exp(a_ij - m_i) / (Σ_{S_i} exp(a - m_i) + γ Δ̄_i)  (Δ̄_i only if row i dropped something),
  o_i = Σ p_ij v_j  (+ (1 - Σ_j p_ij) v̄_i with VMC, v̄_i the mean of v_0..v_i).
m_i is the max over C_i, which is the same as the max over the visible row when no gate is used.
Exact SDC (`sdc_exact`) adds γ times the exact Σ exp(a_ij - m_i) over the visible keys not in S_i
(the gate's dropped keys included) instead of Δ̄. Post-softmax placement (`placement="post"`,
θ_i a probability): p_ij = softmax over C_i, kept where p_ij > θ_i (or the single argmax), with no
renormalisation.
K and V may have fewer heads than q (grouped-query attention); this oracle repeats them to every
query head (query head h reads KV head h // G), which the kernels never do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from condensa.kernels.tile_gate_prepass import prepass_keep


def candidate_mask(q, k, *, scale, tile_theta, block_q, block_k, sink_tiles, tile_budget=None,
                   tile_cap=False, tile_selector="gate", sub_block=None, shared_heads=False) -> jax.Array:
    """Bool [B, H, T, T]: causal keys, restricted to the kept tiles when `tile_theta` is given or a
    budgeted `tile_selector` chooses them."""
    b, t, h, _ = q.shape
    rows = jnp.arange(t)[:, None]
    cols = jnp.arange(t)[None, :]
    causal = jnp.broadcast_to(cols <= rows, (b, h, t, t))
    if tile_theta is None and tile_selector == "gate":
        return causal
    tp = -(-t // block_q) * block_q
    pad = [(0, 0), (0, tp - t), (0, 0), (0, 0)]
    kept = prepass_keep(jnp.pad(q, pad), jnp.pad(k, pad), tile_theta, scale=scale, block_q=block_q, block_k=block_k,
                        length=t, sink_tiles=sink_tiles, tile_budget=tile_budget, tile_cap=tile_cap,
                        selector=tile_selector, sub_block=sub_block, shared_heads=shared_heads)
    q_tile = jnp.arange(t) // block_q
    k_tile = jnp.arange(t) // block_k
    diagonal = k_tile[None, :] >= q_tile[:, None] * (block_q // block_k)
    kept_elems = kept[:, :, q_tile][:, :, :, k_tile]  # [B, H, T, T]
    return causal & (diagonal[None, None] | kept_elems)


def toptheta_prefill_reference(
    q, k, v, *, scale, theta=None, sdc_delta=None, sdc_gamma=1.0, vmc=False, tile_theta=None,
    sink_tiles=1, tile_budget=None, tile_cap=False, block_q=128, block_k=64, tile_selector="gate", sub_block=None,
    shared_heads=False, sdc_exact=False, placement="pre",
) -> jax.Array:
    """Output [B, T, H, D] in v's dtype; every statistic in float32. Arguments as the kernel's."""
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    a = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * jnp.float32(scale)
    cand = candidate_mask(q, k, scale=scale, tile_theta=tile_theta, block_q=block_q, block_k=block_k,
                          sink_tiles=sink_tiles, tile_budget=tile_budget, tile_cap=tile_cap,
                          tile_selector=tile_selector, sub_block=sub_block, shared_heads=shared_heads)
    masked = jnp.where(cand, a, -jnp.inf)
    m = jnp.max(masked, axis=-1, keepdims=True)
    if placement == "post":
        p = _post_probs(a, cand, m, theta)
    else:
        keep = cand if theta is None else _kept(a, cand, masked, theta)
        e = jnp.where(keep, jnp.exp(jnp.where(keep, a - m, 0.0)), 0.0)
        denom = e.sum(-1)
        causal = jnp.arange(a.shape[-1])[None, :] <= jnp.arange(a.shape[-2])[:, None]
        if sdc_delta is not None:  # only rows that dropped something are compensated
            dropped_any = jnp.any(~keep & causal, -1)
            denom = denom + jnp.where(dropped_any, jnp.float32(sdc_gamma) * sdc_delta.astype(jnp.float32)[None], 0.0)
        if sdc_exact:  # m_i is finite on every row (the diagonal is always a candidate)
            dropped = ~keep & causal
            denom = denom + jnp.float32(sdc_gamma) * jnp.where(dropped, jnp.exp(jnp.where(dropped, a - m, 0.0)),
                                                               0.0).sum(-1)
        p = e / denom[..., None]
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))
    if vmc:
        out = out + jnp.transpose(1.0 - p.sum(-1), (0, 2, 1))[..., None] * visible_v_mean(v)
    return out.astype(v.dtype)


def _kept(a, cand, masked, theta):
    """S_i = the candidates with `a > θ_i`, or the row's single largest candidate when none is."""
    surv = cand & (a > theta.astype(jnp.float32)[None, :, :, None])
    single = jax.nn.one_hot(jnp.argmax(masked, axis=-1), a.shape[-1], dtype=bool)
    return jnp.where(jnp.any(surv, axis=-1, keepdims=True), surv, single)


def _post_probs(a, cand, m, theta):
    """Softmax over the candidates, then only the probabilities above θ_i (no renormalisation)."""
    e = jnp.where(cand, jnp.exp(jnp.where(cand, a - m, 0.0)), 0.0)
    p = e / e.sum(-1, keepdims=True)
    if theta is None:
        return p
    keep = _kept(p, cand, jnp.where(cand, a, -jnp.inf), theta)
    return jnp.where(keep, p, 0.0)


def visible_v_mean(v: jax.Array) -> jax.Array:
    """v̄_i = mean of v_0..v_i, float32 [B, T, H, D], from one cumulative sum (not a sum per row)."""
    total = jnp.cumsum(v.astype(jnp.float32), axis=1)
    return total / jnp.arange(1, v.shape[1] + 1, dtype=jnp.float32)[None, :, None, None]

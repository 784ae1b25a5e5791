"""Tile-gated Top-θ flash attention for prefill: a Pallas kernel, its padding wrapper and its VJP.

One program handles one (query tile, batch, head). It runs an online softmax over the key tiles
its query tile visits: all causal tiles without a gate, or the compacted list that the gate's
pre-pass wrote (`tile_gate_prepass.py`; `selector_prepass.py` for the budgeted rowmean and window
selectors, in one launch), followed by the diagonal tiles, which are the only ones
that need the causal mask. Inside a tile, scores `a <= θ` are dropped from numerator and
denominator; a tile where no row gains a survivor (and no row's fallback maximum moves) is
counted as empty and, with `skip_empty`, skips its exp, its V load and its P·V. The calibrated
SDC is added to the final denominator of the rows that dropped something, and VMC mixes in v̄_i:
the wrapper sums V per query tile and takes a cumulative sum over tiles (a [B, nq, Hkv, D] array),
and the kernel adds the query tile's own visible rows with one masked matmul over the diagonal
tiles it loads anyway, so no [B, T, H, D] float32 mean is ever written.

Grouped-query attention: K and V may have Hkv = H / G heads. The program of query head h reads KV
head h // G through the BlockSpec index maps, so K and V are never repeated in memory.

Defaults (128 x 128 tiles; 4 warps for head_dim 64, 8 for 128; 3 pipeline stages) are the fastest
dense settings measured on the H100 (docs/benchmarks.md).

Rows where nothing survives keep their single largest element. The kernel does this with one
accumulator: while a row's running max m is <= θ, the row holds no survivor, so the accumulator
holds only the elements equal to m (reset whenever m rises); the first time m exceeds θ the
accumulator is reset and from then on holds survivors only.

Scores are kept in log2 units (`a * log2 e`, θ likewise) so the exponentials are `exp2`, as in
JAX's own Pallas flash attention.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from condensa.errors import ConfigError
from condensa.kernels.backend import TPU_BACKENDS, resolve_backend
from condensa.kernels.selector_prepass import fused_prepass_supported, fused_prepass_table
from condensa.kernels.tile_gate_prepass import compact_tile_lists, prepass_keep
from condensa.kernels.toptheta_reference import toptheta_prefill_reference
from condensa.tiling.selectors import SELECTORS

LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so masked rows never make NaN


class PrefillStats(NamedTuple):
    """Tile counts over the real (b, h, query tile) triples; each an int32 scalar.

    causal: tiles with at least one causally visible element; listed: tiles in the visit lists
    (gate-kept plus diagonal); visited: tiles whose scores the kernel computed (= listed: the lists
    hold only tiles to visit); empty: visited tiles where no element passed the θ check (and no row
    without survivors found a new maximum); with `skip_empty` these skipped their exp and P·V.
    """

    causal: jax.Array
    listed: jax.Array
    visited: jax.Array
    empty: jax.Array


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Everything static about one kernel launch (hashable: it keys the compilation cache)."""

    scale: float
    block_q: int = 128
    block_k: int = 128
    sink_tiles: int = 1
    tile_budget: float | None = None
    tile_cap: bool = False
    tile_selector: str = "gate"
    sub_block: int | None = None
    shared_heads: bool = False
    sdc_gamma: float = 1.0
    vmc: bool = False
    backend: str = "interpret"
    num_warps: int | None = None
    num_stages: int = 3
    heavy_first: bool = True
    skip_empty: bool = False
    poison_output: bool = False


# ---- the kernel -------------------------------------------------------------------------------


def _prefill_kernel(*refs, scale_log2, block_q, block_k, n_q_tiles, gated, has_theta, has_sdc,
                    vmc, heavy_first, skip_empty, precision):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    rest = refs[3:]
    table_ref = rest.pop(0) if gated else None
    theta_ref = rest.pop(0) if has_theta else None
    sdc_ref = rest.pop(0) if has_sdc else None
    v_prefix_ref = rest.pop(0) if vmc else None  # Σ of V rows before this query tile, float32
    if len(rest) == 3:  # a poisoned output buffer aliased to the output comes first; never read
        rest.pop(0)
    o_ref, empty_ref = rest

    pid = pl.program_id(0)
    q_tile = n_q_tiles - 1 - pid if heavy_first else pid
    ratio = block_q // block_k
    q = q_ref[...]
    head_dim = q.shape[-1]
    theta = theta_ref[...] if has_theta else None  # [block_q], log2 units
    rows = q_tile * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

    def scores(t):
        k = k_ref[pl.ds(t * block_k, block_k), :]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32)
        return s * scale_log2

    def accumulate(s, t, carry, visible, row_max):
        acc, m, l, kept, n_empty = carry
        m_new = jnp.maximum(m, row_max)
        if has_theta:
            surv = m_new > theta
            # Reset when a row's first survivor appears, or when a row without survivors finds a
            # new maximum (its single kept element moves).
            reset = jnp.where(surv, m <= theta, m_new > m)
            alpha = jnp.where(reset, 0.0, jnp.exp2(m - m_new))
            # One compare per element: `s > θ` on rows with a survivor, `s >= m` (the row's max
            # element, i.e. `s >` the float just below m) on rows without.
            cut = jnp.where(surv, theta, jax.lax.nextafter(m_new, jnp.full_like(m_new, -jnp.inf)))
            keep = s > cut[:, None]
            if visible is not None:
                keep = keep & visible
            p = jnp.where(keep, jnp.exp2(s - m_new[:, None]), 0.0)
            if has_sdc:
                kept = jnp.where(reset, 0.0, kept) + jnp.sum(keep.astype(jnp.float32), axis=-1)
        else:
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new[:, None])  # masked scores underflow to exactly 0
            if has_sdc:
                kept = kept + (jnp.sum(visible.astype(jnp.float32), axis=-1) if visible is not None else block_k)
        v = v_ref[pl.ds(t * block_k, block_k), :]
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)
        return alpha[:, None] * acc + pv, m_new, alpha * l + jnp.sum(p, axis=-1), kept, n_empty

    def off_diagonal(t, carry):
        s = scores(t)
        row_max = jnp.max(s, axis=-1)
        if not has_theta:
            return accumulate(s, t, carry, None, row_max)
        acc, m, l, kept, n_empty = carry
        # A row needs this tile if it gains a survivor or (with no survivor yet) a new maximum.
        needed = jnp.max(jnp.maximum(row_max - theta, row_max - m)) > 0
        if skip_empty:
            return jax.lax.cond(needed, lambda: accumulate(s, t, carry, None, row_max),
                                lambda: (acc, m, l, kept, n_empty + 1))
        # Computing an empty tile changes nothing (α = 1, no element kept); it is still counted.
        *state, _ = accumulate(s, t, carry, None, row_max)
        return (*state, n_empty + 1 - needed.astype(jnp.int32))

    zeros = jnp.zeros((block_q,), jnp.float32)
    carry = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
             zeros, zeros, jnp.int32(0))
    if gated:
        carry = jax.lax.fori_loop(0, table_ref[0], lambda i, c: off_diagonal(table_ref[i + 1], c), carry)
    else:
        carry = jax.lax.fori_loop(0, q_tile * ratio, off_diagonal, carry)
    v_sum = v_prefix_ref[...] if vmc else None
    for r in range(ratio):  # the diagonal tiles: always visited, causally masked
        t = q_tile * ratio + r
        cols = t * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        visible = rows >= cols
        s = jnp.where(visible, scores(t), MASK_VALUE)
        carry = accumulate(s, t, carry, visible, jnp.max(s, axis=-1))
        if vmc:  # the rest of v̄'s sum: this query tile's own visible V rows, as one small matmul
            v = v_ref[pl.ds(t * block_k, block_k), :]
            v_sum = v_sum + jax.lax.dot_general(visible.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                precision=precision, preferred_element_type=jnp.float32)

    acc, _, l, kept, n_empty = carry
    denom = l
    n_visible = (q_tile * block_q + 1 + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)).astype(jnp.float32)
    if has_sdc:  # only rows that dropped something (kept fewer than their i + 1 keys) get Δ̄
        denom = l + jnp.where(kept < n_visible, sdc_ref[...], 0.0)
    out = acc / denom[:, None]
    if vmc:
        out = out + ((1.0 - l / denom) / n_visible)[:, None] * v_sum
    o_ref[...] = out.astype(o_ref.dtype)
    empty_ref[...] = jnp.full((block_q,), n_empty, jnp.int32)


def _launch(q, k, v, table, theta2, sdc, v_prefix, opts: KernelOptions):
    """Runs the kernel on padded inputs (length Tp, a multiple of block_q)."""
    b, tp, h, d = q.shape
    bq, bk = opts.block_q, opts.block_k
    n_q = tp // bq
    groups = h // k.shape[2]  # GQA: query head hi reads KV head hi // groups

    def tile_of(i):
        return n_q - 1 - i if opts.heavy_first else i

    row_spec = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, tile_of(i), hi, 0))
    seq_spec = pl.BlockSpec((None, tp, None, d), lambda i, bi, hi: (bi, 0, hi // groups, 0))
    per_row_spec = pl.BlockSpec((None, bq), lambda i, bi, hi: (hi, tile_of(i)))
    inputs, specs = [q, k, v], [row_spec, seq_spec, seq_spec]
    if table is not None:
        width = table.shape[-1]
        inputs.append(table)
        specs.append(pl.BlockSpec((None, None, None, width), lambda i, bi, hi: (bi, hi, tile_of(i), 0)))
    tile_spec = pl.BlockSpec((None, None, None, d), lambda i, bi, hi: (bi, tile_of(i), hi // groups, 0))
    for extra, spec in ((theta2, per_row_spec), (sdc, per_row_spec), (v_prefix, tile_spec)):
        if extra is not None:
            inputs.append(extra)
            specs.append(spec)
    out_shapes = [jax.ShapeDtypeStruct(q.shape, v.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.int32)]
    out_specs = [row_spec, pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, tile_of(i)))]
    aliases = {}
    if opts.poison_output:  # unwritten output elements stay NaN, so the checks see them
        inputs.append(jnp.full(q.shape, jnp.nan, v.dtype))
        specs.append(row_spec)
        aliases = {len(inputs) - 1: 0}

    kernel = functools.partial(
        _prefill_kernel, scale_log2=opts.scale * LOG2E, block_q=bq, block_k=bk, n_q_tiles=n_q,
        gated=table is not None, has_theta=theta2 is not None, has_sdc=sdc is not None, vmc=opts.vmc,
        heavy_first=opts.heavy_first, skip_empty=opts.skip_empty,
        precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)
    kwargs = {}
    if opts.backend == "triton":
        from jax.experimental.pallas import triton as pltriton

        kwargs["compiler_params"] = pltriton.CompilerParams(
            num_warps=opts.num_warps or (4 if d <= 64 else 8), num_stages=opts.num_stages)
    out, empty = pl.pallas_call(
        kernel, grid=(n_q, b, h), in_specs=specs, out_specs=out_specs, out_shape=out_shapes,
        input_output_aliases=aliases, interpret=opts.backend == "interpret",
        name="toptheta_prefill", **kwargs,
    )(*inputs)
    return out, empty[:, :, ::bq]


def _forward(q, k, v, theta, sdc_delta, tile_theta, opts: KernelOptions):
    b, t, h, d = q.shape
    bq, bk = opts.block_q, opts.block_k
    tp = -(-t // bq) * bq
    n_q, ratio = tp // bq, bq // bk
    hkv = k.shape[2]

    def pad_seq(x, axis, value=0.0):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, tp - t)
        return jnp.pad(x, widths, constant_values=value)

    qp, kp, vp = (pad_seq(x, 1) for x in (q, k, v))
    theta2 = None if theta is None else pad_seq(theta.astype(jnp.float32) * LOG2E, 1, -jnp.inf)
    sdc = None if sdc_delta is None else pad_seq(jnp.float32(opts.sdc_gamma) * sdc_delta.astype(jnp.float32), 1)
    v_prefix = None
    if opts.vmc:  # exclusive prefix sums of V over query tiles: [B, nq, Hkv, D], float32
        tile_sums = vp.astype(jnp.float32).reshape(b, n_q, bq, hkv, d).sum(axis=2)
        v_prefix = jnp.cumsum(tile_sums, axis=1) - tile_sums
    table = keep = None
    if tile_theta is not None or opts.tile_selector != "gate":
        fused = (tile_theta is None and opts.backend not in TPU_BACKENDS
                 and fused_prepass_supported(opts.tile_selector, opts.sub_block, bk, opts.backend))
        if fused:  # scores, cut and lists in one launch; the TPU twin reads the mask instead
            table = fused_prepass_table(qp, kp, scale=opts.scale, block_q=bq, block_k=bk, length=t,
                                        sink_tiles=opts.sink_tiles, tile_budget=opts.tile_budget,
                                        selector=opts.tile_selector, shared_heads=opts.shared_heads,
                                        backend=opts.backend)
        else:
            keep = prepass_keep(qp, kp, tile_theta, scale=opts.scale, block_q=bq, block_k=bk, length=t,
                                sink_tiles=opts.sink_tiles, tile_budget=opts.tile_budget, tile_cap=opts.tile_cap,
                                selector=opts.tile_selector, sub_block=opts.sub_block,
                                shared_heads=opts.shared_heads)
            table = compact_tile_lists(keep)
    if opts.backend in TPU_BACKENDS:
        from condensa.kernels.toptheta_prefill_tpu import launch_tpu

        out, empty = launch_tpu(qp, kp, vp, keep, theta2, sdc, v_prefix, opts)
    else:
        out, empty = _launch(qp, kp, vp, table, theta2, sdc, v_prefix, opts)

    # Tile counts over real query tiles; diagonal tiles that start past T are not counted.
    diag_real = jnp.minimum(ratio, -(-(t - jnp.arange(n_q) * bq) // bk))  # [nq]
    off_diag = (table[..., 0] if table is not None
                else jnp.broadcast_to(jnp.arange(n_q) * ratio, (b, h, n_q)))
    listed = jnp.sum(off_diag) + b * h * jnp.sum(diag_real)
    causal = b * h * jnp.sum(jnp.arange(n_q) * ratio + diag_real)
    stats = PrefillStats(causal.astype(jnp.int32), listed.astype(jnp.int32),
                         listed.astype(jnp.int32), jnp.sum(empty).astype(jnp.int32))
    return out[:, :t], stats


# ---- differentiation: the backward pass is the jnp reference's ---------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _prefill(q, k, v, theta, sdc_delta, tile_theta, opts):
    return _forward(q, k, v, theta, sdc_delta, tile_theta, opts)


def _prefill_fwd(q, k, v, theta, sdc_delta, tile_theta, opts):
    return _forward(q, k, v, theta, sdc_delta, tile_theta, opts), (q, k, v, theta, sdc_delta, tile_theta)


def _prefill_bwd(opts, residuals, cotangents):
    """Gradients flow through the kept values (not the selection), as in the reference op."""
    q, k, v, theta, sdc_delta, tile_theta = residuals
    d_out = cotangents[0]

    def reference(q, k, v):
        return toptheta_prefill_reference(
            q, k, v, scale=opts.scale, theta=theta, sdc_delta=sdc_delta, sdc_gamma=opts.sdc_gamma,
            vmc=opts.vmc, tile_theta=tile_theta, sink_tiles=opts.sink_tiles, tile_budget=opts.tile_budget,
            tile_cap=opts.tile_cap, block_q=opts.block_q,
            block_k=opts.block_k, tile_selector=opts.tile_selector, sub_block=opts.sub_block,
            shared_heads=opts.shared_heads)

    _, vjp = jax.vjp(reference, q, k, v)
    dq, dk, dv = vjp(d_out)
    zeros = jax.tree.map(jnp.zeros_like, (theta, sdc_delta, tile_theta))
    return (dq, dk, dv, *zeros)


_prefill.defvjp(_prefill_fwd, _prefill_bwd)


# ---- the public entry point -------------------------------------------------------------------


def toptheta_prefill(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    theta: jax.Array | None = None,
    sdc_delta: jax.Array | None = None,
    sdc_gamma: float = 1.0,
    vmc: bool = False,
    tile_theta: jax.Array | None = None,
    sink_tiles: int = 1,
    tile_budget: float | None = None,
    tile_cap: bool = False,
    tile_selector: str = "gate",
    sub_block: int | None = None,
    shared_heads: bool = False,
    block_q: int = 128,
    block_k: int = 128,
    backend: str | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
    heavy_first: bool = True,
    skip_empty: bool = False,
    poison_output: bool = False,
) -> tuple[jax.Array, PrefillStats]:
    """Causal (tile-gated) Top-θ attention of one layer: returns `(out [B, T, H, D], stats)`.

    q [B, T, H, D], k and v [B, T, Hkv, D] (D = 64 or 128; float32, bfloat16 or float16), with
    Hkv dividing H (grouped-query attention: query head h reads KV head h // (H / Hkv)). `theta[h, i]`: the
    threshold of query row i (row length i + 1), compared as `scale * q·k > θ` in float32; None
    means dense. `sdc_delta[h, i]`: calibrated SDC, added as `sdc_gamma * Δ̄` to the denominator.
    `tile_theta[h, b]`: the gate threshold of query tile b (tiles of `block_q` queries and
    `block_k` keys); None means no gate. `tile_budget` f (optional): query tiles with at most
    m_b = max(1, ceil(f (b + 1))) optional tiles keep them all, as the reference gate does;
    `tile_cap` (needs `tile_budget`) keeps at most the m_b best of the tiles above Θ.
    `tile_selector` other than "gate" ranks the tiles with a budgeted selector of
    `condensa.tiling.selectors` (any but "oracle") and keeps exactly
    the m_b best (it needs `tile_budget`, and no `tile_theta`); `sub_block` is its key summary's
    granularity (`condensa.tiling.selectors.estimated_tile_mass`), and `shared_heads` lets the
    heads of a query tile share one budget (`keep_top_tiles`). Rows
    that must stay dense (n <= k) take θ = -inf. `vmc` adds V-mean compensation. `backend`: None/'auto'
    (by platform), 'triton', 'interpret', 'mosaic_tpu' or 'tpu_interpret' (the TPU kernel,
    `toptheta_prefill_tpu.py`, interpreted on the CPU). `poison_output` fills the output with NaN before the
    kernel runs (for correctness checks). `skip_empty=True` makes a visited tile with nothing
    above θ skip its exp, V load and P·V behind a `lax.cond`; the output is the same, and empty
    tiles are counted either way. It is off by default: on the H100 the branch (whose V load
    the compiler cannot pipeline) cost more than it saved (docs/kernels.md).
    """
    if (q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or k.shape[:2] != q.shape[:2]
            or k.shape[3] != q.shape[3] or k.shape[2] < 1 or q.shape[2] % k.shape[2]):
        raise ConfigError(f"q must be [B, T, H, D] and k, v [B, T, Hkv, D] of one shape, with Hkv dividing H "
                          f"(grouped-query attention); got {q.shape}, {k.shape}, {v.shape}.")
    _, t, h, d = q.shape
    if d not in (64, 128):
        raise ConfigError(f"head_dim {d} is not supported by the prefill kernel; it takes 64 or 128.")
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block < 16 or block & (block - 1):
            raise ConfigError(f"{name}={block} must be a power of two >= 16.")
    if block_q % block_k:
        raise ConfigError(f"block_q={block_q} must be a multiple of block_k={block_k}.")
    n_q = -(-t // block_q)
    for name, table, shape in (("theta", theta, (h, t)), ("sdc_delta", sdc_delta, (h, t)),
                               ("tile_theta", tile_theta, (h, n_q))):
        if table is not None and tuple(table.shape) != shape:
            raise ConfigError(f"{name} has shape {tuple(table.shape)} but this call needs {shape} "
                              f"(heads, {'query tiles' if name == 'tile_theta' else 'query rows'}).")
    if tile_selector != "gate":
        runnable = [s for s in SELECTORS if s != "oracle"]
        if tile_selector not in runnable or tile_budget is None or tile_theta is not None:
            raise ConfigError(f"tile_selector={tile_selector!r} needs tile_budget and no tile_theta; the kernel "
                              f"runs {', '.join(runnable)} (the oracle needs the attention itself).")
    if tile_cap and (tile_theta is None or tile_budget is None):
        raise ConfigError("tile_cap caps the gate at its budget: it needs tile_theta and tile_budget.")
    opts = KernelOptions(
        scale=float(1.0 / math.sqrt(d) if scale is None else scale), block_q=block_q, block_k=block_k,
        sink_tiles=sink_tiles, tile_budget=None if tile_budget is None else float(tile_budget), tile_cap=bool(tile_cap),
        tile_selector=str(tile_selector), sub_block=None if sub_block is None else int(sub_block),
        shared_heads=bool(shared_heads),
        sdc_gamma=float(sdc_gamma), vmc=bool(vmc), backend=resolve_backend(backend),
        num_warps=num_warps, num_stages=num_stages, heavy_first=heavy_first, skip_empty=skip_empty,
        poison_output=poison_output)
    return _jitted_prefill(q, k, v, theta, sdc_delta, tile_theta, opts)


@functools.partial(jax.jit, static_argnums=(6,))
def _jitted_prefill(q, k, v, theta, sdc_delta, tile_theta, opts):
    return _prefill(q, k, v, theta, sdc_delta, tile_theta, opts)

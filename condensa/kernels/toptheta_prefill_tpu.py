"""The prefill kernel for TPUs (Mosaic TPU, `pltpu`): the same rule as `toptheta_prefill`'s
Triton kernel, laid out the way splash attention is.

Why a second kernel: Mosaic TPU wants the key-tile loop as a grid axis (so that each step's K and
V tiles are DMA'd into VMEM by the pipeline) and the tile lists as scalar-prefetch operands in
SMEM, which the index maps read. The grid is (B, H, query tiles, list slots). Slot j of query
tile b loads key tile `visit[b, j]`; slots past the tile's count repeat its last tile, whose
block index does not change, so the pipeline fetches nothing and the body is skipped. The online
softmax state (m, l, the accumulator, kept counts, v̄'s sum) lives in VMEM scratch across the
slots of one query tile. Heads are moved in front of the sequence ([B, H, T, D]) so that each
block's last two dimensions are (rows, head_dim), as Mosaic tiles them.

The visit list of a query tile is its gate-kept off-diagonal tiles in ascending order, then its
diagonal tiles; without a gate it is every causal tile. Scores are in log2 units as in the Triton
kernel. Rows without a survivor keep the elements equal to their running maximum (`s >= m`), the
same set as the Triton kernel's `s > nextafter(m)`.

Status: checked against the NumPy oracle in TPU interpret mode (`backend="tpu_interpret"`, which
simulates the TPU's grid, DMAs and memory spaces on the CPU). It has not run on a TPU: none is lent
to this project. The block-shape rules it follows are Mosaic's ((8, 128)-divisible or full last
two dimensions), but only a TPU run can confirm that it lowers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from condensa.kernels.tile_gate_prepass import compact_tile_lists

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _tpu_kernel(visit_ref, count_ref, q_ref, k_ref, v_ref, *refs, block_q, block_k, ratio, n_q_tiles, width,
                n_heads, has_theta, has_sdc, vmc, scale_log2, precision):
    refs = list(refs)
    theta_ref = refs.pop(0) if has_theta else None
    sdc_ref = refs.pop(0) if has_sdc else None
    v_prefix_ref = refs.pop(0) if vmc else None
    o_ref, empty_ref, acc_ref, m_ref, l_ref, kept_ref, empty_acc_ref, v_sum_ref = refs

    b, h, q_tile, j = (pl.program_id(i) for i in range(4))
    slot = (b * n_heads + h) * n_q_tiles + q_tile
    count = count_ref[slot]

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
        l_ref[...] = jnp.zeros_like(l_ref)
        kept_ref[...] = jnp.zeros_like(kept_ref)
        empty_acc_ref[...] = jnp.zeros_like(empty_acc_ref)
        if vmc:
            v_sum_ref[...] = jnp.broadcast_to(v_prefix_ref[...].astype(jnp.float32), v_sum_ref.shape)

    @pl.when(j < count)
    def _visit():
        t = visit_ref[slot * width + j]
        diagonal = t >= q_tile * ratio
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * scale_log2
        rows = q_tile * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
        cols = t * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        visible = rows >= cols  # all true off the diagonal
        s = jnp.where(visible, s, MASK_VALUE)
        m, l = m_ref[...], l_ref[...]  # [block_q, 1]
        row_max = jnp.max(s, axis=-1, keepdims=True)
        m_new = jnp.maximum(m, row_max)
        if has_theta:
            theta = theta_ref[...]  # [block_q, 1]
            surv = m_new > theta
            reset = jnp.where(surv, m <= theta, m_new > m)
            alpha = jnp.where(reset, 0.0, jnp.exp2(m - m_new))
            keep = jnp.where(surv, s > theta, s >= m_new) & visible
            p = jnp.where(keep, jnp.exp2(s - m_new), 0.0)
            if has_sdc:
                kept_ref[...] = (jnp.where(reset, 0.0, kept_ref[...])
                                 + jnp.sum(keep.astype(jnp.float32), axis=-1, keepdims=True))
            # an off-diagonal tile where no row gains a survivor or a new maximum is counted empty
            needed = jnp.max(jnp.maximum(row_max - theta, row_max - m)) > 0
            empty = jnp.logical_and(jnp.logical_not(diagonal), jnp.logical_not(needed))
            empty_acc_ref[...] += empty.astype(jnp.int32)
        else:
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new)
            if has_sdc:
                kept_ref[...] += jnp.sum(visible.astype(jnp.float32), axis=-1, keepdims=True)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)
        acc_ref[...] = alpha * acc_ref[...] + pv
        m_ref[...] = m_new
        l_ref[...] = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
        if vmc:  # v̄'s sum gets this query tile's own visible V rows on the diagonal tiles
            @pl.when(diagonal)
            def _own_rows():
                v_sum_ref[...] += jax.lax.dot_general(visible.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                      precision=precision, preferred_element_type=jnp.float32)

    @pl.when(j == count - 1)
    def _finish():
        l = l_ref[...]
        n_visible = (q_tile * block_q + 1
                     + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)).astype(jnp.float32)
        denom = l
        if has_sdc:  # only rows that dropped something (kept fewer than their i + 1 keys) get Δ̄
            denom = l + jnp.where(kept_ref[...] < n_visible, sdc_ref[...], 0.0)
        out = acc_ref[...] / denom
        if vmc:
            out = out + ((1.0 - l / denom) / n_visible) * v_sum_ref[...]
        o_ref[...] = out.astype(o_ref.dtype)
        empty_ref[...] = jnp.broadcast_to(empty_acc_ref[...], empty_ref.shape)


def launch_tpu(q, k, v, keep, theta2, sdc, v_prefix, opts):
    """Runs the TPU kernel on padded [B, Tp, H, D] inputs; `keep` [B, H, nq, nk] marks the
    off-diagonal tiles to visit (None: all of them). Returns (out [B, Tp, H, D], empty [B, H, nq])."""
    b, tp, h, d = q.shape
    bq, bk = opts.block_q, opts.block_k
    n_q, n_k, ratio = tp // bq, tp // bk, bq // bk
    hkv = k.shape[2]
    groups = h // hkv
    k_tile = jnp.arange(n_k)[None, :]
    q_tile = jnp.arange(n_q)[:, None]
    off_diagonal = k_tile < q_tile * ratio
    diagonal = (k_tile >= q_tile * ratio) & (k_tile < (q_tile + 1) * ratio)
    keep = jnp.broadcast_to(off_diagonal, (b, h, n_q, n_k)) if keep is None else keep
    table = compact_tile_lists(keep | diagonal)  # ascending: the kept off-diagonal tiles, then the diagonal
    width = table.shape[-1] - 1
    counts = table[..., 0].reshape(-1)
    visit = table[..., 1:].reshape(-1)

    def kv_index(bi, hi, i, j, visit_ref, count_ref):
        slot = (bi * h + hi) * n_q + i
        last = jnp.maximum(count_ref[slot] - 1, 0)
        return bi, hi // groups, visit_ref[slot * width + jnp.minimum(j, last)], 0

    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, T, H, D] -> [B, H, T, D]
    row_spec = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), kv_index)
    per_row_spec = pl.BlockSpec((None, bq, 1), lambda bi, hi, i, j, *_: (hi, i, 0))
    inputs, specs = [heads_first(q), heads_first(k), heads_first(v)], [row_spec, kv_spec, kv_spec]
    for table_2d in (theta2, sdc):
        if table_2d is not None:
            inputs.append(table_2d[..., None])  # [H, Tp, 1]: one value per row, rows on sublanes
            specs.append(per_row_spec)
    if v_prefix is not None:  # [B, nq, Hkv, D] -> [B, Hkv, nq, 1, D]
        inputs.append(jnp.transpose(v_prefix, (0, 2, 1, 3))[:, :, :, None, :])
        specs.append(pl.BlockSpec((None, None, None, 1, d), lambda bi, hi, i, j, *_: (bi, hi // groups, i, 0, 0)))
    out_shapes = [jax.ShapeDtypeStruct((b, h, tp, d), v.dtype), jax.ShapeDtypeStruct((b, h, tp, 1), jnp.int32)]
    out_specs = [row_spec, pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j, *_: (bi, hi, i, 0))]
    scratch = [pltpu.VMEM((bq, d), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
               pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.int32), pltpu.VMEM((bq, d), jnp.float32)]
    kernel = functools.partial(
        _tpu_kernel, block_q=bq, block_k=bk, ratio=ratio, n_q_tiles=n_q, width=width, n_heads=h,
        has_theta=theta2 is not None, has_sdc=sdc is not None, vmc=v_prefix is not None,
        scale_log2=opts.scale * 1.4426950408889634,
        precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, h, n_q, n_k), in_specs=specs, out_specs=out_specs, scratch_shapes=scratch)
    out, empty = pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shapes, name="toptheta_prefill_tpu",
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if opts.backend == "tpu_interpret" else False,
    )(visit, counts, *inputs)
    return jnp.swapaxes(out, 1, 2), empty[:, :, ::bq, 0]

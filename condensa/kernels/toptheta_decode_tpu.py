"""The decode kernel for TPUs (Mosaic TPU, `pltpu`): the Triton decode kernel's rule and outputs,
with the cache read by explicit DMAs.

Why explicit DMAs: a BlockSpec would make the pipeline fetch every listed V tile, but the point of
the kernel is to read V only for tiles that hold a surviving element. So K and V stay in HBM
(`memory_space=pl.ANY`); each program (one sequence-query, head and split) walks its share of the
compacted tile list (scalar-prefetched into SMEM with the rows' counts, lengths and starts),
copies each listed K tile into VMEM, scores it, and copies the V tile only behind the branch
taken when the tile holds a survivor. The copies slice the cache in its own [B, S, Hkv, D]
layout (a strided DMA), so no transposed copy of the cache is ever made. The partial results
(unnormalised output and the same 8 statistics per program) go to the shared split-K combine in
`toptheta_decode.py`, which applies SDC, VMC and the nothing-survives rule.

This first version waits for each copy before using it (no double buffering), so on a TPU it
would trade the reads it saves against exposed DMA latency. V is read in whole blocks
(`skip_v="blocks"`); the masked row loads of `skip_v="rows"` are a Triton feature.

Status: checked against the reference in TPU interpret mode (`backend="tpu_interpret"`). It has
not run on a TPU: none is lent to this project, so whether Mosaic lowers it (scalar branches on
reduced vector values, strided DMAs) is untested.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

STAT_WIDTH = 8  # as the Triton kernel: m, l, survivors, V blocks, best score, its slot, -, -


def _decode_kernel_tpu(tiles_ref, meta_ref, q_ref, theta_ref, k_hbm, v_hbm, acc_ref, stat_ref, k_buf, v_buf, sem, *,
                       scale, block_k, num_splits, width, n_heads, groups, queries_per_seq, has_theta):
    row, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cell = row * n_heads + h
    count, length, start = meta_ref[3 * cell], meta_ref[3 * cell + 1], meta_ref[3 * cell + 2]
    share = (count + num_splits - 1) // num_splits
    lo = split * share
    hi = jnp.minimum(lo + share, count)
    seq, kv_head = row // queries_per_seq, h // groups
    q = q_ref[...].astype(jnp.float32)  # [1, D]
    theta = theta_ref[...]  # [1, 1]
    offsets = jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)

    def load(hbm, buf, tile):
        copy = pltpu.make_async_copy(hbm.at[seq, pl.ds(tile * block_k, block_k), kv_head, :], buf, sem)
        copy.start()
        copy.wait()
        return buf[...].astype(jnp.float32)  # [bk, D]

    def visit(i, carry):
        acc, m, l, kept, v_loads, best, best_slot = carry
        tile = tiles_ref[cell * width + i]
        k = load(k_hbm, k_buf, tile)
        cols = tile * block_k + offsets
        visible = (cols >= start) & (cols < length)
        a = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                                preferred_element_type=jnp.float32) * scale
        a = jnp.where(visible, a, -jnp.inf)  # [1, bk]
        a_max = jnp.max(a)
        slot = jnp.min(jnp.where(a == a_max, cols, jnp.int32(2**30)))  # first slot of the largest
        best_slot = jnp.where(a_max > best, slot, best_slot)
        best = jnp.maximum(best, a_max)

        def accumulate():
            keep = (a > theta) & visible if has_theta else visible
            m_new = jnp.maximum(m, a_max)
            alpha = jnp.exp(m - m_new)
            p = jnp.where(keep, jnp.exp(a - m_new), 0.0)
            v = load(v_hbm, v_buf, tile)
            pv = jax.lax.dot_general(p, v, (((1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                                     preferred_element_type=jnp.float32)
            return (alpha * acc + pv, m_new, alpha * l + jnp.sum(p), kept + jnp.sum(keep.astype(jnp.float32)),
                    v_loads + 1, best, best_slot)

        if not has_theta:
            return accumulate()
        # V is read, whole, only for a tile that holds a survivor
        return jax.lax.cond(a_max > theta[0, 0], accumulate, lambda: (acc, m, l, kept, v_loads, best, best_slot))

    zero, neg = jnp.float32(0.0), jnp.float32(-jnp.inf)
    init = (jnp.zeros(q.shape, jnp.float32), neg, zero, zero, jnp.int32(0), neg, jnp.int32(0))
    acc, m, l, kept, v_loads, best, best_slot = jax.lax.fori_loop(lo, hi, visit, init)
    acc_ref[...] = acc
    idx = jax.lax.broadcasted_iota(jnp.int32, (1, STAT_WIDTH), 1)
    out = jnp.zeros((1, STAT_WIDTH), jnp.float32)
    for n, value in enumerate((m, l, kept, v_loads.astype(jnp.float32), best, best_slot.astype(jnp.float32))):
        out = jnp.where(idx == n, value, out)
    stat_ref[...] = out


def launch_decode_tpu(meta, tiles, theta_row, q, k, v, opts):
    """The TPU twin of `toptheta_decode._launch`: same inputs (meta [Bv, H, 4], tiles [Bv, H, W],
    theta [Bv, H, 2], q [Bv, H, D], k/v [B, S, Hkv, D]), same partial outputs
    (acc [Bv, H, ns, D], stats [Bv, H, ns, 8])."""
    bv, h, d = q.shape
    ns, bk = opts.num_splits, opts.block_k
    width = tiles.shape[-1]
    per_cell = lambda *block: pl.BlockSpec((None, None, *block), lambda r, hi, j, *_: (r, hi, 0, 0))  # noqa: E731
    per_split = lambda last: pl.BlockSpec((None, None, None, 1, last), lambda r, hi, j, *_: (r, hi, j, 0, 0))  # noqa: E731
    kernel = functools.partial(
        _decode_kernel_tpu, scale=opts.scale, block_k=bk, num_splits=ns, width=width, n_heads=h,
        groups=h // k.shape[2], queries_per_seq=opts.queries_per_seq, has_theta=opts.has_theta)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(bv, h, ns),
        in_specs=[per_cell(1, d), per_cell(1, 1), pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[per_split(d), per_split(STAT_WIDTH)],
        scratch_shapes=[pltpu.VMEM((bk, d), k.dtype), pltpu.VMEM((bk, d), v.dtype), pltpu.SemaphoreType.DMA(())])
    acc, stats = pl.pallas_call(
        kernel, grid_spec=grid_spec, name="toptheta_decode_tpu",
        out_shape=[jax.ShapeDtypeStruct((bv, h, ns, 1, d), jnp.float32),
                   jax.ShapeDtypeStruct((bv, h, ns, 1, STAT_WIDTH), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=pltpu.InterpretParams() if opts.backend == "tpu_interpret" else False,
    )(tiles.reshape(-1), meta[..., :3].reshape(-1), q[:, :, None, :], theta_row[..., :1, None], k, v)
    return acc[:, :, :, 0], stats[:, :, :, 0]

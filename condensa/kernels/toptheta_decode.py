"""Tile-gated Top-θ decode attention over a KV cache: a Pallas kernel that reads only kept tiles.

Decoding is memory-bound: dense attention reads the whole K and V cache for every new token. Here
a cheap pre-pass (plain jax.numpy, fused by XLA) scores the per-tile mean keys k̄_t that the cache
keeps, `s_t = scale * q · k̄_t`, against the decode gate threshold `Θ_dec[h, t_count - 1]`, keeps
the first `sink_tiles` tiles and the tile holding the last key, and writes a compacted list of the
tiles to visit (the `MaskInfo.data_next` pattern of JAX's splash attention). The kernel then loads
K only for listed tiles, applies the element rule `a > θ` inside them, and loads V only where an
element survives (`skip_v`): the surviving rows with masked loads ("rows", the default on GPU: on
trained models survivors spread over many V blocks but few rows), the same behind a branch per
tile ("rows_branch": no V work in a tile without a survivor, which pays only where few tiles hold
one), or whole V blocks behind a branch ("blocks", the TPU kernel's only mode; it pays only where
survivors cluster in a few blocks). Timings: docs/benchmarks.md (decoding at S = 16k).

Without a gate every row visits its visible tiles in order, so the Triton kernel computes the
i-th tile as `first + i` and reads no list, and the tile size is free of the gate's: it defaults
to 128 keys (`UNGATED_BLOCK_K`), which streams K faster than 64 on Hopper-class GPUs.

A program walks its tiles in one of three ways (`walk`): in float32 with five reductions across
the tile per tile ("reduce", the default with θ), with q·Kᵀ and P·V on tensor cores ("mma", the
default for dense decoding, where it comes closest to cuDNN), or with the softmax state kept per
key slot ("lanes", never the fastest). None of them changes how fast K streams.

Split-K (flash-decoding): the list of one (sequence, head) is cut into `num_splits` equal shares,
one program each, so a long cache or a small batch still fills the GPU; the partial results
(unnormalised output, survivor max m, denominator l, survivor count, the largest score and its
slot) are combined (`decode_combine.py`; jax.numpy on TPU), where the calibrated SDC and VMC are
applied too (they need only per-row scalars and v̄).

The accumulator holds survivors only, so a split whose tiles hold none never reads V. A row where
nothing survives anywhere keeps its single largest element (DESIGN.md): each program tracks the
largest score and its slot from the K it read anyway, and the combine gathers that one V row.

A few new queries per sequence (Tq > 1) are folded into the batch: query r of Tq sees
`lengths - (Tq - 1 - r)` keys, and its program reads K/V of its own sequence (so K/V are read
Tq times; decoding uses Tq = 1).

Grouped-query attention: the cache may hold Hkv = H / G heads. The program of query head h reads
KV head h // G through the BlockSpec index map (and the gate scores the tile means of that head),
so the cache is never repeated. Each query head still loads V only for its own survivors; the V
rows a whole KV group needs (the union over its query heads) are measured by
`condensa.sparsity.metrics.v_rows_fraction(..., n_kv_head=Hkv)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton  # masked loads (they also run in interpret mode)

from condensa.kernels.tiling import tile_budgets as budgets_per_tile_count
from condensa.errors import ConfigError
from condensa.kernels.backend import TPU_BACKENDS, resolve_backend
from condensa.kernels.decode_combine import combine_splits
from condensa.kernels.tiling import cap_at_budget
from condensa.kernels.tiling.selectors import DECODE_SELECTORS, cap_optional, decode_tile_scores

UNGATED_BLOCK_K = 128  # see default_block_k; timings in docs/benchmarks.md
WALKS = ("reduce", "lanes", "mma")  # see toptheta_decode's `walk`
ROW_MODES = ("rows", "rows_branch")  # skip_v modes that read only the surviving V rows (Triton, interpret)
SKIP_V_MODES = (*ROW_MODES, "blocks")  # every skip_v but "auto"
AUTO_SKIP_V = "rows"  # what skip_v="auto" picks on Triton and in interpret mode (see the module docstring)
AUTO_WALK = "reduce"  # what walk="auto" picks with θ and skip_v="rows" (Triton, interpret); TPU always reduces
DENSE_WALK, DENSE_BLOCK_K = "mma", 64  # walk="auto" and block_k=None without θ (a dense layer): see default_block_k
_STAT_WIDTH = 8  # per program: survivor max m, denominator l, survivors, V blocks, best score, its slot, -, -


class DecodeStats(NamedTuple):
    """Block counts summed over (sequence, query, head); int32 scalars.

    visible: key blocks holding at least one visible key (what dense decoding reads);
    k_loaded: K blocks the kernel read (the gate's list); v_loaded: V blocks it read from (listed
    blocks holding a surviving element); v_rows: V rows it read (with `skip_v="rows"` only the
    surviving rows, else whole blocks). A row where nothing survives reads one more V row in the
    combine, not counted.
    """

    visible: jax.Array
    k_loaded: jax.Array
    v_loaded: jax.Array
    v_rows: jax.Array


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Everything static about one kernel launch (hashable: it keys the compilation cache)."""

    scale: float
    block_k: int = 64
    num_splits: int = 1
    queries_per_seq: int = 1
    has_theta: bool = True
    backend: str = "interpret"
    num_warps: int = 4
    num_stages: int = 2
    skip_v: str = "blocks"
    poison_output: bool = False
    contiguous: bool = False  # no gate: program tiles are a range, computed, not read from a list
    fused_combine: bool = True  # Triton/interpret: the split-K combine as one kernel (False: jax.numpy, as on TPU)
    walk: str = "reduce"  # how a program walks its tiles: "reduce", "lanes" or "mma" (see toptheta_decode)
    heads_first: bool = False  # grid (heads, rows, splits): the heads of one key range are launched side by side


# ---- the kernel -------------------------------------------------------------------------------


def _tile_columns(tile, start, length, *, block_k):
    """(cols [bk], visible [bk]): a tile's cache slots and which of them the row sees."""
    cols = tile * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    return cols, (cols >= start) & (cols < length)


def _tile_scores(k_ref, tile, q, start, length, *, scale, block_k):
    """(cols [bk], visible [bk], a [bk]) of one tile: its cache slots, which of them the row sees,
    and their scaled scores (-inf where not visible)."""
    k = k_ref[pl.ds(tile * block_k, block_k), :].astype(jnp.float32)  # [bk, D]
    cols, visible = _tile_columns(tile, start, length, block_k=block_k)
    return cols, visible, jnp.where(visible, jnp.sum(k * q[None, :], axis=1) * scale, -jnp.inf)


def _surviving_v_rows(v_ref, tile, keep, *, block_k):
    """The tile's V rows [bk, D] in the cache's dtype, read only where `keep` (a masked load: rows
    without a survivor are not read and come back 0, with no branch, so the compiler can pipeline
    the loop)."""
    rows = jnp.broadcast_to(keep[:, None], (block_k, v_ref.shape[-1]))
    return pltriton.load(v_ref.at[pl.ds(tile * block_k, block_k), :], mask=rows, other=0)


def _largest_and_first_slot(values, slots):
    """(largest value, the smallest slot holding it): the element a row keeps when nothing survives,
    the first one on a tie. Used per tile by the float32 walk and to merge lanes in the others."""
    top = jnp.max(values)
    return top, jnp.min(jnp.where(values == top, slots, jnp.int32(2**30)))


def _lane_best(a, cols, best, best_col):
    """Per-lane running largest score and its column (strictly greater: a lane keeps its first)."""
    return jnp.maximum(best, a), jnp.where(a > best, cols, best_col)


def _walk_by_lane(lo, hi, tile_of, k_ref, v_ref, q, theta, start, length, *, scale, block_k):
    """The `skip_v="rows"` walk with no reduction across a tile's key slots (lanes) but one.

    Each lane keeps its own running survivor max, denominator and output row ([block_k, D]), so a
    tile costs elementwise work and one reduction (whether it holds a survivor, for the V block
    count) instead of five (max, slot, denominator, survivors, P·V). The lanes are merged once, at
    the end, the way the split-K combine merges splits. Returns the loop's usual
    (acc, m, l, kept, v_loads, best, best_slot)."""
    d = q.shape[0]
    neg = jnp.float32(-jnp.inf)

    def visit(i, carry):
        acc, m, l, kept, v_loads, best, best_col = carry
        tile = tile_of(i)
        cols, visible, a = _tile_scores(k_ref, tile, q, start, length, scale=scale, block_k=block_k)
        best, best_col = _lane_best(a, cols, best, best_col)
        keep = (a > theta) & visible
        m_new = jnp.where(keep, jnp.maximum(m, a), m)
        alpha = jnp.where(m_new > m, jnp.exp(m - m_new), 1.0)
        p = jnp.where(keep, jnp.exp(a - m_new), 0.0)
        v = _surviving_v_rows(v_ref, tile, keep, block_k=block_k).astype(jnp.float32)
        return (alpha[:, None] * acc + p[:, None] * v, m_new, alpha * l + p, kept + keep.astype(jnp.float32),
                v_loads + jnp.max(keep.astype(jnp.int32)), best, best_col)

    lanes = jnp.full((block_k,), neg)
    init = (jnp.zeros((block_k, d), jnp.float32), lanes, jnp.zeros((block_k,), jnp.float32),
            jnp.zeros((block_k,), jnp.float32), jnp.int32(0), lanes, jnp.zeros((block_k,), jnp.int32))
    acc, m, l, kept, v_loads, best, best_col = jax.lax.fori_loop(lo, hi, visit, init)
    m_all = jnp.max(m)
    w = jnp.where(m > neg, jnp.exp(m - m_all), 0.0)
    best_all, slot = _largest_and_first_slot(best, best_col)
    return (jnp.sum(w[:, None] * acc, axis=0), m_all, jnp.sum(w * l), jnp.sum(kept), v_loads, best_all, slot)


_MMA_ROWS = 16  # the smallest M of a Triton dot: the query is row 0 of a 16-row operand, the rest zero


def _walk_by_mma(lo, hi, tile_of, k_ref, v_ref, q_raw, theta, start, length, *, scale, block_k, has_theta):
    """The `skip_v="rows"` walk (or the dense one, without θ) with both products on tensor cores.

    The usual walk multiplies in float32 and reduces across the tile five times per tile (scores,
    max, slot, denominator, P·V), which keeps it from streaming K as fast as a dense decode kernel
    streams K and V. Here q·Kᵀ and P·V are dots of a 16-row operand whose row 0 is the query (or
    p) and whose other rows are zero, with float32 accumulation; P is rounded to the cache's dtype
    for its dot, as flash attention does. The denominator, survivor count and largest element stay
    per lane ([bk]) and are reduced once, at the end, so a tile costs one reduction across lanes
    (the survivor max the softmax needs). Returns the loop's usual
    (acc, m, l, kept, v_loads, best, best_slot)."""
    d = q_raw.shape[0]
    dtype = k_ref.dtype
    first_row = jax.lax.broadcasted_iota(jnp.int32, (_MMA_ROWS, 1), 0) == 0
    q16 = jnp.where(first_row, q_raw[None, :], 0).astype(dtype)  # [16, D]
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None  # no TF32 on float32 caches
    neg = jnp.float32(-jnp.inf)

    def visit(i, carry):
        acc, m, l, kept, v_loads, best, best_col = carry
        tile = tile_of(i)
        k = k_ref[pl.ds(tile * block_k, block_k), :]  # [bk, D], the cache's dtype
        s16 = jax.lax.dot_general(q16, k, (((1,), (1,)), ((), ())), precision=precision,
                                  preferred_element_type=jnp.float32)  # [16, bk]: row 0 holds q·Kᵀ
        cols, visible = _tile_columns(tile, start, length, block_k=block_k)
        a = jnp.where(visible, jnp.sum(s16, axis=0) * scale, neg)
        best, best_col = _lane_best(a, cols, best, best_col)
        keep = (a > theta) & visible if has_theta else visible
        top = jnp.max(jnp.where(keep, a, neg))  # the one reduction across lanes per tile
        m_new = jnp.maximum(m, top)
        alpha = jnp.where(m_new > m, jnp.exp(m - m_new), 1.0)
        p = jnp.where(keep, jnp.exp(a - m_new), 0.0)
        v = _surviving_v_rows(v_ref, tile, keep, block_k=block_k)
        p16 = jnp.where(first_row, p[None, :], 0.0).astype(v.dtype)  # [16, bk]
        pv = jax.lax.dot_general(p16, v, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)  # [16, D]: row 0 holds p·V
        return (alpha * acc + pv, m_new, alpha * l + p, kept + keep.astype(jnp.float32),
                v_loads + (top > neg).astype(jnp.int32), best, best_col)

    lanes = jnp.full((block_k,), neg)
    zeros = jnp.zeros((block_k,), jnp.float32)
    init = (jnp.zeros((_MMA_ROWS, d), jnp.float32), neg, zeros, zeros, jnp.int32(0), lanes,
            jnp.zeros((block_k,), jnp.int32))
    acc, m, l, kept, v_loads, best, best_col = jax.lax.fori_loop(lo, hi, visit, init)
    best_all, slot = _largest_and_first_slot(best, best_col)
    return jnp.sum(acc, axis=0), m, jnp.sum(l), jnp.sum(kept), v_loads, best_all, slot


def _decode_kernel(meta_ref, *refs, scale, block_k, num_splits, has_theta, skip_v, contiguous, walk):
    """One (sequence-query, head, split): online softmax over the survivors in this split's tiles.

    Without a gate (`contiguous`) the i-th tile is `first + i`, computed, so no K load waits on a
    load from the tile list (the compiler can keep several K tiles in flight)."""
    tiles_ref = None if contiguous else refs[0]
    theta_ref, q_ref, k_ref, v_ref = refs[int(not contiguous):][:4]
    acc_ref, stat_ref = refs[-2:]  # before them, optional NaN buffers aliased to the outputs: never read
    count, length, start = meta_ref[0], meta_ref[1], meta_ref[2]
    first = jax.lax.div(start, block_k)
    split = pl.program_id(2)
    share = jax.lax.div(count + (num_splits - 1), num_splits)
    lo = split * share
    hi = jnp.minimum(lo + share, count)
    q_raw = q_ref[...]  # [D]
    q = q_raw.astype(jnp.float32)
    theta = theta_ref[0]

    def tile_of(i):
        return first + i if contiguous else tiles_ref[i]

    def visit(i, carry):
        acc, m, l, kept, v_loads, best, best_slot = carry
        tile = tile_of(i)
        cols, visible, a = _tile_scores(k_ref, tile, q, start, length, scale=scale, block_k=block_k)
        a_max, slot = _largest_and_first_slot(a, cols)  # for a row where nothing survives
        best_slot = jnp.where(a_max > best, slot, best_slot)
        best = jnp.maximum(best, a_max)

        def accumulate_rows():
            keep = (a > theta) & visible
            found = a_max > theta
            m_new = jnp.where(found, jnp.maximum(m, a_max), m)
            alpha = jnp.where(m_new > m, jnp.exp(m - m_new), 1.0)
            p = jnp.where(keep, jnp.exp(a - m_new), 0.0)
            v = _surviving_v_rows(v_ref, tile, keep, block_k=block_k).astype(jnp.float32)
            pv = jnp.sum(p[:, None] * v, axis=0)
            return (alpha * acc + pv, m_new, alpha * l + jnp.sum(p), kept + jnp.sum(keep.astype(jnp.float32)),
                    v_loads + found.astype(jnp.int32), best, best_slot)

        def accumulate():
            keep = (a > theta) & visible if has_theta else visible
            m_new = jnp.maximum(m, a_max)  # a tile with a survivor holds a_max > θ, so m stays a survivor
            alpha = jnp.exp(m - m_new)
            p = jnp.where(keep, jnp.exp(a - m_new), 0.0)
            v = v_ref[pl.ds(tile * block_k, block_k), :].astype(jnp.float32)
            pv = jnp.sum(p[:, None] * v, axis=0)  # [D]
            kept_new = kept + jnp.sum(keep.astype(jnp.float32))
            return alpha * acc + pv, m_new, alpha * l + jnp.sum(p), kept_new, v_loads + 1, best, best_slot

        if not has_theta:
            return accumulate()
        if skip_v == "rows":  # every tile: masked loads of the surviving rows, no branch
            return accumulate_rows()
        # "blocks" and "rows_branch": a tile without a survivor skips all V work; one with a survivor
        # reads its whole V block, or only the surviving rows
        return jax.lax.cond(a_max > theta, accumulate_rows if skip_v == "rows_branch" else accumulate,
                            lambda: (acc, m, l, kept, v_loads, best, best_slot))

    zero = jnp.float32(0.0)
    neg = jnp.float32(-jnp.inf)
    init = (jnp.zeros(q.shape, jnp.float32), neg, zero, zero, jnp.int32(0), neg, jnp.int32(0))
    if walk == "lanes":
        acc, m, l, kept, v_loads, best, best_slot = _walk_by_lane(
            lo, hi, tile_of, k_ref, v_ref, q, theta, start, length, scale=scale, block_k=block_k)
    elif walk == "mma":
        acc, m, l, kept, v_loads, best, best_slot = _walk_by_mma(
            lo, hi, tile_of, k_ref, v_ref, q_raw, theta, start, length, scale=scale, block_k=block_k,
            has_theta=has_theta)
    else:
        acc, m, l, kept, v_loads, best, best_slot = jax.lax.fori_loop(lo, hi, visit, init)
    acc_ref[...] = acc
    idx = jax.lax.broadcasted_iota(jnp.int32, (_STAT_WIDTH,), 0)
    values = (m, l, kept, v_loads.astype(jnp.float32), best, best_slot.astype(jnp.float32))
    out = jnp.zeros((_STAT_WIDTH,), jnp.float32)
    for n, value in enumerate(values):
        out = jnp.where(idx == n, value, out)
    stat_ref[...] = out


def _launch(meta, tiles, theta_row, q, k, v, opts: DecodeOptions):
    """q [Bv, H, D] (Bv = B * Tq), k/v [B, S, Hkv, D] -> partial acc [Bv, H, ns_p, D], stats [Bv, H, ns_p, 8]
    (ns_p: num_splits rounded up to a power of two; only the first num_splits rows are written).
    `tiles` [Bv, H, W] is the list to visit, or None with `opts.contiguous` (every visible tile)."""
    bv, h, d = q.shape
    s = k.shape[1]
    ns, tq = opts.num_splits, opts.queries_per_seq
    groups = h // k.shape[2]  # GQA: query head hi reads KV head hi // groups
    # The grid is (rows, heads, splits), or (heads, rows, splits) with heads_first: the Triton lowering
    # launches axis 0 fastest, so then the heads of one (row, split) run in neighbouring programs.
    ids = (lambda f: lambda hi, b, j: f(b, hi, j)) if opts.heads_first else (lambda f: f)  # noqa: E731
    per_head = lambda last: pl.BlockSpec((None, None, last), ids(lambda b, hi, j: (b, hi, 0)))  # noqa: E731
    cache_spec = pl.BlockSpec((None, s, None, d), ids(lambda b, hi, j: (b // tq, 0, hi // groups, 0)))
    listed = [] if opts.contiguous else [tiles]
    ns_p = 1 << (ns - 1).bit_length()  # the combine kernel reads the partials as a power-of-two block
    in_specs = [per_head(4), *(per_head(t.shape[-1]) for t in listed), per_head(2), per_head(d), cache_spec, cache_spec]
    out_specs = [pl.BlockSpec((None, None, None, d), ids(lambda b, hi, j: (b, hi, j, 0))),
                 pl.BlockSpec((None, None, None, _STAT_WIDTH), ids(lambda b, hi, j: (b, hi, j, 0)))]
    out_shape = [jax.ShapeDtypeStruct((bv, h, ns_p, d), jnp.float32),
                 jax.ShapeDtypeStruct((bv, h, ns_p, _STAT_WIDTH), jnp.float32)]
    kernel = functools.partial(_decode_kernel, scale=opts.scale, block_k=opts.block_k, num_splits=ns,
                               has_theta=opts.has_theta, skip_v=opts.skip_v, contiguous=opts.contiguous,
                               walk=opts.walk)
    inputs = [meta, *listed, theta_row, q, k, v]
    aliases = {}
    if opts.poison_output:  # partials a program fails to write stay NaN, so checks see them
        for i, shape in enumerate(out_shape):
            inputs.append(jnp.full(shape.shape, jnp.nan, shape.dtype))
            in_specs.append(out_specs[i])
            aliases[len(inputs) - 1] = i
    kwargs = {}
    if opts.backend == "triton":
        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=opts.num_warps,
                                                           num_stages=opts.num_stages)
    return pl.pallas_call(
        kernel, grid=(h, bv, ns) if opts.heads_first else (bv, h, ns), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases, interpret=opts.backend == "interpret", name="toptheta_decode", **kwargs,
    )(*inputs)


# ---- the gate pre-pass and the list of tiles to visit ------------------------------------------


@functools.lru_cache(maxsize=64)
def tile_budgets(n_tiles: int, tile_budget: float | None) -> np.ndarray | None:
    """m = max(1, ceil(f * t_count)) for t_count = 1..n_tiles (`condensa.attention.tiles.tile_budgets`,
    the reference gate's budgets), or None without a budget. Passed to the jitted wrapper as
    data, so a new budget does not recompile; cached, so a decode step does not rebuild it. A NumPy
    array, not a jax one: created inside a jit trace, a jax array would be that trace's tracer, and
    the cache would hand it to later traces (an UnexpectedTracerError)."""
    if tile_budget is None:
        return None
    return budgets_per_tile_count(n_tiles, tile_budget)


def kept_tiles(q, k_tile_mean, lengths, starts, *, n_tiles, scale, block_k, tile_theta_decode, sink_tiles,
               budgets, queries_per_seq, tile_cap=False, selector="gate", shared_heads=False):
    """bool [Bv, H, nk]: the key tiles each (sequence-query, head) visits.

    Geometry is in cache slots, as in the reference gate: the tile holding the last key (index
    `t_count - 1`) and the first `sink_tiles` tiles are mandatory, every other tile before the last
    is kept when `scale * q · k̄_t > Θ_dec[h, t_count - 1]`. With `tile_budget` f, a row with no
    more optional tiles than `budgets[t_count - 1]` (see `tile_budgets`) keeps them all, and with
    `tile_cap` no row keeps more than that many (`cap_at_budget`). Tiles holding no visible
    key (all before `starts`, or past the cache length) are never visited.

    A budgeted `selector` (`DECODE_SELECTORS`) keeps the `budgets[t_count - 1]` optional tiles it
    scores highest instead (`decode_tile_scores`, `cap_optional`), per head or, with
    `shared_heads`, H times as many over the row's (head, tile) pairs; it reads no Θ_dec.
    """
    nk = n_tiles
    t = jnp.arange(nk)[None, None, :]
    last = ((lengths - 1) // block_k)[:, None, None]  # [Bv, 1, 1]
    first = (starts // block_k)[:, None, None]
    in_cache = (t >= first) & (t <= last)
    if tile_theta_decode is None and selector == "gate":
        return jnp.broadcast_to(in_cache, (q.shape[0], q.shape[1], nk))
    k_bar = jnp.repeat(k_tile_mean.astype(jnp.float32), queries_per_seq, axis=0)  # [Bv, nk, Hkv, D]
    mandatory = (t == last) | (t < jnp.minimum(sink_tiles, last))
    optional = (t < last) & (t >= sink_tiles)
    if selector != "gate":
        slots = t[..., None] * block_k + jnp.arange(block_k)  # [1, 1, nk, block_k]
        seen = (slots >= starts[:, None, None, None]) & (slots < lengths[:, None, None, None])
        counts = jnp.sum(seen, axis=-1, dtype=jnp.int32)  # [Bv, 1, nk]: keys of each tile the row sees
        scores = decode_tile_scores(q[:, None], k_bar, counts, scale=scale, selector=selector)  # [Bv, H, 1, nk]
        budget = jnp.asarray(budgets)[last[:, 0]]  # [Bv, 1]
        chosen = cap_optional((optional & (counts > 0))[:, None], scores, budget, shared_heads=shared_heads)
        return in_cache & (mandatory | chosen[:, :, 0])
    bv, h, d = q.shape
    hkv = k_bar.shape[2]  # GQA: query head h is scored against the tile means of KV head h // G
    grouped = q.astype(jnp.float32).reshape(bv, hkv, h // hkv, d)
    scores = jnp.einsum("bjgd,btjd->bjgt", grouped, k_bar).reshape(bv, h, k_bar.shape[1]) * jnp.float32(scale)
    row = jnp.minimum(last[:, :, 0], tile_theta_decode.shape[-1] - 1)  # [Bv, 1]
    gate_theta = jnp.take(jnp.asarray(tile_theta_decode, jnp.float32), row[:, 0], axis=1).T  # [Bv, H]
    chosen = scores > gate_theta[:, :, None]
    if budgets is not None:
        budget = jnp.asarray(budgets)[last]
        if tile_cap:
            chosen = cap_at_budget(chosen & optional, scores, budget[..., 0])
        chosen = chosen | (jnp.sum(optional, axis=-1, keepdims=True) <= budget)
    return in_cache & (mandatory | (optional & chosen))


def compact(keep):
    """int32 [..., W]: the indices of the True entries of `keep` [..., nk], ascending, then padding.

    A cumulative sum gives each kept tile its slot; dropped tiles go to a spare column that is cut
    off. W is a power of two (Triton block shapes must be) of at least nk.
    """
    *lead, nk = keep.shape
    slot = jnp.cumsum(keep, axis=-1, dtype=jnp.int32) - 1
    dest = jnp.where(keep, slot, nk)
    idx = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), keep.shape)
    table = jnp.put_along_axis(jnp.zeros((*lead, nk + 1), jnp.int32), dest, idx, axis=-1, inplace=False)
    return jnp.pad(table[..., :nk], [(0, 0)] * len(lead) + [(0, _list_width(nk) - nk)])


def contiguous_tiles(lengths, starts, *, heads: int, n_tiles: int, block_k: int):
    """(tiles int32 [Bv, H, W], count int32 [Bv, H]) without a gate: every row visits its visible
    tiles in order, so its list is a range, built elementwise. The same list as
    `compact(kept_tiles(...))`, without the cumulative sum and scatter, which would otherwise run in
    every decode step. Entries past `count` are never read."""
    first, last = starts // block_k, (lengths - 1) // block_k  # [Bv]
    tiles = jnp.minimum(first[:, None] + jnp.arange(_list_width(n_tiles), dtype=jnp.int32)[None, :], n_tiles - 1)
    count = (last - first + 1).astype(jnp.int32)
    bv = lengths.shape[0]
    return (jnp.broadcast_to(tiles[:, None, :], (bv, heads, tiles.shape[-1])),
            jnp.broadcast_to(count[:, None], (bv, heads)))


def _list_width(n_tiles: int) -> int:
    """Columns of a tile list: a power of two (Triton block shapes must be) of at least n_tiles."""
    return max(2, 1 << (n_tiles - 1).bit_length())


def row_inputs(count, lengths, starts, theta_row, sdc=None):
    """The per-(sequence-query, head) inputs of the decode and combine kernels: meta int32
    [Bv, H, 4] (tiles listed, cache length, first valid slot, -) and theta_pair float32 [Bv, H, 2]
    (θ, calibrated Δ̄ or 0), from count [Bv, H], lengths / starts [Bv], θ and Δ̄ [Bv, H]."""
    meta = jnp.stack([count, jnp.broadcast_to(lengths[:, None], count.shape),
                      jnp.broadcast_to(starts[:, None], count.shape), jnp.zeros_like(count)], axis=-1)
    theta_pair = jnp.stack([theta_row, jnp.zeros_like(theta_row) if sdc is None else sdc], axis=-1)
    return meta, theta_pair


def _lookup(table, n):
    """`table[h, n - 1]` for lengths n [Bv] -> float32 [Bv, H]; lengths past the table take its end."""
    idx = jnp.clip(n - 1, 0, table.shape[-1] - 1)
    return jnp.take(jnp.asarray(table, jnp.float32), idx, axis=1).T


# ---- the wrapper --------------------------------------------------------------------------------


def _combine(acc, stats, v, seq_of_row, n_visible, sdc, v_mean, vmc):
    """Merges the split partials (flash-decoding) and applies the calibrated SDC and VMC, in
    jax.numpy: the TPU kernel's combine (the Triton kernel's is `decode_combine.combine_splits`).

    A row with no survivor in any split keeps its single largest element: its V row is gathered
    here, one row per (sequence, head), instead of being carried through the kernel.
    """
    m, l, kept = stats[..., 0], stats[..., 1], stats[..., 2]  # [Bv, H, ns]
    best, best_slot = stats[..., 4], stats[..., 5]
    m_all = jnp.max(m, axis=-1, keepdims=True)
    found = m_all[..., 0] > -jnp.inf  # [Bv, H]: some element survived
    w = jnp.where(m > -jnp.inf, jnp.exp(m - jnp.where(found[..., None], m_all, 0.0)), 0.0)
    acc = jnp.sum(w[..., None] * acc, axis=2)  # [Bv, H, D]
    l = jnp.sum(w * l, axis=-1)
    kept = jnp.sum(kept, axis=-1)
    slot = jnp.take_along_axis(best_slot, jnp.argmax(best, axis=-1)[..., None], axis=-1)[..., 0].astype(jnp.int32)
    n_head = acc.shape[1]
    heads = (jnp.arange(n_head) // (n_head // v.shape[2]))[None, :]  # GQA: the KV head of each query head
    fallback = v[seq_of_row[:, None], slot, heads].astype(jnp.float32)  # [Bv, H, D]
    acc = jnp.where(found[..., None], acc, fallback)
    l = jnp.where(found, l, 1.0)
    kept = jnp.where(found, kept, 1.0)
    denom = l
    if sdc is not None:  # only rows that dropped something get Δ̄
        denom = l + jnp.where(kept < n_visible[:, None], sdc, 0.0)
    out = acc / denom[..., None]
    if vmc:
        groups = n_head // v_mean.shape[1]  # v̄ is per KV head: its query heads share it
        out = out + (1.0 - l / denom)[..., None] * jnp.repeat(v_mean, groups, axis=1)
    return out


@functools.partial(jax.jit, static_argnames=("opts", "vmc", "sink_tiles", "sdc_gamma", "tile_cap", "selector",
                                             "shared_heads"))
def _decode(q, k, v, lengths, starts, theta, sdc_delta, v_mean, k_tile_mean, tile_theta_decode, budgets, *,
            sdc_gamma, opts: DecodeOptions, vmc, sink_tiles, tile_cap=False, selector="gate", shared_heads=False):
    b, tq, h, d = q.shape
    lengths = lengths.astype(jnp.int32)
    starts = jnp.zeros((b,), jnp.int32) if starts is None else starts.astype(jnp.int32)
    s, bk = k.shape[1], opts.block_k
    sp = -(-s // bk) * bk
    if sp != s:  # a copy of the cache: choose the cache size as a multiple of block_k to avoid it
        pad = [(0, 0), (0, sp - s), (0, 0), (0, 0)]
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    # Fold the queries into the batch: query r of Tq sees lengths - (Tq - 1 - r) keys.
    qv = q.reshape(b * tq, h, d)
    lengths_v = (lengths[:, None] - (tq - 1) + jnp.arange(tq)[None, :]).reshape(-1).astype(jnp.int32)
    starts_v = jnp.repeat(starts, tq).astype(jnp.int32)
    n_visible = lengths_v - starts_v

    if tile_theta_decode is None and selector == "gate":
        tiles, count = contiguous_tiles(lengths_v, starts_v, heads=h, n_tiles=sp // bk, block_k=bk)
        if opts.contiguous:
            tiles = None  # the Triton kernel computes its tiles; the TPU kernel still reads the range
    else:
        keep = kept_tiles(qv, k_tile_mean, lengths_v, starts_v, n_tiles=sp // bk, scale=opts.scale, block_k=bk,
                          tile_theta_decode=tile_theta_decode, sink_tiles=sink_tiles, budgets=budgets,
                          queries_per_seq=tq, tile_cap=tile_cap, selector=selector, shared_heads=shared_heads)
        count = jnp.sum(keep, axis=-1, dtype=jnp.int32)  # [Bv, H]
        tiles = compact(keep)
    theta_row = (_lookup(theta, n_visible) if theta is not None
                 else jnp.full((b * tq, h), -jnp.inf, jnp.float32))
    sdc = None if sdc_delta is None else sdc_gamma * _lookup(sdc_delta, n_visible)
    meta, theta_pair = row_inputs(count, lengths_v, starts_v, theta_row, sdc)
    v_mean_v = None if v_mean is None else v_mean.astype(jnp.float32).reshape(b * tq, v_mean.shape[2], d)
    if opts.backend in TPU_BACKENDS:
        from condensa.kernels.toptheta_decode_tpu import launch_decode_tpu  # lazy: Mosaic TPU only; tests patch it

        acc, stats = launch_decode_tpu(meta, tiles, theta_pair, qv, k, v, opts)
    else:
        acc, stats = _launch(meta, tiles, theta_pair, qv, k, v, opts)
        if opts.fused_combine:
            out = combine_splits(meta, theta_pair, acc, stats, v, v_mean_v if vmc else None, num_splits=opts.num_splits,
                                 queries_per_seq=tq, has_sdc=sdc is not None, interpret=opts.backend == "interpret")
        acc, stats = acc[:, :, :opts.num_splits], stats[:, :, :opts.num_splits]
    if opts.backend in TPU_BACKENDS or not opts.fused_combine:
        out = _combine(acc, stats, v, jnp.arange(b * tq) // tq, n_visible.astype(jnp.float32), sdc, v_mean_v, vmc)

    t = jnp.arange(sp // bk)[None, :]
    visible_tiles = jnp.sum((t >= (starts_v // bk)[:, None]) & (t <= ((lengths_v - 1) // bk)[:, None]))
    v_loaded = jnp.sum(stats[..., 3]).astype(jnp.int32)
    rows_mode = opts.has_theta and opts.skip_v in ROW_MODES
    v_rows = jnp.sum(stats[..., 2]).astype(jnp.int32) if rows_mode else v_loaded * bk
    dstats = DecodeStats(visible=(visible_tiles * h).astype(jnp.int32), k_loaded=jnp.sum(count),
                         v_loaded=v_loaded, v_rows=v_rows)
    return out.reshape(b, tq, h, d).astype(v.dtype), dstats


def default_block_k(gated: bool, dense: bool = False) -> int:
    """Keys per tile when the caller names none. With a gate the tile is the gate's (the cache
    state's k̄ has one mean per tile; 64 by default). Without one it is free: Top-θ reads K alone
    and a larger tile keeps more of it in flight per loop step (UNGATED_BLOCK_K); dense decoding
    (no θ) walks with tensor cores, fastest at DENSE_BLOCK_K (docs/benchmarks.md, "Dense mode")."""
    if gated:
        return 64
    return DENSE_BLOCK_K if dense else UNGATED_BLOCK_K


def default_num_splits(programs: int, max_tiles: int, target_programs: int = 512) -> int:
    """Enough splits that about `target_programs` programs run (a few per SM of a large GPU),
    but never more splits than tiles a row may visit."""
    return int(max(1, min(max_tiles, 64, -(-target_programs // max(programs, 1)))))


def toptheta_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    starts: jax.Array | None = None,
    scale: float | None = None,
    theta: jax.Array | None = None,
    sdc_delta: jax.Array | None = None,
    sdc_gamma: float = 1.0,
    vmc: bool = False,
    v_mean: jax.Array | None = None,
    k_tile_mean: jax.Array | None = None,
    tile_theta_decode: jax.Array | None = None,
    sink_tiles: int = 1,
    tile_budget: float | None = None,
    tile_cap: bool = False,
    tile_selector: str = "gate",
    shared_heads: bool = False,
    block_k: int | None = None,
    num_splits: int | None = None,
    backend: str | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    skip_v: str = "auto",
    walk: str = "auto",
    poison_output: bool = False,
) -> tuple[jax.Array, DecodeStats]:
    """Top-θ attention of Tq new queries per sequence against a KV cache: `(out [B, Tq, H, D], stats)`.

    q [B, Tq, H, D]; k, v [B, S, Hkv, D] (D = 64 or 128; float32/bfloat16/float16), Hkv dividing H
    (grouped-query attention: query head h reads KV head h // (H / Hkv)); `lengths` [B]:
    keys in the cache including the new ones (query r of Tq sees slots < lengths - (Tq - 1 - r));
    `starts` [B] (optional): the first valid slot (left padding), default 0. Row length
    n = visible keys. `theta[h, n - 1]`: threshold compared as `scale * q·k > θ` in float32 (None:
    dense; give rows with n <= k the value -inf). `sdc_delta[h, n - 1]`: calibrated SDC, added as
    `sdc_gamma * Δ̄` to the denominator of rows that dropped something. `vmc` adds V-mean
    compensation with `v_mean` [B, Tq, Hkv, D], the mean of each query's visible V rows (kept
    incrementally in the cache state). The gate: `k_tile_mean` [B, ceil(S / block_k), Hkv, D] (the
    mean of each tile's valid keys, from the cache state) with `tile_theta_decode[h, t_count - 1]`;
    None means no gate. `tile_budget` f (optional) keeps all optional tiles of a row that has no
    more than max(1, ceil(f t_count)) of them, as the reference gate does; `tile_cap` keeps at
    most that many, the best of those above Θ_dec. `tile_selector` "window" or "rowmean" (with
    `k_tile_mean` and `tile_budget`, no Θ_dec) keeps the m optional tiles it ranks highest instead,
    as the reference op's decoding selectors do; `shared_heads` gives a row's heads one budget of
    H · m (rowmean).
    `block_k`: cache slots per tile; None: the gate's default of 64, or without a gate
    `UNGATED_BLOCK_K` with θ and `DENSE_BLOCK_K` without (`default_block_k`).
    `num_splits`: split-K shares per (sequence, head); None picks enough to fill a large GPU.
    `skip_v`: "rows" reads only the V rows that hold a survivor (masked loads, no branch, in
    every tile); "rows_branch" does the same behind a branch, so a tile without a survivor does no
    V work at all; "blocks" reads whole V blocks, behind a branch, for the tiles that hold one;
    "auto" (default) is `AUTO_SKIP_V` on Triton and in interpret mode, "blocks" on TPU.
    `walk`: how a program walks its tiles. "reduce" scores and accumulates in float32 with five
    reductions across the tile (every mode and backend); "mma" puts q·Kᵀ and P·V on tensor cores
    and keeps the sums per key slot (`_walk_by_mma`: one reduction per tile); "lanes" keeps the
    softmax state per key slot (`_walk_by_lane`; needs θ). The last two run on Triton and in
    interpret mode, with skip_v="rows" or without θ. "auto" (default): `DENSE_WALK` without θ,
    `AUTO_WALK` with θ and "rows", else "reduce".
    `backend`: None/'auto' (by platform), 'triton', 'interpret', 'mosaic_tpu' or 'tpu_interpret' (the
    TPU kernel of `toptheta_decode_tpu.py`, interpreted on the CPU). `poison_output` fills the
    kernel's partial outputs with NaN before it runs (for correctness checks).
    """
    if (q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]
            or k.shape[2] < 1 or q.shape[2] % k.shape[2]):
        raise ConfigError(f"q must be [B, Tq, H, D] and k, v [B, S, Hkv, D] with the same B and D and Hkv dividing H "
                          f"(grouped-query attention); got q {q.shape}, k {k.shape}, v {v.shape}.")
    b, tq, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    gated = tile_theta_decode is not None or tile_selector != "gate"
    block_k = default_block_k(gated, theta is None) if block_k is None else int(block_k)
    if d not in (64, 128):
        raise ConfigError(f"head_dim {d} is not supported by the decode kernel; it takes 64 or 128.")
    if block_k < 16 or block_k & (block_k - 1):
        raise ConfigError(f"block_k={block_k} must be a power of two >= 16.")
    if tuple(jnp.shape(lengths)) != (b,):
        raise ConfigError(f"lengths must be [B] = ({b},) cache lengths; got shape {tuple(jnp.shape(lengths))}.")
    if starts is not None and tuple(jnp.shape(starts)) != (b,):
        raise ConfigError(f"starts must be [B] = ({b},) first valid slots; got shape {tuple(jnp.shape(starts))}.")
    nk = -(-s // block_k)
    if tile_theta_decode is not None and k_tile_mean is None:
        raise ConfigError("the decode gate needs k_tile_mean [B, S/block_k, H, D] from the KV cache state; "
                          "pass it, or pass tile_theta_decode=None to turn the gate off.")
    if tile_selector != "gate":
        if tile_selector not in DECODE_SELECTORS:
            raise ConfigError(f"tile_selector={tile_selector!r} does not run while decoding; choose 'gate' (with "
                              f"tile_theta_decode) or one of {', '.join(DECODE_SELECTORS)}.")
        if k_tile_mean is None or tile_budget is None or tile_theta_decode is not None:
            raise ConfigError(f"tile_selector={tile_selector!r} keeps a budget of tiles ranked by the cache's tile "
                              "means: pass k_tile_mean and tile_budget, and no tile_theta_decode.")
    if shared_heads and tile_selector != "rowmean":
        raise ConfigError("shared_heads compares tile scores across heads, which only tile_selector='rowmean' gives.")
    if shared_heads and tq > 1:  # the cache's mean of the own tile already holds the later queries' keys
        raise ConfigError("tile_selector='rowmean' with shared_heads ranks one new query per sequence; got "
                          f"Tq = {tq}. Decode one token at a time, or use per-head budgets (shared_heads=False).")
    if k_tile_mean is not None and tuple(k_tile_mean.shape) != (b, nk, hkv, d):
        raise ConfigError(f"k_tile_mean has shape {tuple(k_tile_mean.shape)} but needs {(b, nk, hkv, d)} "
                          f"(one mean key per tile of block_k={block_k} cache slots).")
    if vmc and (v_mean is None or tuple(v_mean.shape) != (b, tq, hkv, d)):
        raise ConfigError(f"vmc=True needs v_mean [B, Tq, Hkv, D] = {(b, tq, hkv, d)} (the mean of the visible V rows); "
                          f"got {None if v_mean is None else tuple(v_mean.shape)}.")
    for name, table in (("theta", theta), ("sdc_delta", sdc_delta), ("tile_theta_decode", tile_theta_decode)):
        if table is not None and (table.ndim != 2 or table.shape[0] != h):
            raise ConfigError(f"{name} must be [heads={h}, N] (indexed by row length - 1); got {tuple(table.shape)}.")
    if sdc_delta is not None and theta is None:
        raise ConfigError("sdc_delta compensates dropped elements, so it needs theta; pass theta or drop sdc_delta.")
    if skip_v not in (*SKIP_V_MODES, "auto"):
        raise ConfigError(f"skip_v={skip_v!r} is not supported; choose one of {', '.join(SKIP_V_MODES)} or 'auto'.")
    resolved = resolve_backend(backend)
    if skip_v == "auto":
        skip_v = "blocks" if resolved in TPU_BACKENDS else AUTO_SKIP_V
    if resolved in TPU_BACKENDS and skip_v in ROW_MODES:
        raise ConfigError(f"skip_v={skip_v!r} (masked V row loads) is a Triton feature; the TPU kernel reads V in "
                          "whole blocks: use skip_v='blocks'.")
    if walk not in (*WALKS, "auto"):
        raise ConfigError(f"walk={walk!r} is not supported; choose 'auto' or one of {', '.join(WALKS)}.")
    # without θ every visible V row is read, so skip_v does not matter to the dense walk
    other_walks_fit = resolved not in TPU_BACKENDS and (theta is None or skip_v == "rows")
    if walk == "auto":
        walk = ("reduce" if not other_walks_fit else DENSE_WALK if theta is None else AUTO_WALK)
    if walk != "reduce" and not other_walks_fit:
        raise ConfigError(f"walk={walk!r} is a way to walk the tiles with skip_v='rows' (Triton or interpret mode); "
                          f"got skip_v={skip_v!r} on backend {resolved!r}. Use walk='reduce'.")
    if walk == "lanes" and theta is None:
        raise ConfigError("walk='lanes' keeps survivors per key slot, so it needs theta; use walk='mma' or 'reduce' "
                          "for dense decoding.")
    if tile_cap and (tile_theta_decode is None or tile_budget is None):
        raise ConfigError("tile_cap caps the decode gate at its budget: it needs tile_theta_decode and tile_budget.")
    splits = num_splits or default_num_splits(b * tq * h, nk)
    if splits < 1:
        raise ConfigError(f"num_splits must be >= 1; got {num_splits}.")
    opts = DecodeOptions(
        scale=float(1.0 / math.sqrt(d) if scale is None else scale), block_k=block_k, num_splits=int(splits),
        queries_per_seq=tq, has_theta=theta is not None, backend=resolved,
        num_warps=num_warps, num_stages=num_stages, skip_v=skip_v, poison_output=bool(poison_output), walk=walk,
        contiguous=not gated and resolved not in TPU_BACKENDS)
    budgets = tile_budgets(nk, None if not gated or tile_budget is None else float(tile_budget))
    return _decode(q, k, v, jnp.asarray(lengths), None if starts is None else jnp.asarray(starts), theta, sdc_delta,
                   v_mean if vmc else None, k_tile_mean, tile_theta_decode, budgets, sdc_gamma=float(sdc_gamma),
                   opts=opts, vmc=bool(vmc), sink_tiles=int(sink_tiles), tile_cap=bool(tile_cap),
                   selector=tile_selector, shared_heads=bool(shared_heads))

"""Per-row tile masses of causal softmax attention, fused, with their gradient: what the
concentration losses need, without writing [B, H, T, T] probabilities.

`row_tile_masses(q, k)` returns R [B, H, T, n_tiles], R[i, t] = Σ_{j in key tile t, j <= i} p_ij,
where p is the causal softmax of `scale · q kᵀ`. With `top_k`, only each row's k largest scores
count (the kept set of the top-k loss), so Σ_t R[i, t] is the row's top-k mass. From R:
- the tile loss's tile masses M_bt are R averaged over the rows of query tile b;
- the top-k loss's mass is Σ_t R[i, t].

Why a kernel: the reference losses take the probabilities from the model, which forces the
reference attention op (float32 [B, H, T, T] written and read many times, forward and backward;
its cost is in docs/benchmarks.md). Here the model's attention stays on the fused cuDNN path and
the loss recomputes the scores block by block: one program holds BQ whole rows (so the row's
softmax and its k-th largest score need no second pass), and nothing bigger than R leaves it.

The k-th largest score is found by bisection between the row's smallest visible score and its
maximum. It stops as soon as every row of the block has a lower bound that keeps exactly k scores
(the kept set is then exact), or after `bisect_steps` (24) steps: the kept set is then the exact
top k plus any score within (max − min) · 2⁻²⁴ below the k-th (near-ties in fp32). The saved
threshold sits midway between the smallest kept and the largest dropped score. Rows with at most
k visible keys keep them all (the loss leaves those rows out). Nothing but the scores stays alive
through the search (the causal mask is folded into them as -inf; the visible count is the row
index + 1).

Gradient (with w_ij = 1 for kept elements, G = ∂L/∂R, c_i = Σ_t G[i, t] R[i, t]):
  ∂L/∂a_ij = p_ij (w_ij G[i, t(j)] − c_i),  dq = scale · (∂L/∂a) k,  dk = scale · (∂L/∂a)ᵀ q.
As in the reference loss, the kept set itself carries no gradient.

The threshold kernel holds whole rows in registers, so with a top-k cut the padded length is
limited (`MAX_LENGTH`); without one, each program keeps [tile, n_tiles] sums in registers, so the
tile count is (`MAX_TILES`). Longer sequences use the reference path (`fits`). Triton block
shapes are powers of two, so the length is padded to `tile` times a power of two; the padding is
masked by causality (a padded key is visible only to padded rows, which are cut off).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from condensa.errors import ConfigError
from condensa.kernels.backend import TPU_BACKENDS, resolve_backend

MAX_LENGTH = 2048  # with a top-k cut: padded length up to which whole rows fit a program's registers
MAX_TILES = 64  # without: key tiles per row whose running sums fit a program's registers
BISECT_STEPS = 24
THRESHOLD_GROUP = 256  # rows per causal group of the threshold kernel, and keys per staged chunk


@dataclasses.dataclass(frozen=True)
class MassOptions:
    """Everything static about one call (hashable: it keys the compilation cache)."""

    scale: float
    tile: int = 64
    top_k: int | None = None
    bisect_steps: int = BISECT_STEPS
    block_q: int = 16  # rows per program in the whole-row threshold kernel (top-k only)
    block_q_dk: int = 64  # query rows per step of the dk kernel's walk
    num_warps: int = 4
    num_stages: int = 3  # Triton pipelining depth; deeper pipelines speed the key/query walks (docs/benchmarks.md)
    rows: int | None = None  # real (unpadded) rows; padded rows past them need no threshold. None: all real
    backend: str = "interpret"


def padded_length(t: int, tile: int) -> int:
    """`tile` times the next power of two of ceil(t / tile) (Triton blocks are powers of two)."""
    tiles = -(-t // tile)
    return tile * (1 << max(0, (tiles - 1).bit_length()))


def fits(t: int, tile: int, top_k: int | None = None) -> bool:
    """Whether sequences of length t run in this kernel (else the reference loss path is used)."""
    tp = padded_length(t, tile)
    return tp <= MAX_LENGTH if top_k is not None else tp // tile <= MAX_TILES


def limit_text(tile: int, top_k: int | None = None) -> str:
    """The length limit of `fits`, in words."""
    return (f"{MAX_LENGTH} positions with a top-k cut" if top_k is not None
            else f"{MAX_TILES} tiles of {tile} ({MAX_TILES * tile} positions)")


def _dot(a, b, contract, precision):
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _row_scores(q, k_ref, row0, chunks: int, chunk: int, scale, precision):
    """Scaled scores of a block of rows against keys [0, chunks · chunk), as a list of [BQ, chunk]
    pieces (each piece's keys are loaded and staged for the product on their own), -inf where not
    causally visible."""
    pieces = []
    for c in range(chunks):
        s = _dot(q, k_ref[pl.ds(c * chunk, chunk), :], ((1,), (1,)), precision) * scale
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        cols = c * chunk + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        pieces.append(jnp.where(cols <= rows, s, -jnp.inf))
    return pieces


def _row_reduce(pieces, reduce, combine):
    """`reduce` over axis 1 of each piece, then `combine` across pieces: a reduction of whole rows."""
    out = reduce(pieces[0], axis=1)
    for piece in pieces[1:]:
        out = combine(out, reduce(piece, axis=1))
    return out


def _kth_threshold(pieces, n_visible, needs, top_k: int, steps: int):
    """A threshold between each row's kept and dropped scores (-inf for rows with at most k
    visible keys): every score >= it is kept. The row's scores are `pieces` (see `_row_scores`),
    -inf at the keys the row cannot see; `needs` marks the rows that want a threshold (real rows with
    more than k visible keys).

    Bisection keeps count(s >= lo) >= k, moves `hi` down to any midpoint that keeps fewer than k,
    and stops once every row that needs a threshold has count(s >= lo) == k exactly, or after
    `steps`. The counts are float32 sums of 1.0/0.0 (exact below 2^24; faster than int32 sums,
    docs/benchmarks.md). The threshold returned is the midpoint between the smallest score kept and
    the largest one dropped, so the backward kernels, which recompute the scores in other block
    shapes (and may round them an ulp differently), draw the same line.
    """
    hi = _row_reduce(pieces, jnp.max, jnp.maximum)
    lo = _row_reduce([jnp.where(s == -jnp.inf, jnp.inf, s) for s in pieces], jnp.min, jnp.minimum)
    one, zero = jnp.float32(1), jnp.float32(0)  # float32 even under JAX_ENABLE_X64 (the loop carry's type)

    def count(v):
        return _row_reduce([jnp.where(s >= v[:, None], one, zero) for s in pieces], jnp.sum, jnp.add)

    def unresolved(state):
        i, _, _, kept = state
        return (i < steps) & (jnp.sum(jnp.where(needs & (kept != top_k), one, zero)) > 0)

    def bisect(state):
        i, lo, hi, kept = state
        mid = 0.5 * (lo + hi)
        at_mid = count(mid)
        enough = at_mid >= top_k
        return i + 1, jnp.where(enough, mid, lo), jnp.where(enough, hi, mid), jnp.where(enough, at_mid, kept)

    init = (jnp.int32(0), lo, hi, n_visible.astype(jnp.float32))
    _, lo, _, _ = jax.lax.while_loop(unresolved, bisect, init)
    smallest_kept = _row_reduce([jnp.where(s >= lo[:, None], s, jnp.inf) for s in pieces], jnp.min, jnp.minimum)
    largest_dropped = _row_reduce([jnp.where(s >= lo[:, None], -jnp.inf, s) for s in pieces], jnp.max, jnp.maximum)
    thr = jnp.where(largest_dropped == -jnp.inf, smallest_kept, 0.5 * (smallest_kept + largest_dropped))
    return jnp.where(needs, thr, -jnp.inf)


def _threshold_kernel(q_ref, k_ref, thr_ref, *, opts: MassOptions, first_row: int, chunks: int, chunk: int,
                      precision):
    """With a top-k cut: BQ whole rows per program (keys up to the end of their row group), only
    to find each row's threshold."""
    row0 = first_row + pl.program_id(0) * opts.block_q
    pieces = _row_scores(q_ref[...], k_ref, row0, chunks, chunk, opts.scale, precision)
    row = row0 + jax.lax.broadcasted_iota(jnp.int32, (opts.block_q,), 0)
    n_visible = row + 1  # keys 0..row
    # A padded row (zero q: all its scores tie at 0) would never keep exactly k and hold its block's
    # bisection to the step limit; it is cut off from R anyway.
    needs = n_visible > opts.top_k
    if opts.rows is not None:
        needs = needs & (row < opts.rows)
    thr_ref[...] = _kth_threshold(pieces, n_visible, needs, opts.top_k, opts.bisect_steps)


def _forward_stream_kernel(*refs, opts: MassOptions, n_tiles: int, precision):
    """One query tile per program, one pass over the key tiles up to the diagonal. Each tile's
    (kept) row sums are kept relative to the running max at that tile and rescaled to the final
    softmax at the end, so the scores are computed once. With a top-k cut the thresholds come in
    from `_threshold_kernel`; the softmax's denominator still runs over every visible key."""
    if opts.top_k is not None:
        q_ref, k_ref, thr_ref, r_ref, lse_ref = refs
        thr = thr_ref[...][:, None]
    else:
        q_ref, k_ref, r_ref, lse_ref = refs
        thr = None
    tile = opts.tile
    qb = pl.program_id(0)
    q = q_ref[...]
    which = jax.lax.broadcasted_iota(jnp.int32, (tile, n_tiles), 1)
    rows = qb * tile + jax.lax.broadcasted_iota(jnp.int32, (tile, tile), 0)

    def step(t, carry):
        m, l, sums, maxes = carry
        s = _dot(q, k_ref[pl.ds(t * tile, tile), :], ((1,), (1,)), precision) * opts.scale
        cols = t * tile + jax.lax.broadcasted_iota(jnp.int32, (tile, tile), 1)
        s = jnp.where(cols <= rows, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        e = jnp.exp(s - m_new[:, None])
        l = l * jnp.exp(m - m_new) + jnp.sum(e, axis=1)
        tile_sum = jnp.sum(e if thr is None else jnp.where(s >= thr, e, 0.0), axis=1)
        here = which == t
        return m_new, l, jnp.where(here, tile_sum[:, None], sums), jnp.where(here, m_new[:, None], maxes)

    init = (jnp.full((tile,), -jnp.inf, jnp.float32), jnp.zeros((tile,), jnp.float32),
            jnp.zeros((tile, n_tiles), jnp.float32), jnp.full((tile, n_tiles), -jnp.inf, jnp.float32))
    m, l, sums, maxes = jax.lax.fori_loop(0, qb + 1, step, init)
    r_ref[...] = sums * jnp.exp(maxes - m[:, None]) / l[:, None]
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, lse_ref, thr_ref, c_ref, g_ref, dq_ref, *, opts: MassOptions, n_tiles: int, precision):
    """One query tile per program, walking the key tiles up to the diagonal."""
    tile = opts.tile
    qb = pl.program_id(0)
    q = q_ref[...]
    lse, thr, c, g = lse_ref[...][:, None], thr_ref[...][:, None], c_ref[...][:, None], g_ref[...]
    which = jax.lax.broadcasted_iota(jnp.int32, (tile, n_tiles), 1)
    rows = qb * tile + jax.lax.broadcasted_iota(jnp.int32, (tile, tile), 0)

    def step(t, acc):
        k = k_ref[pl.ds(t * tile, tile), :]
        s = _dot(q, k, ((1,), (1,)), precision) * opts.scale
        cols = t * tile + jax.lax.broadcasted_iota(jnp.int32, (tile, tile), 1)
        visible = cols <= rows
        p = jnp.where(visible, jnp.exp(s - lse), 0.0)
        g_t = jnp.sum(jnp.where(which == t, g, 0.0), axis=1)[:, None]
        ds = p * (jnp.where(s >= thr, g_t, 0.0) - c)
        return acc + _dot(ds.astype(k.dtype), k, ((1,), (0,)), precision)

    acc = jax.lax.fori_loop(0, qb + 1, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (acc * opts.scale).astype(dq_ref.dtype)


def _dk_kernel(q_ref, k_ref, lse_ref, thr_ref, c_ref, g_ref, dk_ref, *, opts: MassOptions, length: int, precision):
    kb = pl.program_id(0)
    bq, tile = opts.block_q_dk, opts.tile
    k = k_ref[...]
    cols = kb * tile + jax.lax.broadcasted_iota(jnp.int32, (bq, tile), 1)

    def step(j, acc):
        rows_at = pl.ds(j * bq, bq)
        q = q_ref[rows_at, :]
        s = _dot(q, k, ((1,), (1,)), precision) * opts.scale
        rows = j * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, tile), 0)
        visible = cols <= rows
        p = jnp.where(visible, jnp.exp(s - lse_ref[rows_at][:, None]), 0.0)
        kept = visible & (s >= thr_ref[rows_at][:, None])
        ds = p * (jnp.where(kept, g_ref[rows_at][:, None], 0.0) - c_ref[rows_at][:, None])
        return acc + _dot(ds.astype(q.dtype), q, ((0,), (0,)), precision)

    first = (kb * tile) // bq  # query blocks above the diagonal see none of this tile's keys
    acc = jax.lax.fori_loop(first, length // bq, step, jnp.zeros(k.shape, jnp.float32))
    dk_ref[...] = (acc * opts.scale).astype(dk_ref.dtype)


def _call(kernel, grid, in_specs, out_specs, out_shape, opts: MassOptions, name: str):
    kwargs = {}
    if opts.backend == "triton":
        from jax.experimental.pallas import triton as pltriton

        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=opts.num_warps, num_stages=opts.num_stages)
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=opts.backend == "interpret", name=name, **kwargs)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _specs(tp: int, d: int, block: int, n_tiles: int = 1):
    """BlockSpecs over a (row block, batch, head) grid: the block's rows of q, every row of k,
    one value per row, and the block's rows of R [B, H, Tp, n_tiles]."""
    rows = pl.BlockSpec((None, block, None, d), lambda i, b, h: (b, i, h, 0))
    whole = pl.BlockSpec((None, tp, None, d), lambda i, b, h: (b, 0, h, 0))
    per_row = pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))
    tiles = pl.BlockSpec((None, None, block, n_tiles), lambda i, b, h: (b, h, i, 0))
    return rows, whole, per_row, tiles


def threshold_group(tp: int) -> int:
    """Rows per causal group of the threshold kernel at padded length tp: THRESHOLD_GROUP, or the
    largest divisor of tp that divides it too (tp = tile · 2^n with a tile that may not be a power
    of two)."""
    return math.gcd(THRESHOLD_GROUP, tp)


def _thresholds(q, k, opts: MassOptions):
    """Each row's top-k threshold [B, H, Tp], in causal row groups of G rows (`threshold_group`):
    rows [r, r + G) score keys [0, r + G) only. With n groups, 1/n of the non-causal work of whole
    rows is left (a quarter at T = 1024). The keys are loaded in chunks of G, since r + G is not a
    power of two (Triton's block shapes must be)."""
    b, tp, h, d = q.shape
    bq, group = opts.block_q, threshold_group(tp)
    precision = _precision(q.dtype)
    keys = pl.BlockSpec((None, tp, None, d), lambda i, b_, h_: (b_, 0, h_, 0))
    out = pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i))
    parts = []
    for start in range(0, tp, group):
        first = start // bq
        rows = pl.BlockSpec((None, bq, None, d), lambda i, b_, h_, first=first: (b_, first + i, h_, 0))
        kernel = functools.partial(_threshold_kernel, opts=opts, first_row=start, chunks=start // group + 1,
                                   chunk=group, precision=precision)
        parts.append(_call(kernel, (group // bq, b, h), [rows, keys], out,
                           jax.ShapeDtypeStruct((b, h, group), jnp.float32), opts,
                           "attention_masses_threshold")(q, k))
    return jnp.concatenate(parts, axis=-1)


def _forward(q, k, opts: MassOptions):
    """(R, lse, thr) on padded inputs q, k [B, Tp, H, D]. With a top-k cut, a first kernel finds
    each row's threshold from whole rows (the k-th largest score needs the row); the masses are
    then summed one query tile per program over the causal key tiles only."""
    b, tp, h, d = q.shape
    n_tiles = tp // opts.tile
    precision = _precision(q.dtype)
    per_row_shape = jax.ShapeDtypeStruct((b, h, tp), jnp.float32)
    rows, whole, per_row, tiles = _specs(tp, d, opts.tile, n_tiles)
    if opts.top_k is not None:
        thr = _thresholds(q, k, opts)
        inputs, in_specs = [q, k, thr], [rows, whole, per_row]
    else:
        thr = jnp.full((b, h, tp), -jnp.inf, jnp.float32)
        inputs, in_specs = [q, k], [rows, whole]
    kernel = functools.partial(_forward_stream_kernel, opts=opts, n_tiles=n_tiles, precision=precision)
    r, lse = _call(kernel, (n_tiles, b, h), in_specs, [tiles, per_row],
                   [jax.ShapeDtypeStruct((b, h, tp, n_tiles), jnp.float32), per_row_shape],
                   opts, "attention_masses_fwd")(*inputs)
    return r, lse, thr


def _backward(q, k, lse, thr, c, g, opts: MassOptions):
    b, tp, h, d = q.shape
    n_tiles = tp // opts.tile
    precision = _precision(q.dtype)
    rows, whole, per_row, tiles = _specs(tp, d, opts.tile, n_tiles)
    dq = _call(functools.partial(_dq_kernel, opts=opts, n_tiles=n_tiles, precision=precision),
               (n_tiles, b, h), [rows, whole, per_row, per_row, per_row, tiles], rows,
               jax.ShapeDtypeStruct(q.shape, q.dtype), opts, "attention_masses_dq")(q, k, lse, thr, c, g)
    key_tile = pl.BlockSpec((None, opts.tile, None, d), lambda i, b_, h_: (b_, i, h_, 0))
    all_rows = pl.BlockSpec((None, None, tp), lambda i, b_, h_: (b_, h_, 0))
    column = pl.BlockSpec((None, None, None, tp), lambda i, b_, h_: (b_, h_, i, 0))
    g_t = jnp.swapaxes(g, -1, -2)  # [B, H, n_tiles, Tp]: key tile t's column of G is one contiguous row
    dk = _call(functools.partial(_dk_kernel, opts=opts, length=tp, precision=precision),
               (n_tiles, b, h), [whole, key_tile, all_rows, all_rows, all_rows, column], key_tile,
               jax.ShapeDtypeStruct(k.shape, k.dtype), opts, "attention_masses_dk")(q, k, lse, thr, c, g_t)
    return dq, dk


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _masses(q, k, opts: MassOptions):
    return _forward(q, k, opts)[0]


def _masses_fwd(q, k, opts):
    r, lse, thr = _forward(q, k, opts)
    return r, (q, k, r, lse, thr)


def _masses_bwd(opts, residuals, g):
    q, k, r, lse, thr = residuals
    c = jnp.sum(g * r, axis=-1)
    return _backward(q, k, lse, thr, c, g, opts)


_masses.defvjp(_masses_fwd, _masses_bwd)


def row_tile_masses(q: jax.Array, k: jax.Array, *, scale: float, tile: int = 64, top_k: int | None = None,
                    backend: str | None = None, block_q: int = 16, block_q_dk: int = 64,
                    num_warps: int = 4, num_stages: int = 3, bisect_steps: int = BISECT_STEPS) -> jax.Array:
    """R [B, H, T, ceil(T / tile)] float32 (see the module docstring), differentiable in q and k.

    q, k: [B, T, H, D] (k already repeated to q's heads under GQA), any float dtype; the scores are
    accumulated in float32. `top_k`: count only each row's k largest scores.
    """
    b, t, h, d = q.shape
    if k.shape != q.shape:
        raise ConfigError(f"row_tile_masses needs k shaped like q {tuple(q.shape)}; got {tuple(k.shape)}.")
    tp = padded_length(t, tile)
    if not fits(t, tile, top_k):
        raise ConfigError(f"sequence length {t} pads to {tp}, past the fused loss kernel's {limit_text(tile, top_k)}; "
                          "use the reference loss path (loss.kernel reference).")
    resolved = resolve_backend(backend)
    if resolved in TPU_BACKENDS:
        raise ConfigError("the fused loss kernel has no TPU version; train with the reference loss path "
                          "(loss.kernel reference, which loss.kernel auto picks on a TPU).")
    block_q, block_q_dk = min(block_q, threshold_group(tp)), min(block_q_dk, tp)
    opts = MassOptions(scale=float(scale), tile=tile, top_k=top_k, block_q=block_q, block_q_dk=block_q_dk,
                       num_warps=num_warps, num_stages=num_stages, bisect_steps=bisect_steps, rows=t,
                       backend=resolved)
    pad = [(0, 0), (0, tp - t), (0, 0), (0, 0)]
    r = _masses(jnp.pad(q, pad), jnp.pad(k, pad), opts)
    return r[:, :, :t, : -(-t // tile)]

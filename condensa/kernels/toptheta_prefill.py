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
dense settings of the tile sweep (docs/benchmarks.md).

Rows where nothing survives keep their single largest element. The kernel does this with one
accumulator: while a row's running max m is <= θ, the row holds no survivor, so the accumulator
holds only the elements equal to m (reset whenever m rises); the first time m exceeds θ the
accumulator is reset and from then on holds survivors only.

Two variants, each behind a static flag so the default kernel traces as before. Exact SDC
(`sdc_exact`) keeps a second running sum `l_all` over every visible score beside the kept sum and
divides by `l + γ (l_all - l)`: the dropped mass exactly, no renormalisation. It needs no gate,
since behind one the dropped mass includes tiles the kernel never reads. Post-softmax placement
(`placement="post"`, θ a probability) compares each element with its share of the whole
softmax, which only the finished row max and sum give: a first walk over the visited tiles finds
them from the scores alone, and a second walk recomputes the scores and keeps
`s - m > log2 θ + log2 l_all`, dividing by `l_all`. That second Q·Kᵀ is the variant's cost.

Scores are kept in log2 units (`a * log2 e`, θ likewise; `log2 θ` for post placement) so the
exponentials are `exp2`, as in JAX's own Pallas flash attention.
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
from condensa.kernels.tiling.selectors import SELECTORS

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
    sdc_exact: bool = False
    placement: str = "pre"
    vmc: bool = False
    backend: str = "interpret"
    num_warps: int | None = None
    num_stages: int = 3
    heavy_first: bool = True
    skip_empty: bool = False
    poison_output: bool = False


# ---- the kernel -------------------------------------------------------------------------------


class _Refs(NamedTuple):
    """The kernel's refs by name; an optional input is None when its static flag is off."""

    q: object
    k: object
    v: object
    table: object
    theta: object
    sdc: object
    v_prefix: object
    o: object
    empty: object


def _unpack_refs(refs, *, gated, has_theta, has_sdc, vmc) -> _Refs:
    q_ref, k_ref, v_ref, *rest = refs
    table_ref = rest.pop(0) if gated else None
    theta_ref = rest.pop(0) if has_theta else None
    sdc_ref = rest.pop(0) if has_sdc else None
    v_prefix_ref = rest.pop(0) if vmc else None  # Σ of V rows before this query tile, float32
    if len(rest) == 3:  # a poisoned output buffer aliased to the output comes first; never read
        rest.pop(0)
    o_ref, empty_ref = rest
    return _Refs(q_ref, k_ref, v_ref, table_ref, theta_ref, sdc_ref, v_prefix_ref, o_ref, empty_ref)


class _State(NamedTuple):
    """One query tile's online softmax state, carried across its key tiles (float32 rows).

    `l` sums the kept elements only; `l_all` (exact SDC only, else None, which carries nothing)
    sums every visible element, so that its ratio to `l` is the row's kept probability mass.
    """

    acc: jax.Array
    m: jax.Array
    l: jax.Array
    kept: jax.Array
    n_empty: jax.Array
    l_all: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class _Program:
    """What every pass of one program (one query tile, batch, head) reads: its refs, its rows and
    how to reach its key tiles. The methods only trace; each pass decides what to keep."""

    refs: _Refs
    q: jax.Array
    q_tile: jax.Array
    rows: jax.Array
    theta: jax.Array | None
    ratio: int
    block_q: int
    block_k: int
    scale_log2: float
    precision: object

    def scores(self, t):
        """One key tile's scores in log2 units, [block_q, block_k]."""
        k = self.refs.k[pl.ds(t * self.block_k, self.block_k), :]
        s = jax.lax.dot_general(self.q, k, (((1,), (1,)), ((), ())), precision=self.precision,
                                preferred_element_type=jnp.float32)
        return s * self.scale_log2

    def weighted_values(self, p, t):
        """p · V over one key tile, float32 [block_q, head_dim]."""
        v = self.refs.v[pl.ds(t * self.block_k, self.block_k), :]
        return jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=self.precision,
                                   preferred_element_type=jnp.float32)

    def off_diagonal_loop(self, body, carry):
        """`body(t, carry)` over the off-diagonal tiles to visit: the gate's compacted list, or
        every causal tile."""
        table_ref = self.refs.table
        if table_ref is not None:
            return jax.lax.fori_loop(0, table_ref[0], lambda i, c: body(table_ref[i + 1], c), carry)
        return jax.lax.fori_loop(0, self.q_tile * self.ratio, body, carry)

    def diagonal_tiles(self):
        """(t, visible) for the diagonal tiles, the only ones that need the causal mask."""
        for r in range(self.ratio):
            t = self.q_tile * self.ratio + r
            cols = t * self.block_k + jax.lax.broadcasted_iota(jnp.int32, (self.block_q, self.block_k), 1)
            yield t, self.rows >= cols

    def with_own_rows(self, v_sum, t, visible):
        """v̄'s sum plus this query tile's own visible V rows of tile t, as one small masked matmul."""
        return v_sum + self.weighted_values(visible, t)

    def n_visible(self):
        return (self.q_tile * self.block_q + 1
                + jax.lax.broadcasted_iota(jnp.int32, (self.block_q,), 0)).astype(jnp.float32)


def _prefill_kernel(*refs, scale_log2, block_q, block_k, n_q_tiles, gated, has_theta, has_sdc,
                    vmc, heavy_first, skip_empty, precision, exact_sdc=False, post=False, sdc_gamma=1.0):
    r = _unpack_refs(refs, gated=gated, has_theta=has_theta, has_sdc=has_sdc, vmc=vmc)
    pid = pl.program_id(0)
    q_tile = n_q_tiles - 1 - pid if heavy_first else pid
    q = r.q[...]
    theta = r.theta[...] if has_theta else None  # [block_q]: log2 units; log2 θ for post
    rows = q_tile * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    prog = _Program(r, q, q_tile, rows, theta, block_q // block_k, block_q, block_k, scale_log2, precision)
    if post:
        acc, l, denom, n_empty, v_sum = _post_passes(prog, vmc=vmc, skip_empty=skip_empty)
        n_visible = prog.n_visible()
    else:
        state, v_sum = _one_pass(prog, has_sdc=has_sdc, exact_sdc=exact_sdc, vmc=vmc, skip_empty=skip_empty)
        acc, _, l, kept, n_empty, l_all = state
        denom = l
        n_visible = prog.n_visible()
        if has_sdc:  # only rows that dropped something (kept fewer than their i + 1 keys) get Δ̄
            denom = l + jnp.where(kept < n_visible, r.sdc[...], 0.0)
        if exact_sdc:  # the dropped mass l_all - l, exactly, weighted by γ
            denom = l_all if sdc_gamma == 1.0 else l + jnp.float32(sdc_gamma) * (l_all - l)
    out = acc / denom[:, None]
    if vmc:
        out = out + ((1.0 - l / denom) / n_visible)[:, None] * v_sum
    r.o[...] = out.astype(r.o.dtype)
    r.empty[...] = jnp.full((block_q,), n_empty, jnp.int32)


def _one_pass(prog: _Program, *, has_sdc, exact_sdc, vmc, skip_empty):
    """Pre-softmax Top-θ (or dense) in one online-softmax walk; returns the final `_State` and v̄'s sum.

    Scores `s <= θ` are dropped; a row without survivors keeps the elements equal to its running
    max (see the module docstring). Exact SDC also sums every visible element into `l_all`,
    which follows the running max but never resets.
    """
    theta = prog.theta
    has_theta = theta is not None

    def accumulate(s, t, st: _State, visible, row_max):
        acc, m, l, kept, n_empty, l_all = st
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
            e = jnp.exp2(s - m_new[:, None])  # masked scores underflow to exactly 0
            p = jnp.where(keep, e, 0.0)
            if has_sdc:
                kept = jnp.where(reset, 0.0, kept) + jnp.sum(keep.astype(jnp.float32), axis=-1)
            if exact_sdc:
                l_all = jnp.exp2(m - m_new) * l_all + jnp.sum(e, axis=-1)
        else:
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new[:, None])  # masked scores underflow to exactly 0
            if has_sdc:
                kept = kept + (jnp.sum(visible.astype(jnp.float32), axis=-1) if visible is not None else prog.block_k)
        pv = prog.weighted_values(p, t)
        return _State(alpha[:, None] * acc + pv, m_new, alpha * l + jnp.sum(p, axis=-1), kept, n_empty, l_all)

    def off_diagonal(t, st: _State):
        s = prog.scores(t)
        row_max = jnp.max(s, axis=-1)
        if not has_theta:
            return accumulate(s, t, st, None, row_max)
        # A row needs this tile if it gains a survivor or (with no survivor yet) a new maximum.
        needed = jnp.max(jnp.maximum(row_max - theta, row_max - st.m)) > 0
        if skip_empty:
            return jax.lax.cond(needed, lambda: accumulate(s, t, st, None, row_max),
                                lambda: _empty_tile(s, st, exact_sdc))
        # Computing an empty tile changes nothing (α = 1, no element kept); it is still counted.
        new = accumulate(s, t, st, None, row_max)
        return new._replace(n_empty=new.n_empty + 1 - needed.astype(jnp.int32))

    zeros = jnp.zeros((prog.block_q,), jnp.float32)
    st = _State(jnp.zeros((prog.block_q, prog.q.shape[-1]), jnp.float32),
                jnp.full((prog.block_q,), -jnp.inf, jnp.float32), zeros, zeros, jnp.int32(0),
                zeros if exact_sdc else None)
    st = prog.off_diagonal_loop(off_diagonal, st)
    v_sum = prog.refs.v_prefix[...] if vmc else None
    for t, visible in prog.diagonal_tiles():  # always visited, causally masked
        s = jnp.where(visible, prog.scores(t), MASK_VALUE)
        st = accumulate(s, t, st, visible, jnp.max(s, axis=-1))
        if vmc:  # the rest of v̄'s sum: this query tile's own visible V rows
            v_sum = prog.with_own_rows(v_sum, t, visible)
    return st, v_sum


def _empty_tile(s, st: _State, exact_sdc):
    """A skipped tile: nothing kept and no new maximum, so only the count moves, and (exact SDC)
    the full sum still takes the tile's mass, which belongs to the dropped part of the row."""
    l_all = st.l_all + jnp.sum(jnp.exp2(s - st.m[:, None]), axis=-1) if exact_sdc else None
    return st._replace(n_empty=st.n_empty + 1, l_all=l_all)


def _row_max_and_sum(prog: _Program):
    """Post placement's first walk, scores only: each row's max m over the tiles it visits and the
    full sum l_all of exp2(s - m), the softmax denominator that post-softmax θ is compared against."""

    def update(s, carry):
        m, l_all = carry
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        return m_new, jnp.exp2(m - m_new) * l_all + jnp.sum(jnp.exp2(s - m_new[:, None]), axis=-1)

    carry = (jnp.full((prog.block_q,), -jnp.inf, jnp.float32), jnp.zeros((prog.block_q,), jnp.float32))
    carry = prog.off_diagonal_loop(lambda t, c: update(prog.scores(t), c), carry)
    for t, visible in prog.diagonal_tiles():
        carry = update(jnp.where(visible, prog.scores(t), MASK_VALUE), carry)
    return carry


def _post_passes(prog: _Program, *, vmc, skip_empty):
    """Post-softmax Top-θ: p = exp2(s - m) / l_all is kept where p > θ, i.e. where s - m > log2 θ +
    log2 l_all, which needs the finished m and l_all, hence a second walk over the same tiles
    (a second Q·Kᵀ). With m final nothing is rescaled. A row where nothing passes (θ · l_all >= 1)
    keeps the elements equal to its max. Returns (acc, kept sum, l_all, empty tiles, v̄'s sum)."""
    m, l_all = _row_max_and_sum(prog)
    log_cut = prog.theta + jnp.log2(l_all)  # -inf (θ <= 0, dense rows) keeps every visible key
    cut = jnp.where(log_cut >= 0, jax.lax.nextafter(m, jnp.full_like(m, -jnp.inf)), m + log_cut)

    def gather(s, t, carry, visible):
        acc, l, n_empty = carry
        keep = s > cut[:, None]
        if visible is not None:
            keep = keep & visible
        p = jnp.where(keep, jnp.exp2(s - m[:, None]), 0.0)
        return acc + prog.weighted_values(p, t), l + jnp.sum(p, axis=-1), n_empty

    def off_diagonal(t, carry):
        s = prog.scores(t)
        needed = jnp.max(jnp.max(s, axis=-1) - cut) > 0  # some row keeps an element of this tile
        if skip_empty:
            return jax.lax.cond(needed, lambda: gather(s, t, carry, None),
                                lambda: (*carry[:2], carry[2] + 1))
        acc, l, n_empty = gather(s, t, carry, None)
        return acc, l, n_empty + 1 - needed.astype(jnp.int32)

    carry = (jnp.zeros((prog.block_q, prog.q.shape[-1]), jnp.float32), jnp.zeros((prog.block_q,), jnp.float32),
             jnp.int32(0))
    carry = prog.off_diagonal_loop(off_diagonal, carry)
    v_sum = prog.refs.v_prefix[...] if vmc else None
    for t, visible in prog.diagonal_tiles():
        carry = gather(jnp.where(visible, prog.scores(t), MASK_VALUE), t, carry, visible)
        if vmc:
            v_sum = prog.with_own_rows(v_sum, t, visible)
    acc, l, n_empty = carry
    return acc, l, l_all, n_empty, v_sum


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
        precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None, **_variant_flags(theta2, opts))
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


def _variant_flags(theta2, opts: KernelOptions) -> dict:
    """The kernel's static flags for the variants beyond calibrated pre-softmax Top-θ, passed only
    when on, so the default kernels trace as before. Without θ every rule is dense."""
    flags = {}
    if theta2 is not None and opts.placement == "post":
        flags["post"] = True
    if theta2 is not None and opts.sdc_exact:
        flags.update(exact_sdc=True, sdc_gamma=opts.sdc_gamma)
    return flags


def _row_thresholds(theta, opts: KernelOptions):
    """θ per row in the form the kernel compares: `θ · log2 e` against pre-softmax scores, or
    `log2 θ` (-inf where θ <= 0: every key passes) against post-softmax log2 probabilities."""
    theta = theta.astype(jnp.float32)
    if opts.placement == "post":
        return jnp.where(theta > 0, jnp.log2(jnp.where(theta > 0, theta, 1.0)), -jnp.inf)
    return theta * LOG2E


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
    theta2 = None if theta is None else pad_seq(_row_thresholds(theta, opts), 1, -jnp.inf)
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
        from condensa.kernels.toptheta_prefill_tpu import launch_tpu  # lazy: Mosaic TPU only; tests patch it

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
            sdc_exact=opts.sdc_exact, placement=opts.placement, vmc=opts.vmc, tile_theta=tile_theta,
            sink_tiles=opts.sink_tiles, tile_budget=opts.tile_budget, tile_cap=opts.tile_cap, block_q=opts.block_q,
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
    sdc_exact: bool = False,
    placement: str = "pre",
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
    `sdc_exact`: exact SDC instead, `sdc_gamma` times the exact mass of the visible dropped keys
    (with γ = 1 the denominator is the whole row's softmax sum); it needs no gate, since the
    kernel never visits the gated-out keys whose mass it would need. `placement="post"`:
    post-softmax Top-θ, where `theta[h, i]` is a probability: `p = softmax(a)` over the keys
    the gate allows (the whole causal row without one), keep `p > θ`, no renormalisation (a
    second Q·Kᵀ walk over the visited tiles, see the module docstring); it takes no SDC.
    `tile_theta[h, b]`: the gate threshold of query tile b (tiles of `block_q` queries and
    `block_k` keys); None means no gate. `tile_budget` f (optional): query tiles with at most
    m_b = max(1, ceil(f (b + 1))) optional tiles keep them all, as the reference gate does;
    `tile_cap` (needs `tile_budget`) keeps at most the m_b best of the tiles above Θ.
    `tile_selector` other than "gate" ranks the tiles with a budgeted selector of
    `condensa.kernels.tiling.selectors` (any but "oracle") and keeps exactly
    the m_b best (it needs `tile_budget`, and no `tile_theta`); `sub_block` is its key summary's
    granularity (`condensa.kernels.tiling.selectors.estimated_tile_mass`), and `shared_heads` lets the
    heads of a query tile share one budget (`keep_top_tiles`). Rows
    that must stay dense (n <= k) take θ = -inf. `vmc` adds V-mean compensation. `backend`: None/'auto'
    (by platform), 'triton', 'interpret', 'mosaic_tpu' or 'tpu_interpret' (the TPU kernel,
    `toptheta_prefill_tpu.py`, interpreted on the CPU). `poison_output` fills the output with NaN before the
    kernel runs (for correctness checks). `skip_empty=True` makes a visited tile with nothing
    above θ skip its exp, V load and P·V behind a `lax.cond`; the output is the same, and empty
    tiles are counted either way. It is off by default: the branch (whose V load the compiler
    cannot pipeline) cost more than it saved (docs/kernels.md, "Empty tiles").
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
    backend = resolve_backend(backend)
    _check_variant(placement=placement, sdc_exact=sdc_exact, calibrated_sdc=sdc_delta is not None,
                   gated=tile_theta is not None or tile_selector != "gate", backend=backend)
    opts = KernelOptions(
        scale=float(1.0 / math.sqrt(d) if scale is None else scale), block_q=block_q, block_k=block_k,
        sink_tiles=sink_tiles, tile_budget=None if tile_budget is None else float(tile_budget), tile_cap=bool(tile_cap),
        tile_selector=str(tile_selector), sub_block=None if sub_block is None else int(sub_block),
        shared_heads=bool(shared_heads),
        sdc_gamma=float(sdc_gamma), sdc_exact=bool(sdc_exact), placement=str(placement), vmc=bool(vmc),
        backend=backend,
        num_warps=num_warps, num_stages=num_stages, heavy_first=heavy_first, skip_empty=skip_empty,
        poison_output=poison_output)
    return _jitted_prefill(q, k, v, theta, sdc_delta, tile_theta, opts)


def _check_variant(*, placement, sdc_exact, calibrated_sdc, gated, backend) -> None:
    """Refuses the rule combinations the kernel cannot compute exactly."""
    if placement not in ("pre", "post"):
        raise ConfigError(f"placement must be 'pre' or 'post'; got {placement!r}.")
    if placement == "post" and (sdc_exact or calibrated_sdc):
        raise ConfigError("post-softmax Top-θ takes no SDC (it never renormalises); drop sdc_delta / sdc_exact.")
    if sdc_exact and calibrated_sdc:
        raise ConfigError("sdc_exact and a calibrated sdc_delta are two SDC modes; pass one.")
    if sdc_exact and gated:
        raise ConfigError("exact SDC needs the mass of every dropped key, and the kernel never reads the tiles "
                          "the gate drops; run it without tile_theta / tile_selector (or use the reference op).")
    if (placement == "post" or sdc_exact) and backend in TPU_BACKENDS:
        raise ConfigError(f"the TPU prefill kernel runs pre-softmax Top-θ with calibrated SDC only; "
                          f"placement={placement!r}, sdc_exact={sdc_exact} need backend 'triton' or 'interpret'.")


@functools.partial(jax.jit, static_argnums=(6,))
def _jitted_prefill(q, k, v, theta, sdc_delta, tile_theta, opts):
    return _prefill(q, k, v, theta, sdc_delta, tile_theta, opts)

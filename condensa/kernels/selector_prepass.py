"""The budgeted tile selectors' pre-pass in Pallas: scores, the budget cut and the compacted
visit lists, in two launches (or one).

The same selection in plain XLA (`prepass_keep` + `compact_tile_lists`) writes a [B, H, T, nk]
score array, reduces it in several passes, sorts every query tile's scores and scatters the lists:
a dozen launches and a round trip through memory for what is a few kilobytes of result. Here:
- `rowmean` scores (`split_heads`, the default) in a launch of their own, one program per
  (query tile, head): each query row's estimated share of its attention in each key tile, a
  softmax of `scale · q_i · k̄_t + log(keys in t)` over the tiles the row has started, averaged
  over the tile's real rows (`condensa.kernels.tiling.selectors.estimated_tile_mass` with whole-tile
  summaries). One program per query tile scoring every head in turn is H times less parallel;
- `window`: recency, the tile index itself, so it needs no scoring launch;
- the cut, one program per query tile (or per query tile and head, `lists_per_head`): the
  (budget + 1)-th largest score among the optional tiles, found exactly by bisection on the bit
  patterns of the (non-negative) float32 scores, with the shared budget of H · m_b over all
  heads or m_b per head; ties at the cut all go, as in `cap_at_budget`;
- the lists: a cumulative sum gives each kept tile its slot, and slot j holds the number of tiles
  whose slot is below j (the first tile to reach j), so no scatter is needed.

The key-tile means (a [B, nk, Hkv, D] array) are one XLA reduction before the launches (the
division folded into its input, so it is one fusion); the tiles' key counts are computed in the
kernels from the length, not passed in (XLA would materialise that constant with a launch of its own).
Blocks of [rows, tiles] stay small (`register_elements`): larger ones spill registers. Tables
equal `compact_tile_lists(prepass_keep(...))` up to scores that tie within float rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from condensa.kernels.tile_gate_prepass import table_width
from condensa.kernels.tiling import tile_budgets

FUSED_SELECTORS = ("rowmean", "window")
# How the pre-pass is laid out on the GPU unless a caller says otherwise (see `fused_prepass_table`);
# chosen by `exp/prepass_speed.py`, whose results docs/real-model.md records.
DEFAULT_LAYOUT = {"split_heads": True, "lists_per_head": False, "scatter_lists": True, "register_elements": 4096,
                  "score_warps": 4, "cut_warps": 2, "radix_bits": 1}


def layout_from_text(text: str) -> dict:
    """'split+lists:2048:cw1:chunked' -> layout options of `fused_prepass_table`: `split` (scores in
    a launch of their own) or `one`, `+lists` for one list-writing program per head, the register
    block size, then any of cwN / swN / rbN (the cut's / the scoring's warps, the cut's bits per
    search round) and `chunked` (lists slot by slot). For tuning scripts, which name layouts on the
    command line."""
    layout, _, rest = text.partition(":")
    size, *options = rest.split(":") if rest else [str(DEFAULT_LAYOUT["register_elements"])]
    if layout not in ("split", "one", "split+lists", "one+lists") or not size.isdigit():
        raise ValueError(f"pre-pass layout {text!r}: expected split|one[+lists]:REGISTER_ELEMENTS[:cwN][:swN][:rbN][:chunked]")
    chosen = {"split_heads": layout.startswith("split"), "lists_per_head": layout.endswith("+lists"),
              "register_elements": int(size), "scatter_lists": "chunked" not in options}
    names = {"cw": "cut_warps", "sw": "score_warps", "rb": "radix_bits"}
    for option in options:
        if option[:2] in names and option[2:].isdigit():
            chosen[names[option[:2]]] = int(option[2:])
        elif option != "chunked":
            raise ValueError(f"pre-pass layout {text!r}: unknown option {option!r} (use cwN, swN, rbN or chunked)")
    return chosen


def fused_prepass_supported(selector: str, sub_block: int | None, block_k: int, backend: str) -> bool:
    """Whether the fused pre-pass computes this selection (else the XLA pre-pass does)."""
    whole_tiles = sub_block is None or int(sub_block) == block_k
    return selector in FUSED_SELECTORS and whole_tiles and backend in ("triton", "interpret")


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(1, n) - 1).bit_length())


def key_tile_means(k: jax.Array, block_k: int, length: int, width: int) -> jax.Array:
    """k [B, Tp, Hkv, D] padded with zeros past `length` -> float32 [B, width, Hkv, D]: the mean of
    each tile's real keys, zero rows past the last tile. Each key is weighted by 1 / its tile's real
    key count before the sum, so the division is part of the reduction's fusion."""
    b, tp, hkv, d = k.shape
    nk = tp // block_k
    count = np.clip(length - np.arange(nk) * block_k, 1, block_k).astype(np.float32)
    weight = np.repeat(1.0 / count, block_k)[None, :, None, None]
    means = (k.astype(jnp.float32) * weight).reshape(b, nk, block_k, hkv, d).sum(axis=2)
    return means if width == nk else jnp.pad(means, [(0, 0), (0, width - nk), (0, 0), (0, 0)])


def _log2_key_counts(first_tile: int, n_tiles: int, block_k: int, length: int) -> jax.Array:
    """float32 [n_tiles]: log2 of the real key count of tiles first_tile.. (0 where a tile has none),
    computed where it is used: passed in as a constant, XLA would spend a launch writing it."""
    tiles = first_tile + jax.lax.broadcasted_iota(jnp.int32, (n_tiles,), 0)
    return jnp.log2(jnp.clip(length - tiles * block_k, 1, block_k).astype(jnp.float32))


def _row_chunk_shares(q_ref, kbar, q_tile, *, scale, block_q, block_k, length, row_chunk, precision, head=None):
    """[n_tiles]: the mean, over the query tile's real rows, of each row's estimated share of its
    attention in each key tile; `row_chunk` rows at a time, so the [rows, tiles] block stays in
    registers."""
    n_tiles = kbar.shape[0]
    first_row = q_tile * block_q
    at = (lambda c: (pl.ds(c * row_chunk, row_chunk), slice(None))) if head is None else \
        (lambda c: (pl.ds(c * row_chunk, row_chunk), head, slice(None)))

    # Base-2 units (exp2 is one instruction, exp a libdevice call), one reciprocal per row instead
    # of a division per entry, and the padding rows' weight folded into that reciprocal.
    log2_count = _log2_key_counts(0, n_tiles, block_k, length)
    scale2 = scale * float(np.log2(np.e))

    def chunk(c, total):
        rows = first_row + c * row_chunk + jax.lax.broadcasted_iota(jnp.int32, (row_chunk, 1), 0)
        cols = jax.lax.broadcasted_iota(jnp.int32, (row_chunk, n_tiles), 1)
        q = q_ref[at(c)].astype(jnp.float32)
        logits = jax.lax.dot_general(q, kbar, (((1,), (1,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32) * scale2 + log2_count[None, :]
        logits = jnp.where(cols <= rows // block_k, logits, -jnp.inf)  # tiles the row has started
        e = jnp.exp2(logits - jnp.max(logits, axis=1, keepdims=True))
        weight = jnp.where(rows < length, 1.0 / jnp.sum(e, axis=1, keepdims=True), 0.0)
        return total + jnp.sum(e * weight, axis=0)

    total = jax.lax.fori_loop(0, block_q // row_chunk, chunk, jnp.zeros((n_tiles,), jnp.float32))
    return total / jnp.minimum(block_q, length - first_row).astype(jnp.float32)


def _share_kernel(q_ref, kbar_ref, shares_ref, **options):
    """Grid (query tile, head, batch row): one head's rowmean scores of one query tile. Query tiles
    in the first half of the sequence have started none of the second half's key tiles, so they
    score the first half only: a quarter of the work, over the grid, that was all masked out."""
    q_tile = pl.program_id(0)
    n_tiles = kbar_ref.shape[0]
    half = n_tiles // 2

    def wide():
        shares_ref[...] = _row_chunk_shares(q_ref, kbar_ref[...], q_tile, **options)

    def narrow():
        shares_ref[pl.ds(0, half)] = _row_chunk_shares(q_ref, kbar_ref[pl.ds(0, half), :], q_tile, **options)
        shares_ref[pl.ds(half, half)] = jnp.zeros((half,), jnp.float32)

    if half < 16:  # Triton blocks are at least 16 wide
        return wide()
    last_started = ((q_tile + 1) * options["block_q"] - 1) // options["block_k"]
    jax.lax.cond(last_started < half, narrow, wide)


def _cut_kernel(*refs, selector, heads, groups, n_tiles, block_q, block_k, length, sink_tiles, shared_heads,
                list_chunk, share_options, lists_per_head, scatter_lists, radix_bits):
    """Grid (query tile, batch row), or (query tile, head, batch row) with `lists_per_head`: every
    head's scores of one query tile (read from the share kernel's output, computed here, or the
    tile index for `window`), the budget cut, and the lists of every head or of the program's own
    (the cut is then repeated by each head's program, which shortens the serial path)."""
    if selector == "window":
        kbar_ref = shares_ref = q_ref = None
        budget_ref, table_ref = refs
    elif share_options is None:
        shares_ref, budget_ref, table_ref = refs
    else:
        q_ref, kbar_ref, budget_ref, table_ref = refs
    q_tile = pl.program_id(0)
    heads_p = _pow2_at_least(heads)
    ratio = block_q // block_k
    tile_ids = jax.lax.broadcasted_iota(jnp.int32, (heads_p, n_tiles), 1)
    head_ids = jax.lax.broadcasted_iota(jnp.int32, (heads_p, n_tiles), 0)

    if selector == "window":
        scores = tile_ids.astype(jnp.float32)
    else:
        scores = jnp.zeros((heads_p, n_tiles), jnp.float32)
        for h in range(heads):
            row = (shares_ref[h, :] if share_options is None else
                   _row_chunk_shares(q_ref, kbar_ref[:, h // groups, :], q_tile, head=h, **share_options))
            scores = jnp.where(head_ids == h, row[None, :], scores)

    off_diagonal = tile_ids < q_tile * ratio
    sinks = off_diagonal & (tile_ids < sink_tiles) & (head_ids < heads)
    optional = off_diagonal & (tile_ids >= sink_tiles) & (head_ids < heads)
    budget = budget_ref[q_tile]
    keep = optional & ~_below_cut(scores, optional, budget * heads if shared_heads else budget, shared_heads,
                                  radix_bits)
    _write_lists(table_ref, keep | sinks, heads=heads, list_chunk=list_chunk,
                 own_head=pl.program_id(1) if lists_per_head else None, scatter=scatter_lists)


def _below_cut(scores, chosen, budget, shared_heads, radix_bits=1):
    """bool: chosen entries at or below the (budget + 1)-th largest chosen score (all False where
    no more than `budget` are chosen). A search on the int32 bit patterns of non-negative float32
    scores (ordered like the floats) finds that score exactly; over the whole array with a shared
    budget, per row otherwise. It stops as soon as exactly budget + 1 patterns lie at or above the
    lower bound (the answer is then their minimum), which with distinct scores takes about as many
    steps as the scores have significant bits between neighbours, not all 32.

    `radix_bits` = r splits the search interval into 2^r parts per round (r = 1: bisection): fewer
    rounds, each counting 2^r - 1 thresholds at once. The cut is a chain of small reductions whose
    latency, not their arithmetic, sets the pre-pass's time when it has few programs."""
    bits = jnp.where(chosen, jax.lax.bitcast_convert_type(scores, jnp.int32), -1)
    need = budget + 1
    parts = 1 << radix_bits

    def count_at_least(v):  # v: scalar or [rows, 1]
        hits = (bits >= v).astype(jnp.int32)
        return jnp.sum(hits) if shared_heads else jnp.sum(hits, axis=1, keepdims=True)

    def counts_at_least(v):  # v: [parts] (shared) or [rows, parts] -> the count at each
        if shared_heads:
            hits = (bits[None, :, :] >= v[:, None, None]).astype(jnp.int32)
            return jnp.sum(jnp.sum(hits, axis=2), axis=1)
        return jnp.sum((bits[:, None, :] >= v[:, :, None]).astype(jnp.int32), axis=2)

    shape = () if shared_heads else (bits.shape[0], 1)
    lo = jnp.zeros(shape, jnp.int32)  # count(bits >= lo) >= need whenever a cut is needed
    hi = jnp.full(shape, 0x7F800001, jnp.int32)  # past +inf: count is 0
    at_lo = count_at_least(lo)
    capped = at_lo >= need

    def searching(lo, hi, at_lo):
        return (at_lo > need) & (hi - lo > 1)

    def bisect(state):
        lo, hi, at_lo = state
        mid = lo + (hi - lo) // 2
        at_mid = count_at_least(mid)
        active = searching(lo, hi, at_lo)
        raise_lo = active & (at_mid >= need)
        return (jnp.where(raise_lo, mid, lo), jnp.where(active & ~raise_lo, mid, hi),
                jnp.where(raise_lo, at_mid, at_lo))

    def split(state):  # thresholds lo + j·step, j = 1..parts; keep the last part whose start holds `need`
        lo, hi, at_lo = state
        step = (hi - lo + parts - 1) // parts
        j = jax.lax.broadcasted_iota(jnp.int32, (parts,) if shared_heads else (bits.shape[0], parts),
                                     0 if shared_heads else 1) + 1  # j = parts reaches hi: a power-of-two block
        starts = jnp.minimum(lo + j * step, hi)  # non-decreasing; count at hi is below `need`
        counts = counts_at_least(starts)  # non-increasing in j
        enough = counts >= need
        axis = 0 if shared_heads else 1
        taken = jnp.sum(enough.astype(jnp.int32), axis=axis, keepdims=not shared_heads)  # how many starts hold it
        new_at_lo = jnp.where(taken > 0, jnp.min(jnp.where(enough, counts, jnp.int32(0x7FFFFFFF)), axis=axis,
                                                 keepdims=not shared_heads), at_lo)
        active = searching(lo, hi, at_lo)
        new_lo = jnp.where(active, lo + taken * step, lo)
        new_hi = jnp.where(active, jnp.minimum(lo + (taken + 1) * step, hi), hi)
        return new_lo, new_hi, jnp.where(active, new_at_lo, at_lo)

    def more(state):  # a scalar for the loop, also with one bound per row
        return jnp.max(searching(*state).astype(jnp.int32)) > 0

    lo, _, _ = jax.lax.while_loop(more, bisect if radix_bits == 1 else split, (lo, hi, at_lo))
    above = jnp.where(bits >= lo, bits, jnp.int32(0x7FFFFFFF))
    cut = jnp.min(above) if shared_heads else jnp.min(above, axis=1, keepdims=True)
    return chosen & capped & (bits <= cut)


def _write_lists(table_ref, keep, *, heads, list_chunk, own_head=None, scatter=True):
    """Row h of the table: the count, then the kept tiles in ascending order, then zeros. With
    `own_head` (a traced head index) the program writes that head's row only.

    `scatter`: a running count gives each kept tile its slot, and one masked store writes every
    kept tile to its slot (a second store fills column 0 and the columns past the count; the two
    never touch the same entry, so their order does not matter). Otherwise slot j is found as the
    number of tiles whose running count is below j, `list_chunk` slots of one head at a time."""
    heads_p, n_tiles = keep.shape
    width = table_ref.shape[-1]
    slot = jnp.cumsum(keep.astype(jnp.int32), axis=1)  # [heads_p, n_tiles]
    count = jnp.sum(keep.astype(jnp.int32), axis=1, keepdims=True)  # [heads_p, 1]
    if scatter:
        from jax.experimental.pallas import triton as pltriton  # stores with masks; interpret mode runs them too

        if own_head is None:
            def store(columns, value, mask):
                rows = jax.lax.broadcasted_iota(jnp.int32, columns.shape, 0)
                pltriton.store(table_ref.at[rows, columns], value, mask=mask & (rows < heads))
        else:  # the program's own row, as [1, n] arrays, into its one-row table block
            def pick(x):
                rows = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
                return jnp.sum(jnp.where(rows == own_head, x, 0), axis=0, keepdims=True)

            keep, slot, count = pick(keep.astype(jnp.int32)) > 0, pick(slot), pick(count)

            def store(columns, value, mask):
                pltriton.store(table_ref.at[columns], value, mask=mask)
        tiles = jax.lax.broadcasted_iota(jnp.int32, slot.shape, 1)
        # skipped tiles aim past the kept ones, each at a column of its own: the GPU masks them
        # out, and interpret mode, which stores every lane, must not see two lanes on one entry
        store(jnp.where(keep, slot, count + tiles + 1 - slot), tiles, keep)
        columns = jax.lax.broadcasted_iota(jnp.int32, (slot.shape[0], width), 1)
        store(columns, jnp.where(columns == 0, count, 0), (columns == 0) | (columns > count))
        return
    count = count[:, 0]
    head_ids = jax.lax.broadcasted_iota(jnp.int32, slot.shape, 0)
    head_of_count = jax.lax.broadcasted_iota(jnp.int32, count.shape, 0)
    for h in ([own_head] if own_head is not None else range(heads)):
        slot_h = jnp.sum(jnp.where(head_ids == h, slot, 0), axis=0)  # [n_tiles]
        count_h = jnp.sum(jnp.where(head_of_count == h, count, 0))
        for start in range(0, width, list_chunk):
            j = start + jax.lax.broadcasted_iota(jnp.int32, (list_chunk, n_tiles), 0)
            tile = jnp.sum((slot_h[None, :] < j).astype(jnp.int32), axis=1)  # [list_chunk]
            j_col = start + jax.lax.broadcasted_iota(jnp.int32, (list_chunk,), 0)
            entry = jnp.where(j_col == 0, count_h, jnp.where(j_col <= count_h, tile, 0))
            if own_head is None:
                table_ref[h, pl.ds(start, list_chunk)] = entry
            else:
                table_ref[pl.ds(start, list_chunk)] = entry


def fused_prepass_table(q, k, *, scale: float, block_q: int, block_k: int, length: int, sink_tiles: int,
                        tile_budget: float, selector: str, shared_heads: bool, backend: str,
                        **layout) -> jax.Array:
    """int32 [B, H, nq, W]: the visit lists of `compact_tile_lists(prepass_keep(...))` (the kept
    off-diagonal tiles of each query tile: sinks plus the budgeted choice).

    `layout` overrides `DEFAULT_LAYOUT`, which decides only speed, never the table:

    q [B, Tp, H, D] and k [B, Tp, Hkv, D] are padded with zeros to whole query tiles past the real
    `length`.

    `split_heads` scores rowmean in a launch of its own, one program per (query tile,
    head), before the cut; otherwise one program per query tile scores every head in turn (fewer
    launches, H times less parallel). `lists_per_head` runs the cut once per (query tile, head)
    and lets each program write its own head's list. `scatter_lists` writes the lists with one masked
    store (else slot by slot). `register_elements` bounds the [rows, tiles] blocks a program holds at
    once: larger blocks spill registers. `score_warps` and `cut_warps` are the Triton warps of the
    scoring and the cut programs: the cut is a chain of small reductions, whose latency grows with
    the warps that must meet in shared memory. `radix_bits` is how many bits of the cut's score the
    search settles per round (see `_below_cut`)."""
    unknown = set(layout) - set(DEFAULT_LAYOUT)
    if unknown:
        raise TypeError(f"fused_prepass_table: unknown layout options {sorted(unknown)}; known: {sorted(DEFAULT_LAYOUT)}")
    layout = {**DEFAULT_LAYOUT, **layout}
    split_heads, lists_per_head, scatter_lists = layout["split_heads"], layout["lists_per_head"], layout["scatter_lists"]
    register_elements, score_warps, cut_warps = layout["register_elements"], layout["score_warps"], layout["cut_warps"]
    b, tp, h, d = q.shape
    hkv = k.shape[2]
    nq, nk = tp // block_q, tp // block_k
    n_tiles = _pow2_at_least(nk)
    width = table_width(nk)
    kbar = None if selector == "window" else key_tile_means(k, block_k, length, n_tiles)
    budgets = np.zeros(_pow2_at_least(nq), np.int32)
    budgets[:nq] = tile_budgets(nq, tile_budget)
    row_chunk = max(16, min(block_q, register_elements // n_tiles))
    share_options = dict(scale=float(scale), block_q=block_q, block_k=block_k, length=int(length),
                         row_chunk=row_chunk, precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)

    def launch_options(warps):
        if backend != "triton":
            return {}
        from jax.experimental.pallas import triton as pltriton

        return {"compiler_params": pltriton.CompilerParams(num_warps=warps, num_stages=1)}

    interpret = backend == "interpret"
    budget_spec = pl.BlockSpec((budgets.shape[0],), lambda *_: (0,))
    if selector == "window":
        in_specs, inputs = [budget_spec], [jnp.asarray(budgets)]
    elif split_heads:
        shares = pl.pallas_call(
            functools.partial(_share_kernel, **share_options), grid=(nq, h, b),
            in_specs=[pl.BlockSpec((None, block_q, None, d), lambda i, hi, bi: (bi, i, hi, 0)),
                      pl.BlockSpec((None, n_tiles, None, d), lambda i, hi, bi: (bi, 0, hi // (h // hkv), 0))],
            out_specs=pl.BlockSpec((None, None, None, n_tiles), lambda i, hi, bi: (bi, hi, i, 0)),
            out_shape=jax.ShapeDtypeStruct((b, h, nq, n_tiles), jnp.float32),
            interpret=interpret, name="tile_selector_scores", **launch_options(score_warps),
        )(q, kbar)
        in_specs = [pl.BlockSpec((None, h, None, n_tiles), lambda i, bi: (bi, 0, i, 0)), budget_spec]
        inputs = [shares, jnp.asarray(budgets)]
        share_options = None
    else:
        in_specs = [pl.BlockSpec((None, block_q, h, d), lambda i, bi: (bi, i, 0, 0)),
                    pl.BlockSpec((None, n_tiles, hkv, d), lambda i, bi: (bi, 0, 0, 0)), budget_spec]
        inputs = [q, kbar, jnp.asarray(budgets)]
    list_chunk = min(width, max(16, register_elements // n_tiles))  # never past the table
    kernel = functools.partial(
        _cut_kernel, selector=selector, heads=h, groups=h // hkv, n_tiles=n_tiles, block_q=block_q, block_k=block_k,
        length=int(length), sink_tiles=int(sink_tiles), shared_heads=bool(shared_heads), list_chunk=list_chunk,
        share_options=None if selector == "window" else share_options, lists_per_head=lists_per_head,
        scatter_lists=scatter_lists, radix_bits=layout["radix_bits"])
    if lists_per_head:  # the same inputs for every head's program: the head axis only picks the output row
        grid = (nq, h, b)
        in_specs = [pl.BlockSpec(spec.block_shape, lambda i, hi, bi, f=spec.index_map: f(i, bi)) for spec in in_specs]
        out_spec = pl.BlockSpec((None, None, None, width), lambda i, hi, bi: (bi, hi, i, 0))
    else:
        grid = (nq, b)
        out_spec = pl.BlockSpec((None, h, None, width), lambda i, bi: (bi, 0, i, 0))
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((b, h, nq, width), jnp.int32),
        interpret=interpret, name="tile_selector_prepass", **launch_options(cut_warps),
    )(*inputs)

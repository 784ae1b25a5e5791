"""Calibration: per (layer, head, row length) thresholds that keep k elements on average.

Two passes over the same calibration blocks. The first takes, for each row of length n > k_l, the
row threshold: the (k_l+1)-th largest scaled logit (or probability, for post-softmax), so that
`a > θ_row` keeps exactly k_l elements; then `θ = mean + σ_add · std` over the samples. The second
applies the finished θ table, looked up by row length as inference does, to the same rows and
averages the mass it drops: the calibrated SDC table Δ̄, as DESIGN.md and the Top-θ reference code
define it (the mass that the calibrated θ drops, not the mass outside each row's exact top-k).
That needs θ finished, hence the second pass; it sorts nothing. The mass is Σ exp(a_ij − m_i) with
m_i the largest allowed score of the row, the reference point the kernels add Δ̄ to.

With a tile gate, the tile thresholds Θ (prefill, per query tile) and Θ_dec (decode, per count of
visible key tiles) are the (m_b+1)-th largest optional gate score, calibrated the same way in the
first pass. Element statistics of both passes are taken inside the tiles that the exact gate (the
top m_b tiles by gate score) keeps, so θ and Δ̄ match what the gated rule will see; Δ̄ counts the
elements of the tiles it drops as dropped.

The model runs one layer at a time (`LayerWalk`): per layer, one jitted function takes its
statistics and another runs it, each compiled once for all layers. A jit of the whole walk lets XLA
keep many layers' [B, H, rows, T] buffers alive at once; this way the peak is one layer's
statistics, which are taken a chunk of query rows at a time. The host merges per-row values into
float64 running means and variances (Chan's parallel update), which stay exact over many batches.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.attention import AttentionConfig
from condensa.attention.dense import attention_scores
from condensa.attention.gqa import repeat_kv
from condensa.attention.rows import join_rows, keep_largest_if_empty, lookup_by_length, masked_max, split_rows
from condensa.attention.tile_gate import decode_gate_layout, decode_gate_scores
from condensa.attention.tiles import expand_tiles, top_m_tiles
from condensa.cli import write_json
from condensa.data import load_token_stream, model_tokenizer, pack_blocks
from condensa.kernels.tiling import optional_tiles, tile_budgets, tile_count
from condensa.kernels.tiling.pooling import pooled_gate_scores
from condensa.errors import ConfigError, DataError
from condensa.model import load_pretrained
from condensa.sparsity.gated_forward import forward_probs_and_gates
from condensa.sparsity.metrics import causal_visible, kept_per_row, nanmean
from condensa.sparsity.thresholds import Thresholds, fill_uncalibrated, model_fingerprint

STATISTICS_CHUNK_SCORES = 2**27  # float32 scores [B, H, rows, T] in one row chunk of the element statistics


@dataclasses.dataclass(frozen=True)
class GateSpec:
    """The tile geometry and budget a gate is calibrated for (one setting per model)."""

    block_q: int = 128
    block_k: int = 128
    tile_budget: float = 0.125
    sink_tiles: int = 1


# ---- walking the model layer by layer ------------------------------------------------------------


class LayerWalk:
    """The model one layer at a time: the embedding, then per layer jitted functions of that layer's
    parameters (`run` calls one for the layer's statistics, then runs the layer forward).

    Each block holds its layer index as a static attribute, which only `attend` reads, to pick the
    layer's k and thresholds. The walk gives each layer an attention config that needs no index
    (`walk_attention` resolved for that layer, dense or top-k), so with the index set to 0 the
    blocks of a model share one structure and one compiled function serves them all. Blocks whose
    structure still differs (a GPT-2 that scales logits by the layer index) compile apart.
    """

    def __init__(self, model, walk_attention: AttentionConfig):
        if walk_attention.mode not in ("dense", "topk") or walk_attention.tile_gate:
            raise ConfigError(f"calibration walks the model with dense or exact top-k attention; got "
                              f"mode={walk_attention.mode!r}, tile_gate={walk_attention.tile_gate}.")
        self.graphdef, self.state = nnx.split(model)
        self.layers = [_split_without_index(block) for block in model._blocks()]
        self.attentions = [walk_attention.for_layer(layer) for layer in range(len(self.layers))]

    def run(self, ids: jax.Array, per_layer: Callable) -> list:
        """`per_layer(layer, graphdef, state, x, block_args)` on the hidden states x entering each
        layer; returns the results as they come (device arrays, not yet fetched)."""
        x, block_args = embed_tokens(self.graphdef, self.state, ids)
        results = []
        for layer, (graphdef, state) in enumerate(self.layers):
            results.append(per_layer(layer, graphdef, state, x, block_args))
            if layer + 1 < len(self.layers):
                x = _layer_forward(graphdef, state, x, block_args, attention=self.attentions[layer])
        return results


def _split_without_index(block) -> tuple:
    """(graphdef, state) of a copy of `block` whose layer index is 0; the parameters are shared."""
    copy = nnx.merge(*nnx.split(block))
    for _, node in nnx.iter_graph(copy):
        if isinstance(node, nnx.Module) and hasattr(node, "layer_idx"):
            node.layer_idx = 0
    return nnx.split(copy)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def embed_tokens(graphdef, state, ids):
    """(hidden states entering the first block, the extra arguments of every block)."""
    b, t = ids.shape
    return nnx.merge(graphdef, state)._embed(ids, jnp.broadcast_to(jnp.arange(t)[None, :], (b, t)))


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def _layer_forward(graphdef, state, x, block_args, *, attention):
    block = nnx.merge(graphdef, state)
    t = x.shape[1]
    visible = jnp.tril(jnp.ones((t, t), bool))[None, None]
    # no probabilities needed: dense layers may run fused, top-k ones in row chunks at long T
    return block(x, *block_args, visible=visible, attention=attention, thresholds=None, need_probs=False,
                 causal=True)[0]


def _queries_keys(graphdef, state, x, block_args):
    """q [B, T, H, D], k repeated to the H query heads, and the scale of one block's attention."""
    q, k, _, scale = nnx.merge(graphdef, state).attention_projections(x, *block_args)
    return q, repeat_kv(k, q.shape[2]), scale


@functools.partial(jax.jit, static_argnames=("graphdef", "placement", "gate"))
def block_samples(graphdef, state, x, block_args, k_l, *, placement, gate):
    """First pass, one block: `layer_row_statistics`. k_l is traced, so one compile serves every k.
    Public, as are `embed_tokens` and `block_dropped_mass`, so exp/'s memory scripts lower them."""
    q, k, scale = _queries_keys(graphdef, state, x, block_args)
    return layer_row_statistics(q, k, scale, k_l=k_l, placement=placement, gate=gate)


@functools.partial(jax.jit, static_argnames=("graphdef", "placement", "gate"))
def block_dropped_mass(graphdef, state, x, block_args, k_l, theta, *, placement, gate):
    """Second pass, one block: `layer_dropped_mass` with the layer's θ table [H, N]."""
    q, k, scale = _queries_keys(graphdef, state, x, block_args)
    return layer_dropped_mass(q, k, scale, theta, k_l=k_l, placement=placement, gate=gate)


# ---- per-row statistics of one layer ---------------------------------------------------------------


def _kth_largest(values: jax.Array, allowed: jax.Array, kth: jax.Array | int) -> jax.Array:
    """The `kth` (0-based) largest allowed value per row, NaN where a row has too few allowed."""
    ordered = -jnp.sort(-jnp.where(allowed, values, -jnp.inf), axis=-1)
    kth = jnp.broadcast_to(jnp.asarray(kth), ordered.shape[:-1])
    size = ordered.shape[-1]
    picked = jnp.take_along_axis(ordered, jnp.minimum(kth, size - 1)[..., None], axis=-1)[..., 0]
    return jnp.where(jnp.isfinite(picked) & (kth < size), picked, jnp.nan)


def _chunk_rows(batch: int, heads: int, t: int) -> int:
    """Query rows per chunk of the element statistics: as many as keep one chunk's [B, H, rows, T]
    float32 scores within STATISTICS_CHUNK_SCORES, so that the sort's temporaries, a few arrays of
    that size, stay far below a device's memory at any length."""
    return max(1, min(t, STATISTICS_CHUNK_SCORES // (batch * heads * t)))


def _over_row_chunks(per_rows: Callable, q: jax.Array, rows: int) -> jax.Array:
    """`per_rows(q_rows [B, rows, H, D], row_ids [rows]) -> [B, H, rows]` for all T query rows of q,
    `rows` at a time under `lax.map` (one chunk's temporaries alive), joined to [B, H, T]. The last
    chunk is padded with zero query rows, whose results are cut off."""
    t = q.shape[1]
    chunks = -(-t // rows)
    if chunks == 1:
        return per_rows(q, jnp.arange(t))
    q = jnp.pad(q, ((0, 0), (0, chunks * rows - t), (0, 0), (0, 0)))
    starts = jnp.arange(chunks) * rows
    out = jax.lax.map(lambda args: per_rows(args[0], args[1] + jnp.arange(rows)), (split_rows(q, 1, chunks), starts))
    return join_rows(out, 2)[..., :t]  # [chunks, B, H, rows] -> [B, H, T]


def _exact_gate(q, k, scale, gate: GateSpec | None):
    """(pooled gate scores [B, H, nq, nk], the key tiles the exact gate keeps: bool [B, H, nq, nk],
    the mandatory ones and the top m_b optional ones by pooled score), or (None, None) without a gate."""
    if gate is None:
        return None, None
    pooled = pooled_gate_scores(q, k, scale, gate.block_q, gate.block_k)
    return pooled, top_m_tiles(pooled, gate.block_q, gate.block_k, gate.tile_budget, gate.sink_tiles)


def _visible_and_allowed(row_ids, t: int, tiles, gate: GateSpec | None):
    """For query rows `row_ids`: the causal mask [1, 1, rows, T] and the allowed mask (the visible
    keys in the tiles the exact gate keeps) [B | 1, H | 1, rows, T]."""
    visible = (row_ids[:, None] >= jnp.arange(t)[None, :])[None, None]
    if tiles is None:
        return visible, visible
    tile_rows = jnp.minimum(row_ids // gate.block_q, tiles.shape[2] - 1)  # padding rows past T: any tile
    row_tiles = jnp.take(tiles, tile_rows, axis=2)  # [B, H, rows, nk]
    return visible, visible & expand_tiles(row_tiles, 1, gate.block_k, row_ids.shape[0], t)


def _compared_values(scores, allowed, placement: str):
    """(what θ is compared with, m): the scaled logits (pre) or the probabilities over the allowed
    keys (post), and m, the largest allowed score of each row [..., 1]."""
    m = masked_max(scores, allowed)
    if placement != "post":
        return scores, m
    e = jnp.exp(jnp.where(allowed, scores - m, -jnp.inf))
    return e / e.sum(axis=-1, keepdims=True), m


def layer_row_statistics(q, k, scale, *, k_l: int, placement: str, gate: GateSpec | None) -> dict[str, jax.Array]:
    """First pass: per-row calibration samples of one layer (NaN where a row gives no sample):
    theta [B, H, T] and, with a gate, tile [B, H, nq] and decode [B, H, T].

    The element statistics sort whole rows of [B, H, T, T] scores, so they are taken a chunk of
    rows at a time (`_chunk_rows`). The gate's statistics are per tile and small."""
    b, t, h = q.shape[:3]
    out = {}
    pooled, tiles = _exact_gate(q, k, scale, gate)
    if gate is not None:
        bq, bk, f, sink = gate.block_q, gate.block_k, gate.tile_budget, gate.sink_tiles
        nq = tile_count(t, bq)
        optional = optional_tiles(nq, tile_count(t, bk), bq, bk, sink)
        out["tile"] = _kth_largest(pooled, optional, tile_budgets(nq, f))
        dec_optional, dec_budget = decode_gate_layout(t, bk, f, sink)
        out["decode"] = _kth_largest(decode_gate_scores(q, k, scale, bk), dec_optional, dec_budget)

    def row_thresholds(q_rows, row_ids):
        scores = attention_scores(q_rows, k, scale)  # [B, H, rows, T]
        allowed = jnp.broadcast_to(_visible_and_allowed(row_ids, t, tiles, gate)[1], scores.shape)
        values, _ = _compared_values(scores, allowed, placement)
        theta_row = _kth_largest(values, allowed, k_l)  # NaN where fewer than k_l + 1 allowed
        return jnp.where(row_ids + 1 > k_l, theta_row, jnp.nan)

    out["theta"] = _over_row_chunks(row_thresholds, q, _chunk_rows(b, h, t))
    return out


def layer_dropped_mass(q, k, scale, theta, *, k_l: int, placement: str, gate: GateSpec | None) -> jax.Array:
    """Second pass: the calibrated-SDC samples of one layer, delta [B, H, T]: the mass
    Σ exp(a_ij − m_i) of the visible elements that the Top-θ rule with the finished table `theta`
    [H, N] drops, θ looked up by the row length n_i = i + 1 as at inference.

    Dropped are the allowed elements whose score (pre) or probability (post) is not above θ and,
    with a gate, every element of a tile the exact gate drops. As at inference, rows of length
    n <= k_l keep every allowed element (so they sample only the gate's dropped mass, 0 without a
    gate: inference adds Δ̄ to such a row when the gate dropped something), and a row where nothing
    beats θ keeps its largest allowed element (DESIGN.md's empty-row rule). A compare per element,
    no sort, so the same row chunks cost less than in the first pass."""
    b, t, h = q.shape[:3]
    _, tiles = _exact_gate(q, k, scale, gate)

    def dropped_mass(q_rows, row_ids):
        scores = attention_scores(q_rows, k, scale)  # [B, H, rows, T]
        visible, allowed = _visible_and_allowed(row_ids, t, tiles, gate)
        allowed = jnp.broadcast_to(allowed, scores.shape)
        values, m = _compared_values(scores, allowed, placement)
        lengths = jnp.broadcast_to(row_ids + 1, (b, row_ids.shape[0]))
        row_theta = lookup_by_length(theta, lengths)  # [B, H, rows]
        dense_rows = (row_ids + 1 <= k_l)[:, None]
        kept = allowed & ((values > row_theta[..., None]) | dense_rows)
        kept = keep_largest_if_empty(kept, scores, allowed)
        dropped = jnp.broadcast_to(visible, scores.shape) & ~kept
        return jnp.exp(jnp.where(dropped, scores - m, -jnp.inf)).sum(axis=-1)

    return _over_row_chunks(dropped_mass, q, _chunk_rows(b, h, t))


# ---- running statistics on the host ----------------------------------------------------------------


class RunningStats:
    """Count, mean and M2 per cell in float64, merged batch by batch (Chan et al.); NaN = no sample."""

    def __init__(self):
        self.count = self.mean = self.m2 = None

    def update(self, samples: np.ndarray, axis: int | tuple[int, ...] = 0) -> None:
        x = np.asarray(samples, np.float64)
        have = np.isfinite(x)
        n = have.sum(axis=axis)
        total = np.where(have, x, 0.0).sum(axis=axis)
        mean = np.divide(total, n, out=np.zeros_like(total), where=n > 0)
        mean_b = np.expand_dims(mean, axis)
        m2 = np.where(have, (x - mean_b) ** 2, 0.0).sum(axis=axis)
        if self.count is None:
            self.count, self.mean, self.m2 = n.astype(np.float64), mean, m2
            return
        total_n = self.count + n
        delta = mean - self.mean
        safe = np.maximum(total_n, 1.0)
        self.mean = self.mean + delta * n / safe
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / safe
        self.count = total_n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.divide(self.m2, self.count, out=np.zeros_like(self.m2), where=self.count > 0))

    def pooled_over_lengths(self, spread: float) -> "RunningStats":
        """The statistics of each row length n (the last axis, n = index + 1) over the samples of
        every length from floor(n (1 - spread)) to ceil(n (1 + spread)), merged exactly (sums of
        counts, means and squares).

        One calibration block gives each row length one sample per (layer, head), so a table of a
        few blocks is noisy from one length to the next, while θ changes slowly with n. Pooling
        proportionally to n keeps the short rows, where θ moves fastest, nearly unpooled."""
        out = RunningStats()
        if spread <= 0:
            out.count, out.mean, out.m2 = self.count, self.mean, self.m2
            return out
        n = self.count.shape[-1]
        lengths = np.arange(1, n + 1)
        lo = np.clip(np.floor(lengths * (1 - spread)).astype(int), 1, n) - 1
        hi = np.clip(np.ceil(lengths * (1 + spread)).astype(int), 1, n)

        def window_sums(x):
            c = np.concatenate([np.zeros(x.shape[:-1] + (1,)), np.cumsum(x, axis=-1)], axis=-1)
            return c[..., hi] - c[..., lo]

        out.count = window_sums(self.count)
        total = window_sums(self.count * self.mean)
        squares = window_sums(self.m2 + self.count * self.mean**2)
        out.mean = np.divide(total, out.count, out=np.zeros_like(total), where=out.count > 0)
        out.m2 = np.maximum(squares - out.count * out.mean**2, 0.0)
        return out

    def threshold(self, sigma_add: float) -> np.ndarray:
        """mean + σ_add · std, with uncalibrated cells filled from their neighbours along the last axis."""
        return fill_uncalibrated(self.mean + sigma_add * self.std, self.count > 0)


def _resize(values: np.ndarray, size: int) -> np.ndarray:
    """Cuts or extends (with the last entry: nearest calibrated length) the last axis to `size`."""
    if values.shape[-1] >= size:
        return values[..., :size]
    pad = np.repeat(values[..., -1:], size - values.shape[-1], axis=-1)
    return np.concatenate([values, pad], axis=-1)


# ---- the calibration loop ---------------------------------------------------------------------------


def calibrate(
    model,
    blocks: np.ndarray,
    *,
    k: int,
    layer_k: Any = (),
    placement: str = "pre",
    sigma_add: float = 0.1,
    gate: GateSpec | None = None,
    batch_size: int = 8,
    topk_at_calibration: bool = False,
    length_pooling: float = 0.0,
    data: str = "",
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Thresholds:
    """Calibrates `model` (a condensa `GPT2` or `Llama`) on token blocks [N, T] and returns its `Thresholds`.

    Two passes over the blocks (see the module docstring): θ and the gate thresholds first, then Δ̄
    with the finished θ. `progress` wraps the batches of both passes in one iterable, so it counts
    every batch twice. topk_at_calibration: layers run exact top-k while later layers are
    calibrated, so the statistics of layer l see the sparse activations of layers < l (as at
    inference); both passes walk the model the same way. As in the Top-θ reference, that top-k
    renormalises for "pre" and not for "post" (sdc="exact"; post-softmax Top-θ does not
    renormalise either). Unlike the reference, the walk applies no VMC: one thresholds file serves
    inference with and without compensation. length_pooling s > 0: θ and Δ̄ of row length n pool the samples
    of lengths within n · (1 ± s) (`RunningStats.pooled_over_lengths`); 0 keeps one length per cell,
    as DESIGN.md and the reference do.
    """
    config = model.config
    probe = AttentionConfig(mode="topk", k=k, layer_k=layer_k, placement=placement)  # validates k/layer_k
    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise DataError("calibration needs at least one block of tokens; give more text or a shorter --seq-len.")
    n, t = blocks.shape
    if t > config.n_positions:
        raise ConfigError(f"seq_len {t} exceeds the model's n_positions={config.n_positions}; use --seq-len <= it.")
    ks = [probe.k_for(l) for l in range(config.n_layer)]
    if t <= min(ks):
        raise ConfigError(f"seq_len {t} must exceed k (smallest k_l = {min(ks)}): rows of length <= k are dense "
                          "and give no calibration samples. Use a longer --seq-len or a smaller --k.")
    if placement not in ("pre", "post"):
        raise ConfigError(f"placement must be 'pre' or 'post'; got {placement!r}.")
    if int(blocks.max()) >= config.vocab_size or int(blocks.min()) < 0:
        raise DataError(f"the tokenized text holds ids outside the model's vocabulary ({config.vocab_size}); "
                        "use the tokenizer that belongs to this model (--tokenizer).")
    walk_topk = probe.replace(sdc="exact") if placement == "post" else probe
    walk = LayerWalk(model, walk_topk if topk_at_calibration else AttentionConfig())
    ks = [jnp.int32(k_l) for k_l in ks]
    stats = {name: RunningStats() for name in ("theta", "delta", "tile", "decode")}
    n_pos = config.n_positions
    steps = [(second, start) for second in (False, True) for start in range(0, n, batch_size)]
    theta = layer_theta = None

    def samples(layer, graphdef, state, x, block_args):
        return block_samples(graphdef, state, x, block_args, ks[layer], placement=placement, gate=gate)

    def dropped_mass(layer, graphdef, state, x, block_args):
        return block_dropped_mass(graphdef, state, x, block_args, ks[layer], layer_theta[layer],
                                  placement=placement, gate=gate)

    for second, start in (progress(steps) if progress else steps):
        ids, real = _padded_batch(blocks, start, batch_size)
        if not second:
            _merge_samples(stats, jax.device_get(walk.run(ids, samples)), real, gate)
            continue
        if theta is None:  # the first batch of the second pass: θ is finished
            theta = _resize(stats["theta"].pooled_over_lengths(length_pooling).threshold(sigma_add), n_pos)
            theta = theta.astype(np.float32)
            layer_theta = [jnp.asarray(table) for table in theta]  # what inference looks θ up in
        deltas = np.stack(jax.device_get(walk.run(ids, dropped_mass)))[:, :real]  # [L, B, H, T]
        if gate is None:  # rows n <= k_l stay dense and drop nothing: no sample, so pooling never averages them in
            for layer, k_l in enumerate(ks):
                deltas[layer, ..., : int(k_l)] = np.nan
        stats["delta"].update(deltas, axis=1)
    pooled_delta = stats["delta"].pooled_over_lengths(length_pooling)
    delta = _resize(fill_uncalibrated(pooled_delta.mean, pooled_delta.count > 0), n_pos)
    if gate is None:  # dense rows drop nothing
        for layer, k_l in enumerate(ks):
            delta[layer, :, : int(k_l)] = 0.0
    tile_theta = tile_theta_decode = None
    if gate is not None:
        tile_theta = _resize(stats["tile"].threshold(sigma_add), tile_count(n_pos, gate.block_q))
        tile_theta_decode = _resize(stats["decode"].threshold(sigma_add), tile_count(n_pos, gate.block_k))
    return Thresholds(
        theta=theta, sdc_delta=delta.astype(np.float32),
        tile_theta=None if tile_theta is None else tile_theta.astype(np.float32),
        tile_theta_decode=None if tile_theta_decode is None else tile_theta_decode.astype(np.float32),
        placement=placement, k=int(k), layer_k=probe.layer_k, sigma_add=float(sigma_add),
        block_q=gate and gate.block_q, block_k=gate and gate.block_k, tile_budget=gate and gate.tile_budget,
        sink_tiles=gate and gate.sink_tiles, samples=int(n), data=str(data),
        model=model_fingerprint(config), topk_at_calibration=bool(topk_at_calibration),
    )


def _padded_batch(blocks: np.ndarray, start: int, batch_size: int) -> tuple[jax.Array, int]:
    """(ids [batch_size, T] from `start`, how many of them are real): a short last batch is padded
    with repeats of its first block, so the jitted functions never recompile; the repeats are dropped."""
    batch = blocks[start:start + batch_size]
    real = batch.shape[0]
    if real < batch_size:
        batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, axis=0)])
    return jnp.asarray(batch, jnp.int32), real


def _merge_samples(stats: dict[str, RunningStats], layers: list[dict], real: int, gate: GateSpec | None) -> None:
    """Adds one batch of first-pass samples (per layer {name: [B, H, X]}) to the running statistics."""
    for name in layers[0]:
        array = np.stack([np.asarray(entry[name]) for entry in layers])[:, :real]  # [L, B, H, X]
        if name == "decode":  # group rows by the number of key tiles they see
            stats[name].update(_by_key_tile(array, gate.block_k), axis=(1, 4))
        else:
            stats[name].update(array, axis=1)


def _by_key_tile(rows: np.ndarray, block_k: int) -> np.ndarray:
    """[L, B, H, T] per query row -> [L, B, H, nk, block_k], rows grouped by their last key tile."""
    t = rows.shape[-1]
    nk = tile_count(t, block_k)
    pad = nk * block_k - t
    if pad:
        rows = np.concatenate([rows, np.full(rows.shape[:-1] + (pad,), np.nan)], axis=-1)
    return rows.reshape(*rows.shape[:-1], nk, block_k)


# ---- the calibration run (what the CLI does) ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Everything `python -m condensa.calibrate` needs (YAML keys = these names)."""

    model: str = ""  # HF directory, .gguf file, named model (smollm2-135m) or hub id
    data: tuple[str, ...] = ()  # calibration text: files, folders of .txt, or HF dataset name[:config]
    tokenizer: str = ""  # default: the model directory, when it holds a tokenizer
    k: int = 64  # target kept elements per row (rows with n <= k stay dense)
    layer_k: str = ""  # "0:512,1:512"
    placement: str = "pre"  # pre (threshold scaled logits) or post (threshold probabilities)
    sigma_add: float = 0.1  # θ = mean + sigma_add * std of the per-row samples (also the gate's Θ)
    tile: int = 0  # tile size for the gate (block_q = block_k); 0 = no gate
    tile_budget: float = 0.125  # gate budget f: m_b = max(1, ceil(f (b + 1))) optional tiles
    sink_tiles: int = 1  # leading key tiles the gate always keeps
    samples: int = 256  # calibration blocks
    seq_len: int = 0  # 0 = the model's n_positions
    batch_size: int = 8  # blocks per jitted step
    topk_at_calibration: bool = False  # run exact top-k in the layers before the one being calibrated
    length_pooling: float = 0.0  # pool the samples of row lengths within n (1 ± this); 0 = none
    check_blocks: int = 8  # held-out blocks for the summary's achieved kept-per-row
    seed: int = 0  # seed of the block shuffle (calibration and check blocks)
    out: str = ""  # output folder: thresholds.safetensors, summary.json, config.yaml

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("no model given; pass --model DIR_OR_HUB_ID.")
        if not self.data:
            raise ConfigError("no calibration text given; pass --data FILE_OR_FOLDER (or an HF dataset name[:config]).")
        if not self.out:
            raise ConfigError("no output folder given; pass --out DIR.")
        for name in ("k", "samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}.")
        if not 0 <= self.length_pooling < 1:
            raise ConfigError(f"length_pooling must be in [0, 1) (a fraction of the row length); got {self.length_pooling}.")
        if self.tile < 0 or self.seq_len < 0 or self.check_blocks < 0:
            raise ConfigError("tile, seq_len and check_blocks must be >= 0 (0 means: off / the default).")
        if not self.tile_budget > 0 or self.tile_budget > 1:
            raise ConfigError(f"tile_budget must be in (0, 1]; got {self.tile_budget}.")
        self.attention()  # the same checks as at inference (placement, layer_k, tile sizes)

    @property
    def gate(self) -> GateSpec | None:
        return GateSpec(self.tile, self.tile, self.tile_budget, self.sink_tiles) if self.tile else None

    def attention(self, **changes) -> AttentionConfig:
        """The Top-θ attention config these thresholds are for (SDC off; choose it at inference)."""
        values = dict(mode="toptheta", placement=self.placement, k=self.k, layer_k=self.layer_k,
                      tile_gate=bool(self.tile), block_q=self.tile or 128, block_k=self.tile or 128,
                      tile_budget=self.tile_budget, sink_tiles=self.sink_tiles)
        values.update(changes)
        return AttentionConfig(**values)


def load_blocks(config: CalibrationConfig, tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration blocks [samples, T], held-out check blocks) from the configured text sources,
    chosen by a seeded shuffle of all packed blocks so that calibration covers the whole text."""
    stream = np.concatenate([load_token_stream(source, tokenizer) for source in config.data])
    blocks = pack_blocks(stream, seq_len)
    order = np.random.default_rng(config.seed).permutation(len(blocks))
    calibration = blocks[np.sort(order[: config.samples])]
    rest = order[config.samples:]
    check = blocks[np.sort(rest[: config.check_blocks])] if len(rest) else calibration[: config.check_blocks]
    return calibration, check


def achieved_sparsity(model, blocks: np.ndarray, thresholds: Thresholds, attention: AttentionConfig) -> list[dict]:
    """Per layer: the mean kept elements per row (rows with n > k_l) against k_l, and with a gate the
    mean kept optional tiles per query tile (where it has more than m_b) against m_b."""
    ids = jnp.asarray(blocks, jnp.int32)
    t = ids.shape[1]
    graphdef, state = nnx.split(model)
    probs, gates = forward_probs_and_gates(graphdef, state, ids, thresholds, attention=attention)
    visible = causal_visible(t)
    if gates is not None:
        optional, budgets = decode_gate_layout(t, attention.block_k, attention.tile_budget, attention.sink_tiles)
        decode_rows = optional.sum(axis=-1) > budgets
    report = []
    for layer, p in enumerate(probs):
        k_l = attention.k_for(layer)
        kept = nanmean(kept_per_row(p, visible, k_l))
        entry = {"layer": layer, "k": k_l, "kept_per_row": kept, "ratio": kept / k_l}
        if gates is not None:
            entry.update(gate_tile_counts(np.asarray(gates[0][layer]), attention))
            if decode_rows.any():
                kept_dec = np.asarray(gates[1][layer]).mean(axis=(0, 1))[decode_rows].sum()
                entry["decode_tiles_ratio"] = float(kept_dec / budgets[decode_rows].sum())
        report.append(entry)
    return report


def gate_tile_counts(kept_tiles: np.ndarray, attention: AttentionConfig) -> dict[str, float]:
    """Mean kept optional tiles per query tile vs the budget m_b, over the query tiles that have
    more optional tiles than m_b (the others keep them all by rule). kept_tiles [B, H, nq, nk]."""
    nq, nk = kept_tiles.shape[-2:]
    optional = optional_tiles(nq, nk, attention.block_q, attention.block_k, attention.sink_tiles)
    budgets = tile_budgets(nq, attention.tile_budget)
    gated = optional.sum(axis=-1) > budgets
    if not gated.any():
        return {"tiles_kept": float("nan"), "tiles_budget": float("nan"), "tiles_ratio": float("nan")}
    kept = (kept_tiles & optional).sum(axis=-1).mean(axis=(0, 1))[gated].sum()
    return {"tiles_kept": float(kept), "tiles_budget": float(budgets[gated].sum()),
            "tiles_ratio": float(kept / budgets[gated].sum())}


def run_calibration(config: CalibrationConfig, *, progress=None) -> dict[str, Any]:
    """Loads the model and text, calibrates, writes thresholds.safetensors + summary.json into
    `config.out`, and returns the summary."""
    from pathlib import Path

    tokenizer = model_tokenizer(config.model, config.tokenizer)
    model, model_config = load_pretrained(config.model)
    seq_len = config.seq_len or model_config.n_positions
    attention = config.attention()  # validates layer_k etc. before the long part
    calibration, check = load_blocks(config, tokenizer, seq_len)
    thresholds = calibrate(
        model, calibration, k=config.k, layer_k=config.layer_k, placement=config.placement,
        sigma_add=config.sigma_add, gate=config.gate, batch_size=config.batch_size,
        topk_at_calibration=config.topk_at_calibration, length_pooling=config.length_pooling,
        data=",".join(config.data), progress=progress,
    )
    out = Path(config.out)
    thresholds.save(out / "thresholds.safetensors")
    summary = {
        "thresholds": str(out / "thresholds.safetensors"),
        "samples": int(len(calibration)), "seq_len": int(seq_len), "check_blocks": int(len(check)),
        "layers": achieved_sparsity(model, check, thresholds, attention) if len(check) else [],
    }
    write_json(out / "summary.json", summary)
    return summary

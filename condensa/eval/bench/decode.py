"""Decode attention benchmark: condensa's Pallas Top-θ decode kernel (dense, Top-θ, tile-gated)
against dense decode attention (XLA, cuDNN, JAX's Pallas decode kernel). Run on a GPU:

    python -m condensa.eval.bench decode --out_dir runs/bench_decode
    python -m condensa.eval.bench.decode --batches [8] --seq_lens [16384]   # one shape

One new query per sequence against a full KV cache [B, S, H, D]. It checks correctness first
(the kernel against `condensa.attention.attend` on fresh structured inputs with ragged cache
lengths, the kernel's partial outputs poisoned with NaN before each run), measures the copy
bandwidth of the device, then times every method (warm-up, then the median over repeats of a few
back-to-back calls; small caches rotate over several copies so that L2 does not hold them).
condensa's call is timed under jax.jit, as a model's jitted decode step runs it (`--jit false`
times the eager call, which also pays the wrapper's Python every time). With `--layers N`, every
method runs as one jitted call over N caches in turn, as a model's decode step runs its layers, so
the per-call dispatch is paid once per step and not once per layer; times are then per layer.

No calibrated thresholds exist for these synthetic caches, so the benchmark derives them from its
own structured inputs the way calibration would (mean + σ_add·std over the batch): θ from the
(k+1)-th largest score of each row, Θ_dec from the (m+1)-th largest gate score among the optional
tiles, m = max(1, ceil(f · t_count)), and the calibrated SDC Δ̄ as the mean exact dropped mass.
The inputs have the structure of a trained model's cache: keys carry a positional code (so a query
prefers recent keys, with a long tail), key 0 is a sink, and a few random "retrieval" tiles hold
keys aligned with the query. Writes config.json, results.jsonl and summary.md into the output folder.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from condensa import jsonio
from condensa.kernels.tiling import tile_budget
from condensa.attention import AttentionConfig, attend
from condensa.cli import config_parser, parse_config_args, append_jsonl, config_to_dict, progress, run_main, write_json
from condensa.errors import ConfigError
from condensa.eval.bench.decode_baselines import dense_baselines, head_major, tile_state
from condensa.eval.bench.timing import check_kernel_shapes, correctness_summary, jit_with_options, relative_error
from condensa.kernels.toptheta_decode import (SKIP_V_MODES, compact, default_num_splits, kept_tiles, tile_budgets,
                                              toptheta_decode)
from condensa.sparsity.thresholds import Thresholds


@dataclasses.dataclass
class DecodeBenchConfig:
    """What to time. Shapes run in order, the acceptance shape (batch 8, S = 16k) first."""

    out_dir: str = "runs/bench_decode"  # writes config.json, results.jsonl, summary.md here
    batches: list[int] = dataclasses.field(default_factory=lambda: [8, 1, 32])  # batch sizes (sequences) timed
    seq_lens: list[int] = dataclasses.field(default_factory=lambda: [16384, 65536, 4096])  # KV-cache lengths S timed
    head_dims: list[int] = dataclasses.field(default_factory=lambda: [64, 128])  # head dimensions timed (64 or 128)
    heads: int = 12  # attention heads
    dtype: str = "bfloat16"  # bfloat16, float16 or float32
    k_top: int = 64  # Top-θ k: θ from each row's (k+1)-th largest score
    sigma_add: float = 0.1  # thresholds = mean + sigma_add * std over the batch
    budgets: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.125, 0.0625])  # gate budgets f timed
    block_k: int = 64  # key tile size of the kernel and the gate
    sink_tiles: int = 1  # leading key tiles the gate always keeps
    retrieval_tiles: int = 4  # random key tiles per sequence aligned with the query
    num_splits: int = 0  # 0: the kernel's default (enough programs to fill the GPU)
    num_warps: int = 4  # Triton warps per program
    num_stages: int = 2  # Triton pipeline stages
    skip_v: str = "auto"  # V read: "rows" (survivors), "rows_branch" (same, a branch per tile), "blocks"; "auto": rows
    baselines: list[str] = dataclasses.field(default_factory=lambda: ["xla", "cudnn", "pallas_decode"])  # any of these
    warmup: int = 3  # untimed calls before timing
    repeats: int = 15  # timed repeats; the median is reported
    inner: int = 10  # back-to-back calls per timed repeat (hides host dispatch)
    rotate_bytes: float = 256e6  # small caches rotate over copies until this many bytes are in play
    check: bool = True  # check kernel vs attend() before timing
    check_seq_len: int = 4096  # cache length of the correctness check
    check_tol: float = 2e-2  # max relative error that passes the check
    time_budget_s: float = 0.0  # stop starting new shapes after this long (0: no limit)
    tune: bool = False  # at the first shape, also time the gate pre-pass alone and other warps/splits
    jit: bool = True  # time condensa's call under jax.jit, as a model's decode step runs it (False: eager)
    layers: int = 1  # > 1: one jitted call runs this many decode attentions on their own caches (times per layer)
    #                  N caches and their head-major copies must fit: 2 N x the cache (B 32, S 16k, hd 128, N 12: 77 GB)


# ---- inputs and thresholds ------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5), static_argnames=("block_k", "retrieval_tiles"))
def structured_cache(key, b: int, s: int, h: int, d: int, dtype, *, block_k: int, retrieval_tiles: int,
                     peak: float = 6.0, sink: float = 4.0, retrieval: float = 4.0):
    """q [B, 1, H, D] at position S-1 and k, v [B, S, H, D] with a trained cache's structure.

    Half of each key is a positional code `[cos(ω j), sin(ω j)]` over geometric ω (the query's
    code is the same at j = S-1, so q·k_j = Σ_f cos(ω_f (S-1-j)): recency with a long tail), the
    other half content noise. Key 0 (the sink) and the keys of `retrieval_tiles` random tiles get
    a component along the query's content direction: a few long-range peaks for the gate to find.
    """
    kq, kk, kv, kr = jax.random.split(key, 4)
    half = d // 2
    omega = jnp.geomspace(1.0, 2.0 / s, half // 2)
    amp = math.sqrt(peak * math.sqrt(d) / (half // 2))  # scaled logit at j = S-1 is about `peak`

    def code(pos):
        phase = pos[:, None] * omega[None, :]
        return jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=-1) * amp  # [n, half]

    content = jax.random.normal(kq, (b, 1, h, half))
    q = jnp.concatenate([jnp.broadcast_to(code(jnp.asarray([s - 1.0]))[None, :, None], (b, 1, h, half)),
                         content], axis=-1)
    direction = content / jnp.linalg.norm(content, axis=-1, keepdims=True)  # [B, 1, H, half]
    tiles = jax.random.randint(kr, (b, retrieval_tiles), 1, max(2, s // block_k - 1))
    slot_tile = jnp.arange(s) // block_k
    aligned = jnp.any(slot_tile[None, :, None] == tiles[:, None, :], axis=-1)  # [B, S]
    boost = jnp.where(aligned, retrieval, 0.0).at[:, 0].set(sink) * math.sqrt(d) / math.sqrt(half)

    noise = jax.random.normal(kk, (b, s, h, half), jnp.float32)
    content_k = noise * 0.7 + boost[:, :, None, None] * direction
    pos = jnp.broadcast_to(code(jnp.arange(s, dtype=jnp.float32))[None, :, None], (b, s, h, half))
    k = jnp.concatenate([pos, content_k], axis=-1).astype(dtype)
    v = jax.random.normal(kv, (b, s, h, d), dtype)
    return q.astype(dtype), k, v


@jax.jit
def _scores(q, k, scale):
    return jnp.einsum("bhd,bshd->bhs", q[:, 0], k, preferred_element_type=jnp.float32) * scale


def derive_thresholds(q, k, lengths, k_bar, *, scale, cfg: DecodeBenchConfig, budget: float | None):
    """θ [H, S], Θ_dec [H, nk] (or None) and Δ̄ [H, S], as calibration would make them on this batch.

    All rows here have the same length n (the full cache), so each table is one value per head
    repeated over lengths; mean + σ_add·std over the batch, as in DESIGN.md's calibration.
    """
    b, s, h, _ = k.shape
    nk = s // cfg.block_k
    a = _scores(q, k, scale)  # [B, H, S]
    nth = jax.lax.top_k(a, cfg.k_top + 1)[0][..., cfg.k_top]  # [B, H]
    theta_h = jnp.mean(nth, 0) + cfg.sigma_add * jnp.std(nth, 0)
    theta = jnp.broadcast_to(theta_h[:, None], (h, s)).astype(jnp.float32)
    gate = None
    if budget is not None:
        g = jnp.einsum("bhd,bthd->bht", q[:, 0].astype(jnp.float32), k_bar) * scale  # [B, H, nk]
        optional = g[..., cfg.sink_tiles:nk - 1]
        m = tile_budget(nk - 1, budget)  # a row with nk tiles: m = max(1, ceil(f nk))
        nth_g = jax.lax.top_k(optional, m + 1)[0][..., m]
        gate_h = jnp.mean(nth_g, 0) + cfg.sigma_add * jnp.std(nth_g, 0)
        gate = jnp.broadcast_to(gate_h[:, None], (h, nk)).astype(jnp.float32)
    # Δ̄: the exact dropped mass (relative to the max over the kept tiles) under this gate and θ.
    keep_tiles = kept_tiles(q[:, 0], k_bar, lengths, jnp.zeros_like(lengths), n_tiles=nk, scale=scale,
                            block_k=cfg.block_k, tile_theta_decode=gate, sink_tiles=cfg.sink_tiles,
                            budgets=tile_budgets(nk, budget), queries_per_seq=1)
    allowed = jnp.repeat(keep_tiles, cfg.block_k, axis=-1)  # [B, H, S]
    m_row = jnp.max(jnp.where(allowed, a, -jnp.inf), -1, keepdims=True)
    kept = allowed & (a > theta_h[None, :, None])
    delta = jnp.sum(jnp.where(kept, 0.0, jnp.exp(a - m_row)), -1)  # [B, H]
    sdc = jnp.broadcast_to(jnp.mean(delta, 0)[:, None], (h, s)).astype(jnp.float32)
    return theta, gate, sdc


# ---- timing ---------------------------------------------------------------------------------


def median_seconds(fns: list[Callable[[], object]], warmup: int, repeats: int, inner: int) -> float:
    """Median seconds per call: each repeat runs `inner` calls back to back (rotating over `fns`,
    one per copy of the inputs) and waits once for the device."""
    for i in range(warmup):
        jax.block_until_ready(fns[i % len(fns)]())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [fns[i % len(fns)]() for i in range(inner)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def copy_bandwidth(n_bytes: float = 2e9, repeats: int = 10) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    x = jax.random.normal(jax.random.PRNGKey(0), (int(n_bytes // 2),), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))
    sec = median_seconds([lambda: copy(x)], 3, repeats, 5)
    return 2 * x.size * 2 / sec


# ---- dense baselines ------------------------------------------------------------------------


# ---- correctness ----------------------------------------------------------------------------


def check_correctness(cfg: DecodeBenchConfig, d: int, dtype, seed: int) -> list[dict]:
    """The kernel against `condensa.attention.attend` (float32) on ragged caches, output poisoned."""
    b, s, h = 4, cfg.check_seq_len, cfg.heads
    scale = 1.0 / math.sqrt(d)
    f = min(cfg.budgets)
    records = []
    for i, case in enumerate(("dense", f"top{cfg.k_top}", f"top{cfg.k_top}_gate{f:g}_sdc_vmc")):
        rec = dict(kind="check", head_dim=d, seq_len=s, case=case)
        try:
            q, k, v = structured_cache(jax.random.PRNGKey(seed * 10 + i), b, s, h, d, dtype, block_k=cfg.block_k,
                                       retrieval_tiles=cfg.retrieval_tiles)
            lengths = jnp.asarray([s, s - 1000 - 7 * i, s // 2 + 13, s // 3 - 5], jnp.int32)
            k_bar, v_mean = tile_state(k, v, lengths, cfg.block_k)
            gated = case.endswith("sdc_vmc")
            theta, gate, sdc = derive_thresholds(q, k, lengths, k_bar, scale=scale, cfg=cfg,
                                                 budget=f if gated else None)
            kw = dict(block_k=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, skip_v=cfg.skip_v,
                      poison_output=True)
            if case == "dense":
                out, stats = toptheta_decode(q, k, v, lengths, scale=scale, **kw)
            elif not gated:
                out, stats = toptheta_decode(q, k, v, lengths, scale=scale, theta=theta, **kw)
            else:
                out, stats = toptheta_decode(q, k, v, lengths, scale=scale, theta=theta, sdc_delta=sdc, vmc=True,
                                             v_mean=v_mean, k_tile_mean=k_bar, tile_theta_decode=gate,
                                             sink_tiles=cfg.sink_tiles, tile_budget=f, **kw)
            config = AttentionConfig(
                mode="dense" if case == "dense" else "toptheta", sdc="calibrated" if gated else "none", vmc=gated,
                k=1, tile_gate=gated, block_q=cfg.block_k, block_k=cfg.block_k, tile_budget=f,
                sink_tiles=cfg.sink_tiles)
            nk = s // cfg.block_k
            th = Thresholds(theta=theta[None], sdc_delta=sdc[None],
                            tile_theta=jnp.zeros((1, h, nk)) if gated else None,
                            tile_theta_decode=gate[None] if gated else None, k=1)
            visible = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
            f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
            ref, _ = jax.jit(attend, static_argnames=("scale", "layer_idx", "config"))(
                f32(q), f32(k), f32(v), visible=visible, scale=scale, layer_idx=0, config=config,
                thresholds=None if case == "dense" else th)
            err = relative_error(out, ref)
            rec.update(rel_error=err, ok=bool(err < cfg.check_tol),
                       k_fraction=float(stats.k_loaded / stats.visible),
                       v_fraction=float(stats.v_loaded / stats.visible))
        except Exception as err:
            traceback.print_exc()
            rec.update(rel_error=float("inf"), ok=False, error=f"{type(err).__name__}: {str(err)[:300]}")
        records.append(rec)
    return records


# ---- the benchmark --------------------------------------------------------------------------


def time_shape(cfg: DecodeBenchConfig, b: int, s: int, d: int, dtype, copy_bw: float, tune: bool = False) -> list[dict]:
    h = cfg.heads
    scale = 1.0 / math.sqrt(d)
    itemsize = jnp.dtype(dtype).itemsize
    kv_bytes = 2 * b * s * h * d * itemsize
    layers = cfg.layers
    copies = layers if layers > 1 else int(max(1, min(16, math.ceil(cfg.rotate_bytes / kv_bytes))))
    lengths = jnp.full((b,), s, jnp.int32)
    sets = []
    for c in range(copies):
        q, k, v = structured_cache(jax.random.PRNGKey(1000 * c + s + d + b), b, s, h, d, dtype, block_k=cfg.block_k,
                                   retrieval_tiles=cfg.retrieval_tiles)
        k_bar, v_mean = tile_state(k, v, lengths, cfg.block_k)
        sets.append(dict(q=q, k=k, v=v, k_bar=k_bar, v_mean=v_mean))
    base = dict(kind="time", batch=b, seq_len=s, head_dim=d, heads=h, copies=copies, layers=layers,
                dense_bytes=kv_bytes)
    records = []

    def record(name, per_set, moved_bytes=None, **info):
        """Times `per_set(st)` (one decode attention on one cache). With `layers` > 1, one jitted call
        runs it on every cache in turn, as a model's decode step runs its layers; the time is per layer."""
        rec = dict(base, method=name, **info)
        try:
            if layers > 1:
                step = jax.jit(lambda all_sets: [per_set(st) for st in all_sets])
                fns = [lambda: step(sets)]
            else:
                fns = [lambda st=st: per_set(st) for st in sets]
            sec = median_seconds(fns, cfg.warmup, cfg.repeats, cfg.inner) / layers
            moved = kv_bytes if moved_bytes is None else moved_bytes
            rec.update(us=sec * 1e6, bandwidth_gbs=moved / sec / 1e9, bandwidth_frac=moved / sec / copy_bw,
                       dense_equiv_gbs=kv_bytes / sec / 1e9)
        except Exception as err:
            traceback.print_exc()
            rec.update(error=f"{type(err).__name__}: {str(err)[:300]}")
        print(jsonio.dumps(rec), flush=True)
        records.append(rec)

    baselines = dense_baselines(cfg.baselines, scale)
    if "pallas_decode" in baselines:
        for st in sets:
            st["k_t"], st["v_t"] = head_major(st["k"]), head_major(st["v"])
    for name, fn in baselines.items():
        record(name, lambda st, fn=fn: fn(st["q"], st["k"], st["v"], st.get("k_t"), st.get("v_t"), lengths))
    for st in sets:
        st.pop("k_t", None), st.pop("v_t", None)

    kw = dict(scale=scale, block_k=cfg.block_k, num_splits=cfg.num_splits or None, num_warps=cfg.num_warps,
              num_stages=cfg.num_stages, skip_v=cfg.skip_v)
    tile_bytes = cfg.block_k * d * itemsize
    state_bytes = b * h * (s // cfg.block_k) * d * 4  # k̄ read by the gate pre-pass (float32)

    def kernel(name, budget, options=None, **extra):
        st0 = sets[0]
        theta, gate, sdc = derive_thresholds(st0["q"], st0["k"], lengths, st0["k_bar"], scale=scale, cfg=cfg,
                                             budget=budget)
        args = {}
        if extra.pop("theta", False):
            args["theta"] = theta
        if budget is not None:
            args.update(tile_theta_decode=gate, sink_tiles=cfg.sink_tiles, tile_budget=budget)
        compensated = extra.pop("compensated", False)
        jitted = extra.pop("jitted", cfg.jit)
        if compensated:
            args.update(sdc_delta=sdc, vmc=True)

        per_copy = (["k_tile_mean"] if budget is not None else []) + (["v_mean"] if compensated else [])
        fixed = {**kw, **(options or {}), **args}
        # One compilation for every copy of the inputs; the output only, so that the stats' reductions
        # are not timed (inside a --layers step XLA drops them too).
        fast = jit_with_options(lambda *a, **o: toptheta_decode(*a, **o)[0], **fixed)

        def copy_arrays(st):
            return {name: st["k_bar" if name == "k_tile_mean" else "v_mean"] for name in per_copy}

        def call(st):
            return toptheta_decode(st["q"], st["k"], st["v"], lengths, **fixed, **copy_arrays(st))

        def output(st):
            if not jitted:
                return call(st)[0]
            return fast(st["q"], st["k"], st["v"], lengths, **copy_arrays(st))

        try:
            _, stats = call(st0)
            k_frac = float(stats.k_loaded / stats.visible)
            v_frac = float(stats.v_loaded / stats.visible)
            v_row_frac = float(stats.v_rows / (stats.visible * cfg.block_k))
            moved = (int(stats.k_loaded) * tile_bytes + int(stats.v_rows) * d * itemsize
                     + (state_bytes if budget else 0))
        except Exception as err:
            traceback.print_exc()
            rec = dict(base, method=name, error=f"{type(err).__name__}: {str(err)[:300]}")
            print(jsonio.dumps(rec), flush=True)
            records.append(rec)
            return
        record(name, output, moved_bytes=moved, k_fraction=k_frac,
               v_fraction=v_frac, v_row_fraction=v_row_frac, budget=budget, **(options or {}))

    kernel("condensa_dense", None)
    kernel(f"condensa_top{cfg.k_top}", None, theta=True)
    for f in cfg.budgets:
        kernel(f"condensa_top{cfg.k_top}_gate{f:g}", f, theta=True)
    f = min(cfg.budgets)
    kernel(f"condensa_top{cfg.k_top}_gate{f:g}_sdc_vmc", f, theta=True, compensated=True)
    if tune:
        auto = default_num_splits(b * h, s // cfg.block_k)
        other = "rows" if cfg.skip_v == "blocks" else "blocks"  # "auto" is rows on the GPU
        if layers == 1:  # with layers, every call runs inside the step's jit
            kernel(f"tune_top{cfg.k_top}_gate{f:g}_{'eager' if cfg.jit else 'jit'}", f, theta=True, jitted=not cfg.jit)
        kernel(f"tune_top{cfg.k_top}_gate{f:g}_skipv_{other}", f, theta=True, options=dict(skip_v=other))
        kernel(f"tune_top{cfg.k_top}_skipv_{other}", None, theta=True, options=dict(skip_v=other))
        for warps, splits in ((2, auto), (8, auto), (4, max(1, auto // 2)), (4, 2 * auto), (4, 1)):
            kernel(f"tune_top{cfg.k_top}_gate{f:g}_w{warps}_s{splits}", f, theta=True,
                   options=dict(num_warps=warps, num_splits=splits))
        kernel(f"tune_dense_w8_s{auto}", None, options=dict(num_warps=8, num_splits=auto))
        record(f"gate_prepass_only_gate{f:g}", lambda st: _prepass(st, lengths, scale, cfg, f), moved_bytes=state_bytes)
    return records


def _prepass(st, lengths, scale, cfg: DecodeBenchConfig, budget: float):
    """The gate's pre-pass alone (scores of k̄, thresholds, compaction): its share of a decode step."""
    h, nk = st["q"].shape[2], st["k_bar"].shape[1]
    gate = jnp.zeros((h, nk), jnp.float32)
    return _prepass_jit(st["q"][:, 0], st["k_bar"], lengths, gate, tile_budgets(nk, budget), scale=scale,
                        block_k=cfg.block_k, sink_tiles=cfg.sink_tiles)


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "sink_tiles"))
def _prepass_jit(q, k_bar, lengths, gate, budgets, *, scale, block_k, sink_tiles):
    keep = kept_tiles(q, k_bar, lengths, jnp.zeros_like(lengths), n_tiles=k_bar.shape[1], scale=scale,
                      block_k=block_k, tile_theta_decode=gate, sink_tiles=sink_tiles, budgets=budgets,
                      queries_per_seq=1)
    return compact(keep), jnp.sum(keep, axis=-1)


def run(cfg: DecodeBenchConfig) -> list[dict]:
    check_kernel_shapes(cfg.dtype, cfg.head_dims)
    if cfg.skip_v not in (*SKIP_V_MODES, "auto"):
        raise ConfigError(f"skip_v={cfg.skip_v!r} is not supported; choose one of {', '.join(SKIP_V_MODES)} or 'auto'.")
    for s in cfg.seq_lens:
        if s % cfg.block_k or s // cfg.block_k < 4:
            raise ConfigError(f"seq_lens must be multiples of block_k={cfg.block_k} with at least 4 tiles; got {s}.")
    if not cfg.budgets:
        raise ConfigError("budgets must name at least one tile budget f, e.g. --budgets [0.125].")
    if cfg.layers < 1:
        raise ConfigError(f"layers must be >= 1 (caches timed in one jitted step); got {cfg.layers}.")
    if cfg.layers > 1 and not cfg.jit:
        raise ConfigError("--layers N times N calls inside one jitted step, so nothing runs eagerly there; "
                          "drop --jit false, or use --layers 1 to time eager calls.")
    if jax.default_backend() != "gpu":
        print(f"warning: JAX runs on {jax.default_backend()!r}; timings are not meaningful there.", file=sys.stderr)
    started = time.perf_counter()
    dtype = jnp.dtype(cfg.dtype)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", config_to_dict(cfg))
    results_path = out_dir / "results.jsonl"
    records: list[dict] = []

    def emit(rec):
        append_jsonl(results_path, rec)
        records.append(rec)
        print(jsonio.dumps(rec), flush=True)

    emit(dict(kind="env", device=jax.devices()[0].device_kind, jax=jax.__version__, backend=jax.default_backend()))
    if cfg.check:
        for d in cfg.head_dims:
            for rec in check_correctness(cfg, d, dtype, seed=d):
                emit(rec)
    copy_bw = copy_bandwidth()
    emit(dict(kind="copy", bandwidth_gbs=copy_bw / 1e9))

    shapes = [(b, s, d) for s in cfg.seq_lens for b in cfg.batches for d in cfg.head_dims]
    for i, (b, s, d) in enumerate(progress(shapes, desc="decode")):
        if cfg.time_budget_s and time.perf_counter() - started > cfg.time_budget_s:
            emit(dict(kind="skipped", batch=b, seq_len=s, head_dim=d, reason="time_budget_s reached"))
            continue
        try:
            for rec in time_shape(cfg, b, s, d, dtype, copy_bw, tune=cfg.tune and i == 0):
                append_jsonl(results_path, rec)
                records.append(rec)
        except Exception as err:  # e.g. out of memory at the largest shape: a result, not a crash
            traceback.print_exc()
            emit(dict(kind="time", batch=b, seq_len=s, head_dim=d, error=f"{type(err).__name__}: {str(err)[:300]}"))
    table = summary_table(records)
    (out_dir / "summary.md").write_text(table + "\n")
    print(table)
    return records


def summary_table(records: list[dict]) -> str:
    """Markdown: one row per (shape, method): µs, × best dense, K/V fractions, bandwidth."""
    env = next((r for r in records if r.get("kind") == "env"), {})
    copy = next((r for r in records if r.get("kind") == "copy"), {})
    lines = [f"device: {env.get('device')}, jax {env.get('jax')}; copy bandwidth "
             f"{copy.get('bandwidth_gbs', 0):.0f} GB/s (read + write)", "",
             "| B | S | hd | method | µs | × best dense | K blocks | V blocks | V rows | GB/s moved | of copy bw |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    times = [r for r in records if r.get("kind") == "time" and "method" in r]
    best: dict[tuple, float] = {}
    for r in times:
        if "us" in r and r["method"] in ("xla", "cudnn", "pallas_decode"):
            key = (r["batch"], r["seq_len"], r["head_dim"])
            best[key] = min(best.get(key, float("inf")), r["us"])
    for r in times:
        key = (r["batch"], r["seq_len"], r["head_dim"])
        if "us" not in r:
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {r['method']} | error | | | | | | |")
            continue
        speed = f"{best[key] / r['us']:.2f}" if key in best else ""
        kf = f"{r['k_fraction']:.3f}" if "k_fraction" in r else ""
        vf = f"{r['v_fraction']:.3f}" if "v_fraction" in r else ""
        vr = f"{r['v_row_fraction']:.4f}" if "v_row_fraction" in r else ""
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {r['method']} | {r['us']:.1f} | {speed} | {kf} | {vf} | "
                     f"{vr} | "
                     f"{r['bandwidth_gbs']:.0f} | {r['bandwidth_frac']:.2f} |")
    lines += correctness_summary(records, lambda w: f"{w['case']}, hd={w['head_dim']}")
    skipped = [r for r in records if r.get("kind") == "skipped"]
    if skipped:
        names = ", ".join(f"B{r['batch']} S{r['seq_len']} hd{r['head_dim']}" for r in skipped)
        lines.append(f"skipped (time budget): {names}")
    return "\n".join(lines)


PARSER = dict(  # the command line, shared by main() and build_parser()
    prog="python -m condensa.eval.bench decode",
    description="Time decode attention on a GPU: condensa's Pallas Top-θ decode kernel (dense, Top-θ, "
                "tile-gated) against XLA, cuDNN and JAX's Pallas decode kernel, after a correctness check, "
                "with the achieved bandwidth against the device's copy bandwidth. Options are "
                "DecodeBenchConfig fields, given in a YAML file and/or as --field value overrides "
                "(lists as [a,b]).",
)


def build_parser():
    """This tool's argparse parser (for --help and docs/cli.md)."""
    return config_parser(DecodeBenchConfig, **PARSER)


@run_main
def main(argv: Sequence[str] | None = None) -> None:
    run(parse_config_args(argv, DecodeBenchConfig, **PARSER))


if __name__ == "__main__":
    sys.exit(main())

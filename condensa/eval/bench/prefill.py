"""Prefill attention benchmark: condensa's Pallas kernel (dense and Top-θ) against cuDNN, JAX's
Pallas flash attention and dense XLA. Run on a GPU:

    python -m condensa.eval.bench prefill --out_dir runs/bench_prefill
    python -m condensa.eval.bench.prefill --seq_lens [8192] --head_dims [64]   # same, one shape

It checks correctness first (relative error against the jnp reference on fresh random inputs, with
the kernel's output poisoned with NaN before each run), then times every method with warm-up and
the median over repeats. Thresholds come from the benchmark's own structured inputs (positional
keys and queries, so attention is local plus a sink, as in a trained model): θ is the per-row
(k+1)-th largest score of batch element 0, Θ the per-tile (m_b+1)-th largest pooled gate score
averaged over the batch; see docs/benchmarks.md. Writes config.json, results.jsonl and summary.md
into the output folder.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from condensa import jsonio
from condensa.kernels.tiling import tile_budget
from condensa.cli import config_parser, parse_config_args, append_jsonl, config_to_dict, progress, run_main, write_json
from condensa.errors import ConfigError
from condensa.eval.bench.timing import check_kernel_shapes, correctness_summary, environment, measure, relative_error
from condensa.kernels import (compact_tile_lists, gate_scores, offdiagonal_keep, toptheta_prefill,
                              toptheta_prefill_reference)


@dataclasses.dataclass
class PrefillBenchConfig:
    """What to time. `tokens` fixes batch x heads x T per call, so every T fills the GPU alike."""

    out_dir: str = "runs/bench_prefill"  # writes config.json, results.jsonl, summary.md here
    seq_lens: list[int] = dataclasses.field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])  # lengths T timed
    head_dims: list[int] = dataclasses.field(default_factory=lambda: [64, 128])  # head dimensions timed (64 or 128)
    heads: int = 16  # attention heads per call
    tokens: int = 2_097_152  # batch x heads x T per call; batch = tokens / (heads T)
    dtype: str = "bfloat16"  # bfloat16, float16 or float32
    k_top: int = 64  # Top-θ k: θ is each row's (k+1)-th largest score
    budgets: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.125, 0.0625])  # gate budgets f timed
    compensated_budget: float = 0.125  # one extra gated run with calibrated SDC + VMC (0: none)
    block_q: int = 128  # kernel query tile size
    block_k: int = 128  # kernel key tile size
    num_warps: int = 0  # 0: 4 for head_dim 64, 8 for 128
    num_stages: int = 3  # Triton pipeline stages
    heavy_first: bool = True  # launch the longest (last) query tiles first
    baselines: list[str] = dataclasses.field(default_factory=lambda: ["cudnn", "pallas_mha", "xla"])  # any subset of these
    xla_max_gb: float = 16.0  # dense XLA materialises [B, H, T, T]: skip it above this size
    warmup: int = 3  # untimed calls before timing
    repeats: int = 20  # timed calls; the median is reported
    check: bool = True  # check kernel vs reference before timing
    check_tol: float = 2e-2  # max relative error that passes the check
    tune: bool = False  # also sweep kernel tile shapes / warps / stages for the dense mode
    tune_seq_len: int = 8192  # T for tune and tune_sparse
    tune_sparse: bool = False  # also time the sparse modes' parts per tile shape, at tune_seq_len


# ---- inputs and thresholds ------------------------------------------------------------------


def structured_qkv(key, b: int, t: int, h: int, d: int, dtype, peak: tuple[float, float] = (4.0, 9.0),
                   sink: float = 3.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries and keys with positional structure, so attention is local with a long tail, as in
    trained models: half of each vector is `[cos(ω i), sin(ω i)]` over geometric ω (their product
    is Σ_f cos(ω_f (i - j)), largest at j = i), the other half content noise (logit std 0.7).
    Head h's local peak is `peak` logits (spread over heads); key 0 is a sink, `sink` logits up."""
    kq, kk, kv, ka = jax.random.split(key, 4)
    n_freq = d // 4
    omega = jnp.geomspace(1.0, 4.0 / t, n_freq)
    phase = jnp.arange(t, dtype=jnp.float32)[:, None] * omega[None, :]
    pos = jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=-1) / math.sqrt(n_freq)  # [T, d/2]
    amplitude = jnp.sqrt(jnp.linspace(*peak, h)) * d**0.25  # scaled logit at j = i is `peak`
    pos = jnp.broadcast_to(pos[None, :, None, :] * amplitude[None, None, :, None], (b, t, h, d // 2))
    q = jnp.concatenate([pos, jax.random.normal(kq, (b, t, h, d // 2))], axis=-1)
    k = jnp.concatenate([pos, jax.random.normal(kk, (b, t, h, d // 2))], axis=-1)
    direction = jax.random.normal(ka, (h, d))
    direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
    q = q + 0.3 * d**0.25 * direction[None, None]
    k = k.at[:, 0].add(sink / 0.3 * d**0.25 * direction[None])
    v = jax.random.normal(kv, (b, t, h, d))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


@functools.partial(jax.jit, static_argnames=("k_top", "chunk"))
def row_thresholds(q, k, scale, k_top: int, chunk: int = 1024):
    """θ[h, i] = (k+1)-th largest score of row i (batch element 0), -inf for rows with n <= k;
    Δ̄[h, i] = Σ of exp(a - m) over the rest of the row (the exact SDC of top-k)."""
    q0, k0 = q[0].astype(jnp.float32), k[0].astype(jnp.float32)  # [T, H, D]
    t = q0.shape[0]
    chunk = min(chunk, t)
    if t % chunk:
        raise ConfigError(f"sequence length {t} must be a multiple of {chunk} for the threshold pass.")

    def rows(start):
        qc = jax.lax.dynamic_slice_in_dim(q0, start, chunk, axis=0)
        a = jnp.einsum("qhd,khd->hqk", qc, k0) * scale
        i = start + jnp.arange(chunk)
        visible = jnp.arange(t)[None, :] <= i[:, None]
        a = jnp.where(visible[None], a, -jnp.inf)
        top = jax.lax.top_k(a, k_top + 1)[0]
        m = top[..., 0]
        theta = jnp.where(i[None] + 1 > k_top, top[..., k_top], -jnp.inf)
        total = jnp.sum(jnp.exp(a - m[..., None]), -1)
        kept = jnp.sum(jnp.exp(top[..., :k_top] - m[..., None]), -1)
        return theta, jnp.maximum(total - kept, 0.0)

    theta, delta = jax.lax.map(rows, jnp.arange(0, t, chunk))  # [n_chunks, H, chunk]
    fold = lambda x: jnp.transpose(x, (1, 0, 2)).reshape(x.shape[1], t)  # noqa: E731
    return fold(theta), fold(delta)


def tile_thresholds(q, k, scale, f: float, block_q: int, block_k: int, sink_tiles: int = 1) -> jax.Array:
    """Θ[h, b] = mean over the batch of the (m_b+1)-th largest optional gate score of query tile b
    (DESIGN.md's calibration with σ_add = 0); -inf where a tile has no more than m_b optional tiles."""
    t = q.shape[1]
    scores = np.asarray(gate_scores(q, k, scale=scale, block_q=block_q, block_k=block_k, length=t))
    b, h, nq, nk = scores.shape
    ratio = block_q // block_k
    out = np.full((h, nq), -np.inf, np.float32)
    for qt in range(nq):
        optional = scores[:, :, qt, sink_tiles: qt * ratio]
        m_b = tile_budget(qt, f)
        if optional.shape[-1] > m_b:
            nth = -np.sort(-optional, axis=-1)[..., m_b]  # [B, H]
            out[:, qt] = nth.mean(axis=0)
    return jnp.asarray(out)


# ---- timing ---------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], jax.Array], warmup: int, repeats: int) -> float:
    """Median seconds per call of `fn()` (the shared timing helper: warm-up, blocked repeats)."""
    return measure(fn, warmup=warmup, repeats=repeats)["median_s"]


def causal_flops(b: int, h: int, t: int, d: int) -> float:
    """FLOPs of dense causal attention (Q·Kᵀ and P·V over the visible half)."""
    return 4.0 * b * h * d * t * (t + 1) / 2


# ---- the benchmark --------------------------------------------------------------------------


def _kernel_kwargs(cfg: PrefillBenchConfig, **over):
    kw = dict(block_q=cfg.block_q, block_k=cfg.block_k, num_warps=cfg.num_warps or None,
              num_stages=cfg.num_stages, heavy_first=cfg.heavy_first)
    kw.update(over)
    return kw


def check_correctness(cfg: PrefillBenchConfig, t: int, d: int, dtype, seed: int) -> list[dict]:
    """Kernel vs reference on fresh inputs (2 heads, batch 1), output poisoned before each run."""
    scale = 1.0 / math.sqrt(d)
    records = []
    cases = [("dense", {}), ("toptheta", {}), ("gated+sdc+vmc", {})]
    for i, (name, _) in enumerate(cases):
        key = jax.random.PRNGKey(seed * 100 + i)
        if name == "dense":
            q, k, v = (jax.random.normal(kk, (1, t, 2, d)).astype(dtype) for kk in jax.random.split(key, 3))
            extra = {}
        else:
            q, k, v = structured_qkv(key, 1, t, 2, d, dtype)
            # θ and Δ̄ from another draw, as calibration on held-out text: θ taken from these very
            # scores would sit exactly on an element and turn rounding into flipped elements.
            theta, delta = row_thresholds(*structured_qkv(jax.random.fold_in(key, 1), 1, t, 2, d, dtype)[:2],
                                          scale, cfg.k_top)
            extra = dict(theta=theta)
            if name.startswith("gated"):
                extra.update(sdc_delta=delta, vmc=True,
                             tile_theta=tile_thresholds(q, k, scale, cfg.compensated_budget or 0.125,
                                                        cfg.block_q, cfg.block_k),
                             tile_budget=cfg.compensated_budget or 0.125)
        rec = dict(kind="check", seq_len=t, head_dim=d, case=name)
        try:
            out, stats = toptheta_prefill(q, k, v, scale=scale, poison_output=True,
                                          **_kernel_kwargs(cfg), **extra)
            ref = toptheta_prefill_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                             v.astype(jnp.float32), scale=scale, block_q=cfg.block_q,
                                             block_k=cfg.block_k, **extra)
            err = relative_error(out, ref)
            rec.update(rel_error=err, ok=bool(err < cfg.check_tol),
                       tile_fraction=float(stats.listed / stats.causal))
        except Exception as err:
            traceback.print_exc()
            rec.update(rel_error=float("inf"), ok=False, error=f"{type(err).__name__}: {str(err)[:300]}")
        records.append(rec)
    return records


def methods_for(cfg: PrefillBenchConfig, q, k, v, scale) -> dict[str, tuple[Callable, dict]]:
    """name -> (zero-argument function returning the output, extra fields for the record)."""
    b, t, h, d = q.shape
    out: dict[str, tuple[Callable, dict]] = {}
    def library(name, fn):
        jitted = jax.jit(fn)
        out[name] = (lambda: jitted(q, k, v), {})

    if "xla" in cfg.baselines and b * h * t * t * 4 / 2**30 <= cfg.xla_max_gb:
        library("xla", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                                   implementation="xla"))
    if "cudnn" in cfg.baselines:
        library("cudnn", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                                     implementation="cudnn"))
    if "pallas_mha" in cfg.baselines:
        from jax.experimental.pallas.ops.gpu.attention import mha

        library("pallas_mha", lambda q, k, v: mha(q, k, v, segment_ids=None, sm_scale=scale, causal=True))

    def kernel(name, **extra):
        stats = toptheta_prefill(q, k, v, scale=scale, **_kernel_kwargs(cfg), **extra)[1]
        info = dict(tile_fraction=float(stats.listed / stats.causal),
                    empty_fraction=float(stats.empty / max(int(stats.visited), 1)))
        out[name] = (lambda: toptheta_prefill(q, k, v, scale=scale, **_kernel_kwargs(cfg), **extra)[0], info)

    kernel("condensa_dense")
    theta, delta = row_thresholds(q, k, scale, cfg.k_top)
    kernel(f"condensa_top{cfg.k_top}", theta=theta)
    for f in cfg.budgets:
        tile_theta = tile_thresholds(q, k, scale, f, cfg.block_q, cfg.block_k)
        kernel(f"condensa_top{cfg.k_top}_gate{f:g}", theta=theta, tile_theta=tile_theta, tile_budget=f)
    if cfg.compensated_budget:
        f = cfg.compensated_budget
        tile_theta = tile_thresholds(q, k, scale, f, cfg.block_q, cfg.block_k)
        kernel(f"condensa_top{cfg.k_top}_gate{f:g}_sdc_vmc", theta=theta, tile_theta=tile_theta,
               tile_budget=f, sdc_delta=delta, vmc=True)
    return out


def tune_records(cfg: PrefillBenchConfig, d: int, dtype) -> list[dict]:
    """Dense-mode timings over tile shapes, warps, stages and grid order at `tune_seq_len`."""
    t = cfg.tune_seq_len
    b = max(1, cfg.tokens // (cfg.heads * t))
    q, k, v = structured_qkv(jax.random.PRNGKey(7), b, t, cfg.heads, d, dtype)
    scale = 1.0 / math.sqrt(d)
    flops = causal_flops(b, cfg.heads, t, d)
    records = []
    variants = [(bq, bk, w, s, hf) for bq, bk in ((128, 64), (128, 128), (64, 64))
                for w in (4, 8) for s in (2, 3) for hf in (True,)]
    variants += [(128, 64, 4, 2, False), (128, 64, 8, 2, False)]
    for bq, bk, w, s, hf in variants:
        rec = dict(kind="tune", seq_len=t, head_dim=d, block_q=bq, block_k=bk, num_warps=w, num_stages=s,
                   heavy_first=hf)
        try:
            fn = jax.jit(functools.partial(toptheta_prefill, scale=scale, block_q=bq, block_k=bk,
                                           num_warps=w, num_stages=s, heavy_first=hf))
            sec = median_seconds(lambda: fn(q, k, v)[0], cfg.warmup, max(5, cfg.repeats // 2))
            rec.update(ms=sec * 1e3, tflops=flops / sec / 1e12)
        except Exception as err:  # a variant the compiler refuses is a result, not a crash
            traceback.print_exc()
            rec.update(error=f"{type(err).__name__}: {str(err)[:300]}")
        print(jsonio.dumps(rec), flush=True)
        records.append(rec)
    return records


def tune_sparse_records(cfg: PrefillBenchConfig, d: int, dtype) -> list[dict]:
    """Where the sparse modes' time goes, per tile shape: dense, Top-θ with and without the empty-tile
    check, the gate alone (dense inside kept tiles), gate + Top-θ, and the gate's pre-pass alone."""
    t = cfg.tune_seq_len
    b = max(1, cfg.tokens // (cfg.heads * t))
    q, k, v = structured_qkv(jax.random.PRNGKey(7), b, t, cfg.heads, d, dtype)
    scale = 1.0 / math.sqrt(d)
    flops = causal_flops(b, cfg.heads, t, d)
    theta, _ = row_thresholds(q, k, scale, cfg.k_top)
    f = min(cfg.budgets)
    records = []
    warps = 4 if d <= 64 else 8
    for bq, bk, w, st in ((128, 128, warps, 3), (128, 64, 4, 3), (64, 64, 4, 3)):
        tile_theta = tile_thresholds(q, k, scale, f, bq, bk)
        kw = dict(scale=scale, block_q=bq, block_k=bk, num_warps=w, num_stages=st)

        @jax.jit
        def prepass(q, k, tile_theta, bq=bq, bk=bk):
            scores = gate_scores(q, k, scale=scale, block_q=bq, block_k=bk, length=t)
            return compact_tile_lists(offdiagonal_keep(scores, tile_theta, block_q=bq, block_k=bk, sink_tiles=1,
                                                       tile_budget=f))

        parts = {
            "dense": lambda kw=kw: toptheta_prefill(q, k, v, **kw),
            "top_k": lambda kw=kw: toptheta_prefill(q, k, v, theta=theta, **kw),
            "top_k_skip": lambda kw=kw: toptheta_prefill(q, k, v, theta=theta, skip_empty=True, **kw),
            "gate_only": lambda kw=kw, tt=tile_theta: toptheta_prefill(q, k, v, tile_theta=tt, tile_budget=f, **kw),
            "gate_top_k": lambda kw=kw, tt=tile_theta: toptheta_prefill(q, k, v, theta=theta, tile_theta=tt,
                                                                        tile_budget=f, **kw),
            "gate_top_k_skip": lambda kw=kw, tt=tile_theta: toptheta_prefill(
                q, k, v, theta=theta, tile_theta=tt, tile_budget=f, skip_empty=True, **kw),
            "prepass": lambda tt=tile_theta, prepass=prepass: (prepass(q, k, tt),),
        }
        for name, fn in parts.items():
            rec = dict(kind="tune_sparse", seq_len=t, head_dim=d, block_q=bq, block_k=bk, num_warps=w,
                       num_stages=st, part=name, budget=f)
            try:
                result = fn()
                if len(result) == 2:
                    stats = result[1]
                    rec.update(tile_fraction=float(stats.listed / stats.causal),
                               empty_fraction=float(stats.empty / stats.visited))
                sec = median_seconds(lambda fn=fn: fn()[0], cfg.warmup, max(5, cfg.repeats // 2))
                rec.update(ms=sec * 1e3, tflops=flops / sec / 1e12)
            except Exception as err:
                traceback.print_exc()
                rec.update(error=f"{type(err).__name__}: {str(err)[:300]}")
            print(jsonio.dumps(rec), flush=True)
            records.append(rec)
    return records


def run(cfg: PrefillBenchConfig) -> list[dict]:
    check_kernel_shapes(cfg.dtype, cfg.head_dims)
    if jax.default_backend() != "gpu":
        print(f"warning: JAX runs on {jax.default_backend()!r}; timings are not meaningful there.",
              file=sys.stderr)
    dtype = jnp.dtype(cfg.dtype)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", config_to_dict(cfg))
    results_path = out_dir / "results.jsonl"
    header = dict(kind="env", **environment())
    append_jsonl(results_path, header)
    print(jsonio.dumps(header), flush=True)
    records: list[dict] = [header]

    if cfg.check:
        for t in cfg.seq_lens:
            for d in cfg.head_dims:
                for rec in check_correctness(cfg, t, d, dtype, seed=t + d):
                    append_jsonl(results_path, rec)
                    print(jsonio.dumps(rec), flush=True)
                    records.append(rec)
    if cfg.tune:
        for d in cfg.head_dims:
            for rec in tune_records(cfg, d, dtype):
                append_jsonl(results_path, rec)
                records.append(rec)

    shapes = [(t, d) for t in cfg.seq_lens for d in cfg.head_dims]
    for t, d in progress(shapes, desc="prefill"):
        b = max(1, cfg.tokens // (cfg.heads * t))
        q, k, v = structured_qkv(jax.random.PRNGKey(t + d), b, t, cfg.heads, d, dtype)
        scale = 1.0 / math.sqrt(d)
        flops = causal_flops(b, cfg.heads, t, d)
        try:
            methods = methods_for(cfg, q, k, v, scale)
        except Exception as err:
            traceback.print_exc()
            rec = dict(kind="time", seq_len=t, head_dim=d, error=f"{type(err).__name__}: {str(err)[:300]}")
            append_jsonl(results_path, rec)
            print(jsonio.dumps(rec), flush=True)
            continue
        for name, (fn, info) in methods.items():
            rec = dict(kind="time", seq_len=t, head_dim=d, batch=b, heads=cfg.heads, method=name, **info)
            try:
                sec = median_seconds(fn, cfg.warmup, cfg.repeats)
                rec.update(ms=sec * 1e3, tflops=flops / sec / 1e12)
            except Exception as err:
                traceback.print_exc()
                rec.update(error=f"{type(err).__name__}: {str(err)[:300]}")
            append_jsonl(results_path, rec)
            print(jsonio.dumps(rec), flush=True)
            records.append(rec)
        del q, k, v, methods
    (out_dir / "summary.md").write_text(summary_table(records) + "\n")
    if cfg.tune_sparse:  # last, so that a run cut short still has the main table
        for d in cfg.head_dims:
            for rec in tune_sparse_records(cfg, d, dtype):
                append_jsonl(results_path, rec)
                records.append(rec)
    table = summary_table(records)
    (out_dir / "summary.md").write_text(table + "\n")
    print(table)
    return records


def summary_table(records: list[dict]) -> str:
    """Markdown: one row per (T, head_dim, method) with ms, TFLOP/s, speed vs cuDNN, tile fractions."""
    env = next((r for r in records if r.get("kind") == "env"), {})
    lines = [f"device: {env.get('device')}, jax {env.get('jax')}", "",
             "| T | hd | method | ms | dense-equiv TFLOP/s | × cuDNN | tiles kept | kept tiles empty |",
             "|---|---|---|---|---|---|---|---|"]
    times = [r for r in records if r.get("kind") == "time" and "method" in r]
    cudnn = {(r["seq_len"], r["head_dim"]): r.get("ms") for r in times if r["method"] == "cudnn"}
    for r in times:
        base = cudnn.get((r["seq_len"], r["head_dim"]))
        if "ms" not in r:
            lines.append(f"| {r['seq_len']} | {r['head_dim']} | {r['method']} | error | | | | |")
            continue
        speed = f"{base / r['ms']:.2f}" if base else ""
        tiles = f"{r['tile_fraction']:.3f}" if "tile_fraction" in r else ""
        empty = f"{r['empty_fraction']:.3f}" if "empty_fraction" in r else ""
        lines.append(f"| {r['seq_len']} | {r['head_dim']} | {r['method']} | {r['ms']:.3f} | "
                     f"{r['tflops']:.0f} | {speed} | {tiles} | {empty} |")
    lines += correctness_summary(records, lambda w: f"{w['case']}, T={w['seq_len']}, hd={w['head_dim']}")
    return "\n".join(lines)


PARSER = dict(  # the command line, shared by main() and build_parser()
    prog="python -m condensa.eval.bench prefill",
    description="Time prefill attention on a GPU: condensa's Pallas Top-θ kernel (dense, Top-θ, "
                "tile-gated) against cuDNN, JAX's Pallas flash attention and dense XLA, after a "
                "correctness check. Options are PrefillBenchConfig fields, given in a YAML file "
                "and/or as --field value overrides (lists as [a,b]).",
)


def build_parser():
    """This tool's argparse parser (for --help and docs/cli.md)."""
    return config_parser(PrefillBenchConfig, **PARSER)


@run_main
def main(argv: Sequence[str] | None = None) -> None:
    run(parse_config_args(argv, PrefillBenchConfig, **PARSER))


if __name__ == "__main__":
    sys.exit(main())

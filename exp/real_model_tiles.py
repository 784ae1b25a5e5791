"""Sparse attention on a real model (SmolLM2-135M): perplexity at equal tile counts for every
selector, exact top-k, Top-θ calibrated at full length with and without compensation, and the
gated prefill's speed against cuDNN, in one GPU run.

    python exp/real_model_tiles.py --model /tmp/smollm2.gguf --out $OUT/tiles
    python exp/real_model_tiles.py --stages calibrate,topk,toptheta,compensation --seq 2048 --windows 4 \
        --ks 64,128 --dtype float32 --out runs/toptheta-2k                     # Top-θ alone, on a CPU

Stage calibrate writes thresholds-k{K}.safetensors for each k to OUT (calibrated on the books of
--calibration_config, which hold neither WikiText nor Moby-Dick); stage toptheta evaluates them
with each compensation variant; stage compensation compares, per layer and row length, the mass
Top-θ really drops on held-out windows with the calibrated Δ̄ that SDC adds instead.

Perplexity runs the model layer by layer, one jitted function per attention rule shared by all 30
layers (their parameters have one structure), so a grid of rules costs one small compile each
instead of a whole-model compile. Each window scores every position but its first; the last
`--tail` positions are also reported alone, since the long-range cost of a rule shows there.
The budgeted selectors keep exactly the mandatory tiles plus m_b per query tile, so every
selector at one f keeps the same number of tiles.

Results go to OUT/results.json, and the report `exp/real_model_report.py` renders from them to
OUT/real-model.md, both written after each stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa import AttentionConfig, load_pretrained
from condensa.data import load_tokenizer
from condensa.kernels.tiling import mandatory_tiles, optional_tiles, tile_budgets, tile_count
from condensa.sparsity.thresholds import Thresholds


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--book", default="../shared/data/corpus/gutenberg/melville-moby_dick.txt")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--tail", type=int, default=2048)
    p.add_argument("--windows", type=int, default=12, help="windows of the text for each sparse rule")
    p.add_argument("--skip_windows", type=int, default=0, help="start the sparse rules' windows after this many")
    p.add_argument("--book_windows", type=int, default=8)
    p.add_argument("--budgets", default="0.5,0.25,0.125,0.0625")
    p.add_argument("--selectors", default="oracle,oracle+shared,window,pooled,rowmean,rowmean+shared",
                   help="selector or selector/sub_block, comma-separated")
    p.add_argument("--book_selectors", default="oracle,window,rowmean+shared")
    p.add_argument("--ks", default="64,128,256,512")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--time_selectors", default="window,rowmean+shared,rowmean")
    p.add_argument("--time_budgets", default="0.4,0.25")
    p.add_argument("--time_batches", default="1,8")
    p.add_argument("--prepass_layout", default="",
                   help="the fused pre-pass's layout while timing (selector_prepass.layout_from_text, e.g. "
                        "split:2048:cw1), instead of its DEFAULT_LAYOUT")
    p.add_argument("--calibration_config", default="configs/smollm2-calibrate.yaml",
                   help="its books calibrate Top-θ (stage calibrate); Moby-Dick and WikiText stay held out")
    p.add_argument("--calibration_data", nargs="*", default=None, help="override the config's books")
    p.add_argument("--calibration_blocks", type=int, default=8, help="calibration blocks of --seq tokens")
    p.add_argument("--length_pooling", type=float, default=0.0, help="calibrate(length_pooling=...): pool row lengths")
    p.add_argument("--thresholds", default="", help="a folder of thresholds-k{K}.safetensors (stage toptheta) "
                   "instead of the ones stage calibrate writes to OUT")
    p.add_argument("--compensation", default="none,sdc+vmc,exact",
                   help="Top-θ variants per k (stage toptheta): none, vmc, and SDC sdc (calibrated Δ̄), exact (the "
                        "true Δ) or expthr (exp-threshold), each alone or with +vmc; post and post+vmc: post-softmax "
                        "placement (calibrated too)")
    p.add_argument("--dtype", default="bfloat16", help="model dtype (float32 on a CPU)")
    p.add_argument("--run", default="", help="a fine-tune's output folder (python -m condensa.train, or "
                   "exp/condense_real.py's --runs_dir/NAME): its weights replace --model's, in --dtype")
    p.add_argument("--gated", default="rowmean+shared/post+vmc",
                   help="stage gated: SELECTOR/VARIANT, the tile selector (at each of --budgets) combined with "
                        "Top-θ at each of --ks with that compensation variant (thresholds from stage calibrate)")
    p.add_argument("--decode_selectors", default="rowmean+shared",
                   help="stage decode: selectors whose every row is gated as its decoding step (teacher forced)")
    p.add_argument("--time_ks", default="",
                   help="stage time: also time --gated's selector at each --time_budgets with Top-θ at these k "
                        "(--gated's variant; thresholds from stage calibrate or --thresholds)")
    p.add_argument("--time_decode", action="store_true",
                   help="stage time: also time decode attention at --seq, batch 8, against cuDNN "
                        "(condensa.eval.bench decode, in this process)")
    p.add_argument("--stages", default="calibrate,dense,selectors,topk,toptheta,compensation,book,time",
                   help="dense, selectors, topk, book, time, calibrate, toptheta, compensation, gated, decode")
    p.add_argument("--out", default="runs/real-model-tiles")
    return p.parse_args()


class LayerRunner:
    """The model as embed -> 30 x (one jitted layer) -> per-position NLL."""

    def __init__(self, model):
        self.model = model
        self.graph, _ = nnx.split(model.layers[0])
        self.states = [nnx.split(block)[1] for block in model.layers]
        self._layers = {}

    def use(self, model) -> "LayerRunner":
        """These compiled layers on another model of the same architecture (a fine-tune)."""
        self.model, self.states = model, [nnx.split(block)[1] for block in model.layers]
        return self

    def layer_fn(self, attention):
        if attention not in self._layers:
            graph = self.graph

            @jax.jit
            def run(state, x, cos, sin, thresholds):
                block = nnx.merge(graph, state)
                t = x.shape[1]
                visible = jnp.tril(jnp.ones((t, t), bool))[None, None]
                y, _, _ = block(x, cos, sin, visible=visible, attention=attention, thresholds=thresholds,
                                need_probs=False, causal=True)
                return y

            self._layers[attention] = run
        return self._layers[attention]

    def nll(self, ids, attention, thresholds=None) -> np.ndarray:
        """float32 [B, T-1]: -log p(token t | tokens < t) for t = 1..T-1."""
        x, cos, sin = _embed(self.model, ids)
        run = self.layer_fn(attention)
        for layer, state in enumerate(self.states):
            x = run(state, x, cos, sin, layer_thresholds(thresholds, layer))
        return np.asarray(_nll(self.model, x, ids))

    def layer_inputs(self, ids, attention, thresholds=None):
        """(x entering each layer, cos, sin) with the model running `attention`."""
        x, cos, sin = _embed(self.model, ids)
        run = self.layer_fn(attention)
        inputs = []
        for layer, state in enumerate(self.states):
            inputs.append(x)
            x = run(state, x, cos, sin, layer_thresholds(thresholds, layer))
        return inputs, cos, sin


def layer_thresholds(thresholds, layer: int):
    """The thresholds of one layer as a one-layer `Thresholds` (the runner's blocks all have layer
    index 0, so one compiled layer serves the 30); None stays None."""
    if thresholds is None:
        return None
    pick = lambda a: None if a is None else jnp.asarray(a[layer:layer + 1])  # noqa: E731
    return dataclasses.replace(thresholds, theta=pick(thresholds.theta), sdc_delta=pick(thresholds.sdc_delta),
                               tile_theta=pick(thresholds.tile_theta), tile_theta_decode=pick(thresholds.tile_theta_decode),
                               layer_k=())


@nnx.jit
def _embed(model, ids):
    b, t = ids.shape
    x, (cos, sin) = model._embed(ids, jnp.broadcast_to(jnp.arange(t)[None], (b, t)))
    return x, cos, sin


@nnx.jit
def _nll(model, x, ids):
    logits = model._logits(x).astype(jnp.float32)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


def windows_of(ids: np.ndarray, seq: int, n: int | None) -> np.ndarray:
    count = len(ids) // seq if n is None else min(n, len(ids) // seq)
    return ids[: count * seq].reshape(count, seq)


def evaluate(runner, windows, attention, tail, thresholds=None) -> dict:
    total = []
    start = time.perf_counter()
    for w in windows:
        total.append(runner.nll(jnp.asarray(w[None], jnp.int32), attention, thresholds)[0])
    nll = np.stack(total)  # [N, T-1]
    whole, last = nll.mean(), nll[:, -tail:].mean()
    per_window = nll.mean(axis=1)
    return {"ppl": float(math.exp(whole)), "ppl_tail": float(math.exp(last)), "nll": float(whole),
            "nll_tail": float(last), "windows": int(len(windows)), "tokens": int(nll.size),
            "nll_per_window": per_window.tolist(), "nll_tail_per_window": nll[:, -tail:].mean(axis=1).tolist(),
            "seconds": time.perf_counter() - start}


def kept_tile_fraction(seq: int, block: int, f: float, sink: int = 1) -> float:
    """Kept / causal tiles for a budgeted selector (mandatory + min(m_b, optional) per query tile)."""
    n = tile_count(seq, block)
    mandatory = mandatory_tiles(n, n, block, block, sink).sum(axis=1)
    optional = optional_tiles(n, n, block, block, sink).sum(axis=1)
    kept = mandatory + np.minimum(optional, tile_budgets(n, f))
    return float(kept.sum() / (n * (n + 1) / 2))


def paired_delta(rule: dict, dense: dict, key: str = "nll_per_window") -> dict:
    """Δppl in % against dense on the same windows, with a 95% bootstrap interval over windows."""
    d = np.asarray(rule[key]) - np.asarray(dense[key][: len(rule[key])])
    rng = np.random.default_rng(0)
    boots = [np.mean(d[rng.integers(0, len(d), len(d))]) for _ in range(2000)]
    pct = lambda x: 100 * (math.exp(x) - 1)  # noqa: E731
    return {"delta_pct": pct(d.mean()), "lo_pct": pct(np.percentile(boots, 2.5)), "hi_pct": pct(np.percentile(boots, 97.5))}


def save(out: Path, results: dict) -> None:
    """OUT/results.json, and the report rendered from it (OUT/real-model.md), after every stage."""
    from real_model_report import render  # exp/ is on the path of a script run from it

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "real-model.md").write_text(render(results) + "\n")


def time_decode(config, args, budgets: list[float], out: Path) -> list[dict]:
    """Decode attention at the model's head shape, S = --seq, batch 8, with the gate at each budget,
    against cuDNN, XLA and JAX's Pallas decode kernel (the decode benchmark, checked before timing)."""
    from condensa.eval.bench.decode import DecodeBenchConfig, run

    heads = config.num_attention_heads
    return run(DecodeBenchConfig(out_dir=str(out / "decode"), batches=[8], seq_lens=[args.seq],
                                 head_dims=[config.hidden_size // heads], heads=heads, budgets=budgets))


def time_prefill(model, seq: int, batches: list[int], rules: dict[str, AttentionConfig],
                 thresholds: dict | None = None) -> dict:
    """Whole-model prefill (logits of every position) per rule, median of repeats, after a check
    that each rule's logits match the same rule on the reference backend. `thresholds`: a rule's
    name -> its Top-θ thresholds (a pytree argument of the jitted forward)."""
    from condensa.eval.bench.timing import measure

    graphdef, state = nnx.split(model)

    def forward(attention):
        @jax.jit
        def run(state, ids, thresholds):
            m = nnx.merge(graphdef, state)
            # the last position: what generation needs
            return m(ids, attention=attention, thresholds=thresholds).logits[:, -1]
        return run

    out = {}
    rng = np.random.default_rng(0)
    for batch in batches:
        ids = jnp.asarray(rng.integers(0, model.config.vocab_size, (batch, seq)), jnp.int32)
        row = {}
        for name, attention in rules.items():
            run, theta = forward(attention), (thresholds or {}).get(name)
            result = run(state, ids, theta)
            if attention.backend == "pallas" and batch == batches[0]:
                ref = forward(attention.replace(backend="reference"))(state, ids, theta)
                err = float(jnp.linalg.norm(result - ref) / jnp.linalg.norm(ref))
                row[name + ":rel_err_vs_reference"] = err
            timing = measure(lambda: run(state, ids, theta), warmup=2, repeats=7)
            row[name] = timing["median_s"]
        out[str(batch)] = row
        print(batch, row, flush=True)
    return out


def time_prepass(model, ids, layer: int, rules: dict[str, AttentionConfig]) -> dict:
    """One layer's q, k, v from real text: the gated kernel's time, its pre-pass alone (the fused one
    where the kernel runs it, and the XLA one), and cuDNN's."""
    from condensa.eval.bench.timing import measure_unrolled
    from condensa.kernels import toptheta_prefill
    from condensa.kernels.selector_prepass import fused_prepass_supported, fused_prepass_table
    from condensa.kernels.tile_gate_prepass import compact_tile_lists, prepass_keep

    captured = model.walk_layers(ids, AttentionConfig(), None, lambda l, q, k, v, scale: (q, k, v, scale))
    q, k, v, scale = captured[layer]
    hkv = model.config.n_kv_head
    k, v = k[:, :, :: q.shape[2] // hkv], v[:, :, :: q.shape[2] // hkv]  # walk_layers repeats KV heads
    t = q.shape[1]
    implementation = "cudnn" if jax.default_backend() == "gpu" else None  # asked here, not at import: that starts JAX
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                                  implementation=implementation))
    input_sets = [((q.astype(jnp.float32) * (1 + 1e-3 * i)).astype(q.dtype), k, v) for i in range(10)]

    def timed(fn):  # device time of fn(q, k, v): ten calls on different q in one jit, one dispatch
        return measure_unrolled(fn, input_sets)["median_s"]

    out = {"cudnn": timed(cudnn), "dtype": str(q.dtype), "shape": list(q.shape)}
    for name, attention in rules.items():
        if attention.tile_selector == "gate" or attention.mode == "toptheta":  # the tile selection alone
            continue
        kernel = jax.jit(lambda q, k, v, a=attention: toptheta_prefill(
            q, k, v, scale=scale, tile_selector=a.tile_selector, tile_budget=a.tile_budget, block_q=a.block_q,
            block_k=a.block_k, sub_block=a.sub_block or None, shared_heads=a.shared_heads)[0])

        @jax.jit
        def prepass(q, k, a=attention):  # the XLA pre-pass: scores and cut, then the lists
            keep = prepass_keep(q, k, None, scale=scale, block_q=a.block_q, block_k=a.block_k, length=t,
                                sink_tiles=a.sink_tiles, tile_budget=a.tile_budget, tile_cap=False,
                                selector=a.tile_selector, sub_block=a.sub_block or None, shared_heads=a.shared_heads)
            return compact_tile_lists(keep)

        out[name] = {"kernel": timed(kernel), "prepass_xla": timed(lambda q, k, v, p=prepass: p(q, k))}
        if fused_prepass_supported(attention.tile_selector, attention.sub_block or None, attention.block_k, "triton"):
            fused = jax.jit(lambda q, k, a=attention: fused_prepass_table(
                q, k, scale=scale, block_q=a.block_q, block_k=a.block_k, length=t, sink_tiles=a.sink_tiles,
                tile_budget=a.tile_budget, selector=a.tile_selector, shared_heads=a.shared_heads, backend="triton"))
            out[name]["prepass_fused"] = timed(lambda q, k, v, f=fused: f(q, k))  # what the kernel runs
        out[name]["prepass"] = out[name].get("prepass_fused", out[name]["prepass_xla"])
        out[name]["prepass_fraction"] = out[name]["prepass"] / out[name]["kernel"]
        print("layer", layer, name, out[name], "cudnn", out["cudnn"], flush=True)
    return out


# ---- Top-θ on the real model: calibration at full length, then each k with and without compensation ----


def threshold_path(folder, k: int, placement: str = "pre") -> Path:
    return Path(folder) / f"thresholds-k{k}{'' if placement == 'pre' else '-' + placement}.safetensors"


def placements(variants: str) -> list[str]:
    """The placements the Top-θ variants need thresholds for ("post..." variants: post-softmax)."""
    names = variants.split(",")
    return [p for p, needed in (("pre", any(not v.startswith("post") for v in names)),
                                ("post", any(v.startswith("post") for v in names))) if needed]


def calibrate_stage(model, tokenizer, args, ks: list[int], variants: str, out: Path) -> dict:
    """Top-θ thresholds for each k on --calibration_blocks blocks of --seq tokens from the
    calibration books (no gate), written to OUT; the time each took and the process's peak memory
    after it (the device's peak covers everything the process ran before, so this stage runs first)."""
    import yaml

    from condensa.eval.bench.memory import peaks
    from condensa.sparsity.calibration import CalibrationConfig, calibrate, load_blocks

    books = args.calibration_data or yaml.safe_load(Path(args.calibration_config).read_text())["data"]
    settings = CalibrationConfig(model=args.model, data=tuple(books), samples=args.calibration_blocks,
                                 seq_len=args.seq, batch_size=1, check_blocks=0, out=str(out))
    blocks, _ = load_blocks(settings, tokenizer, args.seq)
    report = {"books": list(books), "blocks": int(len(blocks)), "seq": args.seq, "per_k": {}}
    for placement in placements(variants):
        for k in ks:
            start = time.perf_counter()
            thresholds = calibrate(model, blocks, k=k, placement=placement, batch_size=1,
                                   length_pooling=args.length_pooling, data=",".join(books))
            seconds = time.perf_counter() - start
            thresholds.save(threshold_path(out, k, placement))
            key = str(k) if placement == "pre" else f"{k} ({placement})"
            report["per_k"][key] = {"seconds": seconds, **peaks()}
            print("calibrated k", key, report["per_k"][key], flush=True)
    return report


def gate_rule(spec: str, f: float, block: int) -> AttentionConfig:
    """A tile rule from "selector", "selector/sub_block", with "+shared" for one budget across heads, at f."""
    spec, shared = spec.removesuffix("+shared"), spec.endswith("+shared")
    selector, _, sub = spec.partition("/")
    return AttentionConfig(tile_gate=True, tile_selector=selector, tile_budget=f, block_q=block, block_k=block,
                           sub_block=int(sub or 0), shared_heads=shared)


def toptheta_rule(k: int, variant: str, base: AttentionConfig | None = None) -> AttentionConfig:
    """Top-θ at k with a compensation variant "SDC[+vmc]": SDC none, sdc (the calibrated Δ̄), exact
    (the true Δ: what calibrated SDC approximates at best) or expthr (DESIGN.md's exp-threshold
    estimate from the count of dropped elements); "+vmc" adds V-mean compensation ("vmc" alone:
    VMC without SDC). "post[+vmc]": post-softmax placement instead (thresholds on probabilities)."""
    base = base or AttentionConfig()
    sdc, _, vmc = variant.partition("+")
    vmc = vmc == "vmc" or variant == "vmc"
    if sdc == "post":  # post-softmax placement, as the reference: no renormalisation, no SDC
        return base.replace(mode="toptheta", k=k, placement="post", vmc=vmc)
    sdc = {"none": "none", "vmc": "none", "sdc": "calibrated", "exact": "exact", "expthr": "exp-threshold"}[sdc]
    return base.replace(mode="toptheta", k=k, sdc=sdc, vmc=vmc)


@functools.partial(jax.jit, static_argnames=("graph", "k_max"))
def _kept_and_dropped(graph, state, x, cos, sin, theta, k_l, k_max):
    """One layer's rows under Top-θ (DESIGN.md: rows n <= k_l dense, a row where nothing passes keeps
    its largest element): the kept mass D and the dropped mass Δ, as Σ exp(a − m) with m the row's
    max, the kept count, and the mass exact top-k_l keeps (k_l <= k_max), each float32 [B, H, T].
    All rows at once: [H, T, T] scores fit here."""
    from condensa.attention.dense import attention_scores
    from condensa.attention.gqa import repeat_kv
    from condensa.attention.rows import keep_largest_if_empty, lookup_by_length, masked_max

    q, k, _, scale = nnx.merge(graph, state).attention_projections(x, cos, sin)
    scores = attention_scores(q, repeat_kv(k, q.shape[2]), scale)  # [B, H, T, T] float32
    b, _, t, _ = scores.shape
    visible = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), scores.shape)
    lengths = jnp.broadcast_to(jnp.arange(1, t + 1), (b, t))
    row_theta = lookup_by_length(theta, lengths)[..., None]  # [B, H, T, 1]
    dense_rows = (jnp.arange(1, t + 1) <= k_l)[:, None]
    kept = keep_largest_if_empty(visible & ((scores > row_theta) | dense_rows), scores, visible)
    e = jnp.exp(jnp.where(visible, scores - masked_max(scores, visible), -jnp.inf))
    top = jax.lax.top_k(e, min(k_max, t))[0]  # exact top-k's kept mass, for the same k
    topk_mass = jnp.where(jnp.arange(top.shape[-1]) < k_l, top, 0).sum(-1)
    return (jnp.where(kept, e, 0).sum(-1), jnp.where(visible & ~kept, e, 0).sum(-1),
            kept.sum(-1).astype(jnp.float32), topk_mass)


def compensation_stage(runner, windows, thresholds, k: int) -> dict:
    """Per layer and row length: the mass Top-θ really drops (Δ) on held-out windows against the
    calibrated Δ̄ that SDC adds instead; the share of each row's mass that the kept elements
    carry, exactly (D / (D + Δ)), as calibrated SDC assumes (D / (D + Δ̄)), and under exact top-k;
    how many elements Top-θ keeps, and how often fewer than k / 2."""
    t = windows.shape[1]
    edges = [k * 2**i for i in range(0, 20) if k * 2**i < t] + [t]
    per_layer = [{} for _ in runner.states]
    samples = [[] for _ in runner.states]
    for w in windows:
        inputs, cos, sin = runner.layer_inputs(jnp.asarray(w[None], jnp.int32), toptheta_rule(k, "none"), thresholds)
        for layer, (state, x) in enumerate(zip(runner.states, inputs)):
            theta = jnp.asarray(thresholds.theta[layer], jnp.float32)
            arrays = _kept_and_dropped(runner.graph, state, x, cos, sin, theta, jnp.int32(k), k_max=k)
            samples[layer].append(tuple(np.asarray(a[0], np.float64) for a in arrays))
    for layer, pairs in enumerate(samples):
        kept = np.concatenate([p[0] for p in pairs], axis=1)  # [H, N·T]
        dropped = np.concatenate([p[1] for p in pairs], axis=1)
        count = np.concatenate([p[2] for p in pairs], axis=1)
        topk = np.concatenate([p[3] for p in pairs], axis=1)
        n = np.tile(np.arange(1, t + 1), len(pairs))
        delta_bar = np.asarray(thresholds.sdc_delta[layer], np.float64)[:, np.minimum(n, thresholds.sdc_delta.shape[-1]) - 1]
        for lo, hi in zip(edges[:-1], edges[1:]):
            rows = (n > lo) & (n <= hi)
            d, dd, kk = dropped[:, rows], delta_bar[:, rows], kept[:, rows]
            per_layer[layer][f"{lo + 1}-{hi}"] = {
                "dropped_mean": float(d.mean()), "dropped_median": float(np.median(d)), "delta_bar_mean": float(dd.mean()),
                "kept_share_exact": float((kk / (kk + d)).mean()), "kept_share_sdc": float((kk / (kk + dd)).mean()),
                "kept_mean": float(kk.mean()), "kept_elements": float(count[:, rows].mean()),
                "rows_below_half_k": float((count[:, rows] < k / 2).mean()),
                "kept_share_topk": float((topk[:, rows] / (kk + d)).mean())}
    return {"edges": edges, "per_layer": per_layer}


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    results = {"args": vars(args), "device": str(jax.devices()[0]), "jax": jax.__version__}
    if args.prepass_layout:  # every pre-pass this process runs, the model's included
        from condensa.kernels import selector_prepass

        selector_prepass.DEFAULT_LAYOUT.update(selector_prepass.layout_from_text(args.prepass_layout))
        results["prepass_layout"] = dict(selector_prepass.DEFAULT_LAYOUT)
    model, config = load_pretrained(args.model, dtype=jnp.dtype(args.dtype))
    if args.run:
        from condensa.train.run_model import with_run_weights

        model = with_run_weights(model, args.run)
        results["run"] = str(args.run)
    tokenizer = load_tokenizer(args.model)
    ids = np.asarray(tokenizer(Path(args.data).read_text(encoding="utf-8"))["input_ids"], np.int32)
    book = np.asarray(tokenizer(Path(args.book).read_text(encoding="utf-8"))["input_ids"], np.int32)
    results["text_tokens"] = {"wikitext": int(ids.size), "book": int(book.size)}
    runner = LayerRunner(model)
    budgets = [float(x) for x in args.budgets.split(",")]
    stages = set(args.stages.split(","))
    dense_cfg = AttentionConfig()

    gate = functools.partial(gate_rule, block=args.block)

    ks = [int(x) for x in args.ks.split(",")]
    # the compensation variants whose thresholds this run reads (stage gated adds its own)
    gated_too = "gated" in stages or ("time" in stages and args.time_ks)
    variants = args.compensation + ("," + args.gated.rpartition("/")[2] if gated_too else "")
    if "calibrate" in stages:  # first, so the device's peak memory is calibration's
        results["calibration"] = calibrate_stage(model, tokenizer, args, ks, variants, out)
        save(out, results)
    all_windows = windows_of(ids, args.seq, None)
    sub = all_windows[args.skip_windows: args.skip_windows + args.windows]
    if "dense" in stages:
        results["dense_all"] = evaluate(runner, all_windows, dense_cfg, args.tail)
        print("dense, all windows", {k: v for k, v in results["dense_all"].items() if "per_window" not in k}, flush=True)
        save(out, results)
    dense_sub = evaluate(runner, sub, dense_cfg, args.tail)
    results["dense"] = dense_sub
    results["kept_tiles"] = {str(f): kept_tile_fraction(args.seq, args.block, f) for f in budgets}
    if "selectors" in stages:
        grid = results.setdefault("selectors", {})
        for selector in args.selectors.split(","):
            for f in budgets:
                r = evaluate(runner, sub, gate(selector, f), args.tail)
                r.update(paired_delta(r, dense_sub), tail=paired_delta(r, dense_sub, "nll_tail_per_window"))
                grid[f"{selector}@{f}"] = r
                print(selector, f, f"ppl {r['ppl']:.3f} ({r['delta_pct']:+.2f}%), tail {r['ppl_tail']:.3f} "
                      f"({r['tail']['delta_pct']:+.2f}%), {r['seconds']:.1f}s", flush=True)
                save(out, results)
    if "topk" in stages:
        grid = results.setdefault("topk", {})
        for k in ks:
            r = evaluate(runner, sub, AttentionConfig(mode="topk", k=k), args.tail)
            r.update(paired_delta(r, dense_sub), tail=paired_delta(r, dense_sub, "nll_tail_per_window"))
            grid[str(k)] = r
            print("topk", k, f"ppl {r['ppl']:.3f} ({r['delta_pct']:+.2f}%)", flush=True)
            save(out, results)
    thresholds = {}
    if stages & {"toptheta", "compensation", "gated"}:
        needed = set(placements(variants)) | ({"pre"} if "compensation" in stages else set())
        thresholds = {(k, placement): Thresholds.load(threshold_path(args.thresholds or out, k, placement))
                      for k in ks for placement in needed}
    if "toptheta" in stages:
        grid = results.setdefault("toptheta", {})
        for k in ks:
            for variant in args.compensation.split(","):
                rule = toptheta_rule(k, variant)
                r = evaluate(runner, sub, rule, args.tail, thresholds[k, rule.placement])
                r.update(paired_delta(r, dense_sub), tail=paired_delta(r, dense_sub, "nll_tail_per_window"))
                grid[f"{k}/{variant}"] = r
                print("toptheta", k, variant, f"ppl {r['ppl']:.3f} ({r['delta_pct']:+.2f}%)", flush=True)
                save(out, results)
    if "gated" in stages:
        selector, _, variant = args.gated.rpartition("/")  # the selector may carry /sub_block itself
        grid = results.setdefault("gated", {})
        for f in budgets:
            for k in ks:
                rule = toptheta_rule(k, variant, base=gate(selector, f))
                r = evaluate(runner, sub, rule, args.tail, thresholds[k, rule.placement])
                r.update(paired_delta(r, dense_sub), tail=paired_delta(r, dense_sub, "nll_tail_per_window"))
                grid[f"{selector} + Top-θ k={k} {variant}@{f}"] = r
                print("gated", selector, f, k, variant, f"ppl {r['ppl']:.3f} ({r['delta_pct']:+.2f}%)", flush=True)
                save(out, results)
    if "decode" in stages:
        grid = results.setdefault("decode", {})
        for selector in filter(None, args.decode_selectors.split(",")):
            for f in budgets:
                r = evaluate(runner, sub, gate(selector, f).replace(decode_gate_rows=True), args.tail)
                r.update(paired_delta(r, dense_sub), tail=paired_delta(r, dense_sub, "nll_tail_per_window"))
                grid[f"{selector}@{f}"] = r
                print("decode rows", selector, f, f"ppl {r['ppl']:.3f} ({r['delta_pct']:+.2f}%)", flush=True)
                save(out, results)
    if "compensation" in stages:
        results["compensation"] = {str(k): compensation_stage(runner, sub[:2], thresholds[k, "pre"], k) for k in ks}
        save(out, results)
    if "book" in stages:
        book_windows = windows_of(book, args.seq, args.book_windows)
        grid = results.setdefault("book", {})
        grid["dense"] = book_dense = evaluate(runner, book_windows, dense_cfg, args.tail)
        for selector in args.book_selectors.split(","):
            for f in (0.25, 0.125):
                r = evaluate(runner, book_windows, gate(selector, f), args.tail)
                r.update(paired_delta(r, book_dense), tail=paired_delta(r, book_dense, "nll_tail_per_window"))
                grid[f"{selector}@{f}"] = r
                print("book", selector, f, f"ppl {r['ppl']:.3f} ({r['delta_pct']:+.2f}%)", flush=True)
                save(out, results)
    if "time" in stages:
        rules, rule_thresholds = {"dense (cuDNN)": dense_cfg}, {}
        time_budgets = [float(x) for x in args.time_budgets.split(",")]
        for selector in args.time_selectors.split(","):
            for f in time_budgets:
                rules[f"{selector}@{f}"] = gate(selector, f).replace(backend="pallas")
        selector, _, variant = args.gated.rpartition("/")
        for k in [int(x) for x in filter(None, args.time_ks.split(","))]:
            placement = toptheta_rule(k, variant).placement
            theta = thresholds.get((k, placement)) or Thresholds.load(threshold_path(args.thresholds or out, k, placement))
            for f in time_budgets:
                name = f"{selector} + Top-θ k={k} {variant}@{f}"
                rules[name] = toptheta_rule(k, variant, base=gate(selector, f)).replace(backend="pallas")
                rule_thresholds[name] = theta
        batches = [int(x) for x in args.time_batches.split(",")]
        results["prefill_seconds"] = time_prefill(model, args.seq, batches, rules, rule_thresholds)
        save(out, results)
        for batch in batches:
            window_ids = jnp.asarray(np.resize(sub, (batch, args.seq)))
            results[f"prepass_seconds_b{batch}"] = time_prepass(model, window_ids, 10, rules)
        save(out, results)
        if args.time_decode:
            results["decode_attention"] = time_decode(config, args, budgets, out)
            save(out, results)
    print(json.dumps({k: v for k, v in results.items() if k not in ("selectors", "topk", "book", "toptheta", "compensation")},
                     indent=1)[:3000])


if __name__ == "__main__":
    main()

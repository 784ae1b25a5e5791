"""Stage 5: what the kernels buy on the study's models, at their full context.

For each timed model the gate budget is the smallest f whose perplexity cost on held-out corpus
text was within `timing.max_delta_ppl` at k = `timing.k` (from stage 4), so the speed is the
speed of a rule whose accuracy was measured. Three measurements, each with its error against the
reference op recorded (whole-model prefill is not timed when that check fails):
- whole-model prefill (logits of `batch` full-context sequences): dense, where `attend` runs cuDNN,
  against the Pallas kernels with Top-θ and with gate + Top-θ;
- attention alone: each layer's prefill on the model's own q, k, v (captured from real text),
  cuDNN against the kernel, summed over layers, with the tile fractions the kernel reports;
- decoding: each layer's attention for the last position against the full cache, the best dense
  baseline against the decode kernel, with the fractions of K and V blocks it loaded.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.attention import AttentionConfig, attend, layer_thresholds
from condensa.attention.pallas_backend import decode_kernel_args, prefill_kernel_args
from condensa.errors import ConfigError
from condensa.eval.bench.decode_baselines import dense_baselines, head_major, tile_state
from condensa.eval.bench.timing import first_output, jit_with_options, measure, relative_error
from condensa.eval.perplexity import perplexity
from condensa.eval.study.config import StudyConfig
from condensa.eval.study.data import calibration_blocks, held_out
from condensa.eval.study.evaluation import weights_sha256
from condensa.eval.study.training import ensure_model
from condensa.kernels import toptheta_prefill
from condensa.kernels.backend import TPU_BACKENDS, resolve_backend
from condensa.kernels.tiling import tile_count, visible_tiles
from condensa.kernels.toptheta_decode import AUTO_SKIP_V, SKIP_V_MODES, default_block_k, toptheta_decode
from condensa.model import load_pretrained
from condensa.sparsity import Thresholds
from condensa.sparsity.calibration import GateSpec, calibrate


def choose_budget(evaluation: dict, k: int, max_delta: float, *, by: str = "rule", decode: bool = False) -> dict | None:
    """The corpus-sweep row of the gated Top-θ rule to time at this k.

    by="rule": the smallest budget f whose gated Top-θ rule (either compensation) has a Δppl within
    `max_delta`. by="gate": the smallest f whose gate *alone* (dense inside its tiles) is within
    `max_delta`, timed with Top-θ inside (the compensation with the lower Δppl); the row then also
    carries `gate_delta_ppl_rel`. `decode` picks among the rules whose rows were gated as decoding
    steps. When no budget is within, the cheapest is taken, marked `within_limit: False`, so the
    kernels are still timed on thresholds of this model."""
    corpus = [r for r in evaluation["corpus"]["rows"] if bool(r.get("decode_gate")) == decode and r["tile_budget"] is not None]
    gated = [r for r in corpus if r["method"] == "toptheta" and r["k"] == k]
    if by == "rule":
        rows = [dict(r, within_limit=r["delta_ppl_rel"] <= max_delta) for r in gated]
        within = [r for r in rows if r["within_limit"]]
        if within:
            return min(within, key=lambda r: (r["tile_budget"], r["delta_ppl_rel"]))
        return min(rows, key=lambda r: r["delta_ppl_rel"], default=None)
    if by != "gate":
        raise ConfigError(f"timing.budget_by must be 'rule' or 'gate'; got {by!r}.")
    alone = [r for r in corpus if r["method"] == "dense"]
    if not alone:
        raise ConfigError("timing.budget_by='gate' needs the gate-alone rules: set evaluation.gate_alone: true and re-run "
                          "--stages evaluate.")
    within = [r for r in alone if r["delta_ppl_rel"] <= max_delta]
    pick = min(within, key=lambda r: r["tile_budget"]) if within else min(alone, key=lambda r: r["delta_ppl_rel"])
    timed = [r for r in gated if r["tile_budget"] == pick["tile_budget"]]
    if not timed:
        return None
    best = min(timed, key=lambda r: r["delta_ppl_rel"])
    return dict(best, within_limit=bool(within), gate_delta_ppl_rel=pick["delta_ppl_rel"])


def thresholds_for(config: StudyConfig, name: str, k: int, f: float | None):
    """The thresholds stage 4 calibrated for (k, f), or the same calibration redone (same blocks,
    same settings) when this machine does not hold them."""
    cal = config.calibration
    path = Path(config.out) / "thresholds" / name / f"k{k}-f{'off' if f is None else f'{f:g}'}.safetensors"
    if not path.is_file():
        model, _ = load_pretrained(ensure_model(config, name))
        gate = GateSpec(cal.tile, cal.tile, f, cal.sink_tiles) if f is not None else None
        path.parent.mkdir(parents=True, exist_ok=True)
        calibrate(model, calibration_blocks(config), k=k, sigma_add=cal.sigma_add, gate=gate,
                  batch_size=cal.batch_size, data="corpus training blocks").save(path)
    return Thresholds.load(path)


def _chosen_summary(row: dict | None) -> dict | None:
    keys = ("tile_budget", "compensation", "delta_ppl_rel", "kept_fraction", "tile_kept_fraction", "within_limit",
            "gate_delta_ppl_rel", "decode_gate")
    return None if row is None else {key: row[key] for key in keys if key in row}


def ppl_parity(model, tokens, rules: dict, *, batch: int) -> dict:
    """Perplexity of the model running the kernels against the reference op, same rule and
    thresholds, in the model's compute dtype: the kernels must not change what the model predicts."""
    out = {}
    for rule, (attention, thresholds) in rules.items():
        kernel = perplexity(model, tokens, attention=attention, thresholds=thresholds, batch_size=batch)["ppl"]
        reference = perplexity(model, tokens, attention=dataclasses.replace(attention, backend="reference"),
                               thresholds=thresholds, batch_size=batch)["ppl"]
        out[rule] = {"kernel": kernel, "reference": reference, "rel_diff": abs(kernel / reference - 1.0)}
    return out


def layer_qkv(model, ids) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """Each layer's (q, k, v) [B, T, H, D] under dense attention. The model keeps q, k, v inside its
    attention call, so this walks the blocks itself, with the model's own modules."""
    b, t = ids.shape
    x = model.wte(ids) + model.wpe(jnp.arange(t)[None])
    out = []
    for block in model.h:
        q, k, v = jnp.split(block.attn.c_attn(block.ln_1(x)), 3, axis=-1)
        out.append(tuple(y.reshape(b, t, block.attn.n_head, -1) for y in (q, k, v)))
        x = block(x, visible=None, attention=AttentionConfig(), thresholds=None, need_probs=False, causal=True)[0]
    return out


def reference_attention(q, k, v, *, scale, layer, attention, thresholds):
    """The reference op (float32) for the last len(q) queries against all of k: the oracle the
    kernels are checked against before they are timed."""
    tq, s = q.shape[1], k.shape[1]
    visible = (jnp.arange(s)[None, :] <= (s - tq + jnp.arange(tq))[:, None])[None, None]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    fn = jax.jit(attend, static_argnames=("scale", "layer_idx", "config", "need_probs"))
    return fn(f32(q), f32(k), f32(v), visible=visible, scale=scale, layer_idx=layer, need_probs=False,
              config=dataclasses.replace(attention, backend="reference"), thresholds=thresholds)[0]


def time_prefill_rule(attention, thresholds, qkv, scale, settings, cudnn_s: float, dense_attention) -> dict:
    """One rule's prefill attention over every layer's q, k, v: the kernel's time summed over layers
    (as the model's jitted forward runs it), its tile counts, and its error against the reference
    op on the first sequence of each layer (the output is NaN-poisoned before the checked call).
    A layer the rule leaves dense runs `dense_attention(q, k, v)` (cuDNN), as the model runs it,
    and counts every causal tile of the rule's tiling as computed."""
    t = qkv[0][0].shape[1]
    acc = {"kernel_s": 0.0, "causal": 0, "listed": 0, "empty": 0, "max_rel_error": 0.0}
    for layer, (q, k, v) in enumerate(qkv):
        if attention.for_layer(layer).is_dense and not attention.is_dense:
            acc["kernel_s"] += measure(lambda: dense_attention(q, k, v), warmup=settings.warmup,
                                       repeats=settings.repeats)["median_s"]
            bq, bk = attention.block_q, attention.block_k
            causal = int(visible_tiles(tile_count(t, bq), tile_count(t, bk), bq, bk).sum()) * q.shape[0] * q.shape[2]
            acc["causal"] += causal
            acc["listed"] += causal
            continue
        layer_table = layer_thresholds(attention, thresholds, layer) if thresholds is not None else None  # dense
        kwargs = prefill_kernel_args(attention, layer_table, layer, t)
        out, stats = toptheta_prefill(q, k, v, scale=scale, poison_output=True, **kwargs)
        ref = reference_attention(q[:1], k[:1], v[:1], scale=scale, layer=layer, attention=attention,
                                  thresholds=thresholds)
        acc["max_rel_error"] = max(acc["max_rel_error"], relative_error(out[:1], ref))
        # As the model's jitted forward runs it; the output only (the stats' counts are not timed).
        fast = jit_with_options(first_output(toptheta_prefill), scale=scale, **kwargs)
        acc["kernel_s"] += measure(lambda: fast(q, k, v), warmup=settings.warmup, repeats=settings.repeats)["median_s"]
        for field in ("causal", "listed", "empty"):
            acc[field] += int(getattr(stats, field))
    acc["tile_fraction"] = acc["listed"] / max(acc["causal"], 1)
    acc["empty_fraction"] = acc["empty"] / max(acc["listed"], 1)
    acc["speedup_vs_cudnn"] = cudnn_s / acc["kernel_s"]
    return acc


def evaluated_dense_layers(config: StudyConfig, name: str, evaluation: dict) -> tuple[int, ...]:
    """The layers the evaluation left dense, so that every timed rule is the rule it measured; a
    config changed since then is an error, not a silent mismatch."""
    measured = {tuple(r.get("dense_layers", ())) for r in evaluation["corpus"]["rows"]}
    wanted = tuple(sorted(int(x) for x in config.evaluation.dense_layers))
    if measured != {wanted}:
        raise ConfigError(f"{name} was evaluated with dense_layers {sorted(measured)} but evaluation.dense_layers is "
                          f"{list(wanted)} now; run the evaluate stage again (--stages evaluate --models {name}) "
                          "before timing.")
    return wanted


def prefill_grid(config: StudyConfig, name: str, evaluation: dict, qkv, scale, settings, cudnn_s: float,
                 dense_attention) -> list[dict]:
    """Prefill attention with every calibrated rule the evaluation measured: Top-θ at each k, and
    gate + Top-θ at each budget at the gated k (each compensation of timing.grid_compensations), with its Δppl on
    held-out corpus text next to its speed and tile fraction (the issue's table, on real q, k, v
    and thresholds instead of synthetic ones)."""
    cal = config.calibration
    dense_layers = evaluated_dense_layers(config, name, evaluation)
    out = []
    for row in evaluation["corpus"]["rows"]:
        if row["method"] != "toptheta" or row.get("decode_gate") or row["compensation"] not in settings.grid_compensations:
            continue
        f, comp = row["tile_budget"], row["compensation"] != "none"
        attention = AttentionConfig(mode="toptheta", k=row["k"], backend="pallas", tile_gate=f is not None,
                                    block_q=cal.tile, block_k=cal.tile, tile_budget=f or 0.125,
                                    sink_tiles=cal.sink_tiles, sdc="calibrated" if comp else "none", vmc=comp,
                                    tile_cap=f is not None and bool(row.get("tile_cap")),
                                    dense_layers=dense_layers)
        timed = time_prefill_rule(attention, thresholds_for(config, name, row["k"], f), qkv, scale, settings, cudnn_s,
                                  dense_attention)
        out.append({"label": row["label"], "k": row["k"], "tile_budget": f, "compensation": row["compensation"],
                    "delta_ppl_rel": row["delta_ppl_rel"], **timed})
    return out


DECODE_CALLS = 10  # decode calls dispatched back to back per timed repeat, as a generation loop runs them


def time_decode_rule(attention, thresholds, per_layer, lengths, scale, skip_v, step_seconds, best) -> dict:
    """One decode rule on every layer's cache: its error against the reference op, its time per
    decode step (all layers, `step_seconds`), and the fractions of K blocks, V blocks and V rows it
    loaded."""
    acc = {"skip_v": skip_v, "visible": 0, "k_loaded": 0, "v_loaded": 0, "v_rows": 0, "visible_rows": 0,
           "max_rel_error": 0.0}
    layer_args = []
    for layer, c in enumerate(per_layer):
        kwargs = decode_kernel_args(attention, layer_thresholds(attention, thresholds, layer), layer, c["k"].shape[1])
        # toptheta_decode's default, named so that the V rows can be counted
        kwargs.setdefault("block_k", default_block_k(kwargs["tile_theta_decode"] is not None, kwargs["theta"] is None))
        layer_args.append(dict(kwargs, skip_v=skip_v, scale=scale))

    def call(layer, c):
        gated = layer_args[layer]["tile_theta_decode"] is not None
        return toptheta_decode(c["q"], c["k"], c["v"], lengths, v_mean=c["v_mean"],
                               k_tile_mean=c["k_bar"] if gated else None, **layer_args[layer])

    for layer, c in enumerate(per_layer):
        out, stats = call(layer, c)
        ref = reference_attention(c["q"], c["k"], c["v"], scale=scale, layer=layer, attention=attention,
                                  thresholds=thresholds)
        acc["max_rel_error"] = max(acc["max_rel_error"], relative_error(out, ref))
        for field in ("visible", "k_loaded", "v_loaded", "v_rows"):
            acc[field] += int(getattr(stats, field))
        acc["visible_rows"] += int(stats.visible) * layer_args[layer]["block_k"]
    acc["kernel_s"] = step_seconds(lambda layer, c: call(layer, c)[0])
    acc["k_fraction"] = acc["k_loaded"] / max(acc["visible"], 1)
    acc["v_fraction"] = acc["v_loaded"] / max(acc["visible"], 1)
    acc["v_row_fraction"] = acc["v_rows"] / max(acc["visible_rows"], 1)
    acc["speedup_vs_best_dense"] = best / acc["kernel_s"] if best else None
    return acc


def time_model(config: StudyConfig, name: str, evaluation: dict) -> dict:
    settings, cal = config.timing, config.calibration
    chosen = choose_budget(evaluation, settings.k, settings.max_delta_ppl, by=settings.budget_by)
    has_decode_rows = any(r.get("decode_gate") for r in evaluation["corpus"]["rows"])
    chosen_decode = (choose_budget(evaluation, settings.k, settings.max_delta_ppl, by=settings.budget_by, decode=True)
                     if has_decode_rows else chosen)
    result: dict = {"model": name, "k": settings.k, "budget_by": settings.budget_by,
                    "chosen": _chosen_summary(chosen), "chosen_decode": _chosen_summary(chosen_decode)}
    dense_layers = evaluated_dense_layers(config, name, evaluation)
    result["dense_layers"] = list(dense_layers)
    toptheta = (AttentionConfig(mode="toptheta", k=settings.k, backend="pallas", dense_layers=dense_layers),
                thresholds_for(config, name, settings.k, None))

    def gated_rule(row):
        f, comp = row["tile_budget"], row["compensation"] != "none"
        return (AttentionConfig(mode="toptheta", k=settings.k, backend="pallas", tile_gate=True, block_q=cal.tile,
                                block_k=cal.tile, tile_budget=f, sink_tiles=cal.sink_tiles,
                                sdc="calibrated" if comp else "none", vmc=comp, tile_cap=bool(row.get("tile_cap")),
                                dense_layers=dense_layers),
                thresholds_for(config, name, settings.k, f))

    rules = {"toptheta": toptheta, **({"gate+toptheta": gated_rule(chosen)} if chosen is not None else {})}
    decode_rules = {"toptheta": toptheta, **({"gate+toptheta": gated_rule(chosen_decode)} if chosen_decode else {})}

    hf = ensure_model(config, name)
    model, model_config = load_pretrained(hf, dtype=jnp.bfloat16)
    if model_config.model_type != "gpt2":
        raise ConfigError("the study's timing stage walks GPT-2 blocks to capture q, k, v; use a GPT-2 stand-in "
                          f"(this one is {model_config.model_type!r}).")

    result["same_weights_as_evaluated"] = weights_sha256(hf) == evaluation.get("model_sha256")
    if not result["same_weights_as_evaluated"]:
        warnings.warn(f"{name}: the weights timed are a retrained copy, not the evaluated ones (GPU training is not "
                      "bitwise reproducible); the gate budget was chosen on the evaluated copy.", stacklevel=2)
    t, b = model_config.n_positions, settings.batch
    tokens = held_out(config)["corpus"]
    tokens = np.resize(tokens, b * t)  # repeats text only if the held-out split is shorter than one batch
    ids = jnp.asarray(tokens.reshape(b, t), jnp.int32)
    graphdef, state = nnx.split(model)

    def forward(attention, thresholds, x=ids):
        fn = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, attention=attention, thresholds=thresholds).logits)
        return lambda: fn(state, x)

    # ---- whole-model prefill -------------------------------------------------------------------
    dense_fn = forward(AttentionConfig(), None)
    whole = {"dense_cudnn": {**measure(dense_fn, warmup=settings.warmup, repeats=settings.repeats)}}
    for rule, (attention, thresholds) in rules.items():
        # the reference op holds [B, H, T, T] float32 per layer: check on the first sequence
        ref = forward(dataclasses.replace(attention, backend="reference"), thresholds, ids[:1])()
        fn = forward(attention, thresholds)
        err = relative_error(fn()[:1], ref)
        entry = {"rel_error_vs_reference": err, "ok": err < 2e-2}
        if entry["ok"]:
            entry.update(measure(fn, warmup=settings.warmup, repeats=settings.repeats))
            entry["speedup_vs_dense"] = whole["dense_cudnn"]["median_s"] / entry["median_s"]
        whole[rule] = entry
    result["prefill_model"] = whole

    # ---- attention alone, per layer, on the model's own q, k, v ---------------------------------
    qkv = jax.jit(lambda st, x: layer_qkv(nnx.merge(graphdef, st), x))(state, ids)
    scale = model.h[0].attn.scale
    implementation = "cudnn" if jax.default_backend() == "gpu" else None  # XLA where there is no cuDNN (CPU smoke runs)
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                                 implementation=implementation))
    prefill = {"cudnn_s": 0.0, "rules": {}}
    for layer, (q, k, v) in enumerate(qkv):
        prefill["cudnn_s"] += measure(lambda: cudnn(q, k, v), warmup=settings.warmup, repeats=settings.repeats)["median_s"]
    # the kernel's dense mode (θ = −inf) first: the floor the sparse rules are measured against
    for rule, (attention, thresholds) in {"dense kernel": (AttentionConfig(backend="pallas"), None), **rules}.items():
        prefill["rules"][rule] = time_prefill_rule(attention, thresholds, qkv, scale, settings, prefill["cudnn_s"], cudnn)
    if settings.prefill_grid:
        prefill["grid"] = prefill_grid(config, name, evaluation, qkv, scale, settings, prefill["cudnn_s"], cudnn)
    result["prefill_attention"] = prefill

    # ---- decoding: the last position against the full cache ---------------------------------
    lengths = jnp.full((b,), t, jnp.int32)
    baselines = dense_baselines(["xla", "cudnn", "pallas_decode"], scale)
    decode = {"dense_s": {}, "rules": {}}
    per_layer = []
    for q, k, v in qkv:
        k_bar, v_mean = tile_state(k, v, lengths, cal.tile)
        per_layer.append(dict(q=q[:, -1:], k=k, v=v, k_t=head_major(k), v_t=head_major(v), k_bar=k_bar, v_mean=v_mean))

    def step_seconds(per_layer_call):
        """Seconds per decode step: one jitted call runs `per_layer_call(layer, cache)` on every
        layer in turn, as a model's decode step does, so the host dispatches once per step and the
        kernel's small XLA ops (gate scores, compaction, combine) run back to back on the device."""
        step = jax.jit(lambda caches: [per_layer_call(i, c) for i, c in enumerate(caches)])
        return measure(lambda: step(per_layer), warmup=settings.warmup, repeats=settings.repeats,
                       calls_per_repeat=DECODE_CALLS)["median_s"]

    for base, fn in baselines.items():
        try:
            decode["dense_s"][base] = step_seconds(
                lambda i, c, fn=fn: fn(c["q"], c["k"], c["v"], c["k_t"], c["v_t"], lengths))
        except Exception as err:  # a baseline that does not run on this platform is reported, not fatal
            decode["dense_s"][base] = None
            decode.setdefault("errors", {})[base] = f"{type(err).__name__}: {str(err)[:200]}"
    best = min((s for s in decode["dense_s"].values() if s), default=None)
    decode["best_dense_s"] = best
    for rule, (attention, thresholds) in decode_rules.items():
        # Every way of skipping V the backend has: the kernel's default first, under the rule's own
        # name, then the others (on the GPU: the surviving V rows with masked loads in every tile,
        # the same behind a branch per tile, whole V blocks behind a branch; TPU: blocks only).
        modes = ("blocks",)
        if resolve_backend(None) not in TPU_BACKENDS:
            modes = (AUTO_SKIP_V, *(m for m in SKIP_V_MODES if m != AUTO_SKIP_V))
        for i, skip_v in enumerate(modes):
            label = rule if i == 0 else f"{rule} (V {skip_v})"
            decode["rules"][label] = time_decode_rule(attention, thresholds, per_layer, lengths, scale, skip_v,
                                                     step_seconds, best)
    result["decode_attention"] = decode
    result["ppl_parity"] = ppl_parity(model, held_out(config)["corpus"], rules, batch=1)
    result.update(batch=b, seq_len=t, heads=model_config.n_head, head_dim=model_config.n_embd // model_config.n_head)
    return result

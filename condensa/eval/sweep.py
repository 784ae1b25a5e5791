"""The sparsity / accuracy sweep: how much attention can be dropped, and what does it cost?

For every k, every tile budget f (or no gate) and every compensation variant, the sweep runs one
attention rule on the same model and text and measures perplexity (the HF protocol, via
`condensa.eval.perplexity`), Δppl against dense, and the sparsity that rule reaches: the kept
fraction of attention elements and of causal tiles, the mass the gate's tiles capture (both from
`condensa.sparsity.metrics`) and the V rows a decoding step needs (from a real KV-cache decode).
Thresholds are calibrated once per (k, f) and cached in the output folder, so a re-run with more
variants only measures.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa import jsonio
from condensa.attention import AttentionConfig
from condensa.errors import ConfigError, ThresholdsError
from condensa.eval.decode_trace import decode_trace
from condensa.eval.perplexity import perplexity
from condensa.sparsity import Thresholds
from condensa.sparsity.calibration import GateSpec, calibrate
from condensa.sparsity.gated_forward import gate_tiles_per_layer
from condensa.sparsity.metrics import causal_visible, layer_metrics, nanmean

# compensation variant -> the AttentionConfig fields it sets (Top-θ only; top-k is exact). "exact+vmc"
# leaves each row's true dropped mass in the denominator and fills that share with the mean visible V
# (the Top-θ reference's configuration): on SmolLM2 it beat calibrated SDC + VMC several times over
# (docs/real-model.md); it runs on the reference backend only.
COMPENSATIONS = {"none": dict(sdc="none", vmc=False), "sdc+vmc": dict(sdc="calibrated", vmc=True),
                 "exact+vmc": dict(sdc="exact", vmc=True)}
_LABELS = {"none": "", "sdc+vmc": " + SDC+VMC", "exact+vmc": " + exact SDC+VMC"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One attention rule of the sweep: top-k (exact), Top-θ, gate + Top-θ, or the gate alone
    (method "dense": dense inside the kept tiles, so its cost is the gate's own). `decode_gate`
    gates every row as its decoding step would (`AttentionConfig.decode_gate_rows`); `tile_cap` keeps
    at most the budget's tiles (`AttentionConfig.tile_cap`)."""

    method: str  # "topk" | "toptheta" | "dense" (gate alone)
    k: int
    tile_budget: float | None = None  # None: no tile gate
    compensation: str = "none"
    decode_gate: bool = False
    tile_cap: bool = False

    @property
    def label(self) -> str:
        """The legend name of this rule at any k (one plot line per label)."""
        kind = ("capped " if self.tile_cap else "") + ("decode gate" if self.decode_gate else "gate")
        gate = None if self.tile_budget is None else f"{kind} f={self.tile_budget:g}"
        if self.method == "dense":
            return f"{gate} alone"
        rule = "top-k" if self.method == "topk" else "Top-θ"
        if gate is not None:
            rule = f"{gate} + {rule}"
        return rule + _LABELS[self.compensation]

    def attention(self, tile: int, sink_tiles: int, dense_layers: Sequence[int] = ()) -> AttentionConfig:
        """The rule as an AttentionConfig; `dense_layers` keep dense attention (no gate, no Top-θ)."""
        gate = self.tile_budget is not None
        return AttentionConfig(
            mode=self.method, k=self.k, tile_gate=gate, block_q=tile, block_k=tile,
            tile_budget=self.tile_budget if gate else 0.125, sink_tiles=sink_tiles, decode_gate_rows=self.decode_gate,
            tile_cap=gate and self.tile_cap, dense_layers=tuple(dense_layers), **COMPENSATIONS[self.compensation],
        )


def parse_tile_budgets(values: Sequence[Any]) -> list[float | None]:
    """`[off, 0.5, "0.25"]` -> `[None, 0.5, 0.25]`. YAML reads a bare `off` as False, hence the forms."""
    out: list[float | None] = []
    for value in values:
        if value is None or value is False or str(value).strip().lower() in ("off", "none", "false", "0", "0.0"):
            out.append(None)
            continue
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"tile budget {value!r} is neither 'off' nor a number; e.g. --tile_budgets off,0.25.") from None
        if not 0 < f <= 1:
            raise ConfigError(f"tile budget f={f} must be in (0, 1] (a fraction of the tiles), or 'off'.")
        out.append(f)
    if not out:
        raise ConfigError("no tile budgets given; pass e.g. --tile_budgets off,0.25.")
    return list(dict.fromkeys(out))


def variants(ks: Sequence[int], tile_budgets: Sequence[float | None], compensations: Sequence[str],
             gate_ks: Sequence[int] | None = None, *, gate_alone: bool = False, decode_gate: bool = False,
             tile_cap: bool = False) -> list[Variant]:
    """Top-k at every k (without a gate: it is the oracle the others approximate), then Top-θ and
    gate + Top-θ with each compensation. `gate_ks` limits the gated rules to those k (a study grid
    that crosses every k with every budget costs more than it tells). `gate_alone` adds the gate
    with dense tiles at every budget (the gate's own perplexity cost); `decode_gate` adds every
    gated rule again with rows gated as decoding gates them. `tile_cap` caps every gate at its budget."""
    unknown = [c for c in compensations if c not in COMPENSATIONS]
    if unknown or not compensations:
        raise ConfigError(f"compensation variants must be among {', '.join(COMPENSATIONS)}; got {list(compensations)}.")
    gate_modes = (False, True) if decode_gate else (False,)
    out = []
    for k in ks:
        out.append(Variant("topk", k))
        for f in tile_budgets:
            if f is not None and gate_ks is not None and k not in gate_ks:
                continue
            for rows in gate_modes if f is not None else (False,):
                out.extend(Variant("toptheta", k, f, c, rows, tile_cap and f is not None) for c in compensations)
    if gate_alone:
        k = (gate_ks or ks)[0]  # the gate's thresholds are calibrated with those of some k; any one serves
        out.extend(Variant("dense", k, f, "none", rows, tile_cap) for f in tile_budgets if f is not None
                   for rows in gate_modes)
    return out


def check_ks(ks: Sequence[int], context: int) -> list[int]:
    """Sorted distinct k; each must leave rows longer than k inside the context, or nothing is sparse."""
    if not ks:
        raise ConfigError("no k given; pass e.g. --ks 8,16,32.")
    for k in ks:
        if k < 1:
            raise ConfigError(f"k must be >= 1; got {k}.")
        if k >= context:
            raise ConfigError(f"k={k} is not smaller than the context ({context} tokens): every row would stay "
                              f"dense. Use k < {context} (or a longer --max_length).")
    return sorted(set(int(k) for k in ks))


# ---- thresholds: calibrate once, cache in the output folder ----------------------------------------


def calibration_key(model_file: Path | None, settings: dict[str, Any]) -> str:
    """What a cached thresholds file depends on: the weights' bytes and the calibration settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    if model_file is not None and model_file.is_file():
        digest.update(hashlib.sha256(model_file.read_bytes()).digest())
    return digest.hexdigest()[:24]


def check_cached_thresholds(cache_dir: Path, model) -> None:
    """Every cached thresholds file must fit the model's shape (else `--out` holds another model's sweep)."""
    for path in sorted(cache_dir.glob("*.safetensors")):
        try:
            Thresholds.load(path).validate(model.config, source=str(path))
        except ThresholdsError as err:
            raise ThresholdsError(f"{err} It is a cached file of an earlier sweep in this --out folder: "
                                  "use another --out, or delete it to re-calibrate.") from None


def cached_thresholds(
    path: Path, key: str, model, attention: AttentionConfig, calibrate_fn: Callable[[], Any],
):
    """Loads `path` when it was calibrated for this model with these settings, else calibrates and
    saves it (`check_cached_thresholds` has refused files for a model of another shape)."""
    key_file = path.with_suffix(".key")
    if path.is_file():
        cached = Thresholds.load(path)
        if key_file.is_file() and key_file.read_text().strip() == key:
            cached.check_attention(attention, source=str(path))
            return cached
    calibrate_fn().save(path)
    key_file.write_text(key + "\n")
    # read back: the file's metadata is the pytree's static part, so fresh and cached thresholds
    # then share one compiled function per attention rule
    return Thresholds.load(path)


# ---- measuring one rule --------------------------------------------------------------------------


def sparsity_metrics(model, blocks, attention: AttentionConfig, thresholds, *, tile: int, dense_probs) -> dict:
    """Mean over layers of the metrics of `condensa.sparsity.metrics`, plus the per-layer means.

    Unlike `sparsity_report`, tile fractions are measured for ungated rules too (with the sweep's
    tile size), since "element sparsity does not empty tiles" is what the sweep should show. Rows
    gated as decoding steps count 1 x tile tiles: the key tiles a decoding step reads.
    """
    ids = jnp.asarray(blocks, jnp.int32)
    graphdef, state = nnx.split(model)
    probs, gate_tiles = probs_and_gate_tiles(graphdef, state, ids, thresholds, attention=attention)
    gate_tiles = gate_tiles if gate_tiles is not None else [None] * len(probs)
    geometry = attention if attention.tile_gate else AttentionConfig(block_q=tile, block_k=tile)
    if attention.decode_gate_rows:
        geometry = AttentionConfig(block_q=1, block_k=attention.block_k)
    visible = causal_visible(ids.shape[1])
    layers = []
    for layer, (p, d, g) in enumerate(zip(probs, dense_probs, gate_tiles)):
        metrics = layer_metrics(p, visible, k=attention.k_for(layer), dense_probs=d, gate_tiles=g, attention=geometry)
        if not attention.tile_gate or attention.decode_gate_rows:
            metrics.pop("oracle_tile_mass", None)  # the oracle at an arbitrary budget says nothing here
        layers.append({name: value["mean"] for name, value in metrics.items()})
    mean = {name: nanmean([entry[name] for entry in layers]) for name in layers[0]}
    return {"mean": mean, "layers": layers}


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def probs_and_gate_tiles(graphdef, state, ids, thresholds, *, attention):
    """Each layer's probabilities and, with a gate, its kept tiles, in one compiled program.
    (`gated_forward.forward_probs_and_gates` also counts decode-gate tiles, which the sweep measures by
    decoding, and which would add a third model pass to every compile.)"""
    model = nnx.merge(graphdef, state)
    probs = model(ids, attention=attention, thresholds=thresholds, return_attention=True).attentions
    prefill_gate = attention.tile_gate and not attention.decode_gate_rows
    tiles = gate_tiles_per_layer(model, ids, attention, thresholds) if prefill_gate else None
    return probs, tiles


def layer_probs(model, blocks, attention: AttentionConfig, thresholds=None) -> tuple:
    """Per-layer attention probabilities [B, H, T, T] of `blocks` under `attention`."""
    graphdef, state = nnx.split(model)
    return probs_and_gate_tiles(graphdef, state, jnp.asarray(blocks, jnp.int32), thresholds, attention=attention)[0]


# The numbers of a rule's results (a row, its per-layer entries, the compensation effect). A null
# under one of them in a results file is a value that was not finite; elsewhere null can mean
# "none" (a tile budget of None is no gate), so `read_results` turns it into NaN only under these.
RESULT_NUMBERS = frozenset({
    "ppl", "nll", "delta_ppl", "delta_ppl_rel", "kept_fraction", "kept_per_row", "topk_mass", "cover_90",
    "cover_95", "tile_kept_fraction", "gate_tile_mass", "oracle_tile_mass", "decode_v_rows_fraction",
    "decode_token_agreement", "delta_ppl_rel_none", "delta_ppl_rel_compensated",
})


def read_results(path: str | Path) -> dict:
    """A results file of the sweep (or the study's evaluation, which has the same rows), with the
    nulls its writer put for NaN read back as NaN."""
    return jsonio.loads(Path(path).read_text(), numbers=RESULT_NUMBERS)


SKIPPED_METRICS = {"mean": {"kept_fraction": float("nan"), "kept_per_row": float("nan"), "topk_mass": float("nan")},
                   "layers": []}


@dataclasses.dataclass(frozen=True)
class SparsityProbe:
    """How sparse a rule is, measured the one way every tool reports it (the sweep, `eval ppl`).

    Built once per model and text: `blocks`, windows of the evaluation text on which the kept
    fractions of elements and tiles are counted (with the dense probabilities, for the tile masses),
    and a greedy decode of `steps` tokens after `prompt` for the kept V rows of a decoding step
    (with dense greedy tokens, for the agreement). `measure` then costs one rule a forward pass and a
    decode, and returns the same keys for every tool, so a kept fraction means the same everywhere.
    """

    blocks: np.ndarray  # [N, context] token ids
    tile: int  # tile size of the tile metrics for a rule without a gate (a gate brings its own)
    dense_probs: Any  # per-layer dense probabilities of `blocks`; None skips the element and tile metrics
    prompt: np.ndarray  # [1, P]
    steps: int  # decoding steps for the V rows (0 skips them)
    dense_tokens: np.ndarray | None

    @classmethod
    def build(cls, model, eval_ids: np.ndarray, context: int, *, tile: int, metric_blocks: int,
              decode_prompt: int = 0, decode_steps: int = 0) -> "SparsityProbe":
        """`metric_blocks` windows of `context` tokens from the start of `eval_ids` (0: no element or tile
        metrics, which hold every layer's [B, H, T, T] probabilities at once), and a prompt of
        `decode_prompt` tokens (0: half the context) for `decode_steps` decoding steps."""
        eval_ids = np.asarray(eval_ids, np.int32).reshape(-1)
        n_blocks = max(1, min(metric_blocks, eval_ids.size // context))
        blocks = eval_ids[: n_blocks * context].reshape(n_blocks, context)
        prompt_len = decode_prompt or context // 2
        steps = max(0, min(decode_steps, context - prompt_len))
        prompt = blocks[:1, :prompt_len]
        dense_probs = layer_probs(model, blocks, AttentionConfig()) if metric_blocks > 0 else None
        dense_tokens = decode_trace(model, prompt, steps, AttentionConfig(), None)["tokens"] if steps > 0 else None
        return cls(blocks, tile, dense_probs, prompt, steps, dense_tokens)

    def settings(self) -> dict[str, Any]:
        """What the fractions were measured on, for a results file."""
        return {"metric_blocks": int(self.blocks.shape[0]) if self.dense_probs is not None else 0,
                "decode": {"prompt_tokens": int(self.prompt.shape[1]), "steps": int(self.steps)}}

    def measure(self, model, attention: AttentionConfig, thresholds) -> dict[str, Any]:
        """The rule's kept fractions and masses (`docs/metrics.md`): the mean over layers, the
        per-layer means under "layers", and the decoding V rows and token agreement."""
        metrics = (sparsity_metrics(model, self.blocks, attention, thresholds, tile=self.tile,
                                    dense_probs=self.dense_probs)
                   if self.dense_probs is not None else SKIPPED_METRICS)
        out = {
            "kept_fraction": metrics["mean"]["kept_fraction"],
            "kept_per_row": metrics["mean"]["kept_per_row"],
            "tile_kept_fraction": metrics["mean"].get("tile_kept_fraction", float("nan")),
            "gate_tile_mass": metrics["mean"].get("gate_tile_mass", float("nan")),
            "oracle_tile_mass": metrics["mean"].get("oracle_tile_mass", float("nan")),
            "topk_mass": metrics["mean"]["topk_mass"],
            "layers": metrics["layers"],
        }
        if self.steps > 0:
            # decoding gates each step as a single query either way; the prompt is one prefill
            trace = decode_trace(model, self.prompt, self.steps, attention.replace(decode_gate_rows=False), thresholds)
            out["decode_v_rows_fraction"] = float(np.nanmean(trace["v_rows"]))
            out["decode_token_agreement"] = float(np.mean(trace["tokens"] == self.dense_tokens))
        return out


def kept_line(measured: dict, where: str = "") -> str:
    """One printed line of the kept fractions that `SparsityProbe.measure` returned; `where` says
    what they were counted on."""
    def shown(key: str) -> str:
        value = measured.get(key)
        return "–" if value is None or not np.isfinite(value) else f"{value:.3f}"

    line = f"kept{f' ({where})' if where else ''}: elements {shown('kept_fraction')}, tiles {shown('tile_kept_fraction')}"
    if "decode_v_rows_fraction" in measured:
        line += (f", V rows when decoding {shown('decode_v_rows_fraction')} "
                 f"(tokens = dense {shown('decode_token_agreement')})")
    return line + " (docs/metrics.md)"


@dataclasses.dataclass
class SweepSettings:
    """What `run_sweep` needs besides the model and the token ids (the CLI fills it from its config)."""

    ks: Sequence[int]
    tile_budgets: Sequence[float | None]
    compensations: Sequence[str] = ("none", "sdc+vmc")
    tile: int = 64
    sink_tiles: int = 1
    sigma_add: float = 0.1
    stride: int | None = None
    max_length: int | None = None
    batch_size: int = 8
    metric_blocks: int = 2  # eval blocks for the element / tile metrics (0: skip them; they hold every layer's
    # [B, H, T, T] probabilities at once, which long contexts cannot afford)
    decode_prompt: int = 0  # prompt tokens for the decoding V-row measurement (0: half the context)
    decode_steps: int = 16  # decoding steps (0: skip the V-row measurement)
    gate_ks: Sequence[int] | None = None  # gated rules only at these k (None: at every k)
    gate_alone: bool = False  # also the gate with dense tiles, at every budget (the gate's own cost)
    decode_gate: bool = False  # also every gated rule with rows gated as decoding gates them
    tile_cap: bool = False  # every gate keeps at most its budget of tiles (AttentionConfig.tile_cap)
    dense_layers: Sequence[int] = ()  # layers every rule leaves dense (AttentionConfig.dense_layers)
    calibration_batch_size: int | None = None  # blocks per calibration step (None: batch_size)


def run_sweep(
    model,
    eval_ids: np.ndarray,
    calibration_blocks: np.ndarray,
    settings: SweepSettings,
    *,
    cache_dir: Path,
    model_file: Path | None = None,
    calibration_source: str = "",
    progress: Callable | None = None,
) -> dict[str, Any]:
    """Measures every variant; returns the JSON-ready results (see the module docstring)."""
    context = settings.max_length or model.config.n_positions
    ks = check_ks(settings.ks, context)
    if settings.stride is not None and settings.stride <= 0:
        raise ConfigError(f"--stride must be a positive number of tokens; got {settings.stride}.")
    outside = [layer for layer in settings.dense_layers if not 0 <= int(layer) < model.config.n_layer]
    if outside:
        raise ConfigError(f"dense_layers {outside} are not layers of this model (0 to {model.config.n_layer - 1}); "
                          "list the layers every rule should leave dense, e.g. [0].")
    if settings.tile < 1 or settings.tile > context:
        raise ConfigError(f"tile size {settings.tile} must be in [1, {context}] (the context).")
    eval_ids = np.asarray(eval_ids, np.int32).reshape(-1)
    if eval_ids.size < context:
        raise ConfigError(f"the evaluation text has {eval_ids.size} tokens, fewer than one window of {context}; "
                          "give more text or a smaller --max_length.")
    all_variants = variants(ks, settings.tile_budgets, settings.compensations, settings.gate_ks,
                            gate_alone=settings.gate_alone, decode_gate=settings.decode_gate,
                            tile_cap=settings.tile_cap)
    ppl_kwargs = dict(stride=settings.stride, max_length=context, batch_size=settings.batch_size)

    cache_dir.mkdir(parents=True, exist_ok=True)
    check_cached_thresholds(cache_dir, model)  # fail before the slow part, not halfway through
    bar = progress(total=1 + len(all_variants), desc="sweep", unit="rule") if progress else None
    dense = perplexity(model, eval_ids, **ppl_kwargs)
    probe = SparsityProbe.build(model, eval_ids, context, tile=settings.tile, metric_blocks=settings.metric_blocks,
                                decode_prompt=settings.decode_prompt, decode_steps=settings.decode_steps)
    if bar is not None:
        bar.update(1)

    thresholds: dict[tuple[int, float | None], Any] = {}
    files: dict[str, str] = {}

    def thresholds_for(v: Variant, attention: AttentionConfig):
        key = (v.k, v.tile_budget)
        if key not in thresholds:
            gate = GateSpec(settings.tile, settings.tile, v.tile_budget, settings.sink_tiles) if v.tile_budget else None
            name = f"k{v.k}-f{'off' if v.tile_budget is None else f'{v.tile_budget:g}'}.safetensors"
            recipe = dict(k=v.k, gate=dataclasses.asdict(gate) if gate else None, sigma_add=settings.sigma_add,
                          blocks=hashlib.sha256(np.ascontiguousarray(calibration_blocks, np.int32).tobytes()).hexdigest())
            thresholds[key] = cached_thresholds(
                cache_dir / name, calibration_key(model_file, recipe), model, attention,
                lambda: calibrate(model, calibration_blocks, k=v.k, sigma_add=settings.sigma_add, gate=gate,
                                  batch_size=settings.calibration_batch_size or settings.batch_size,
                                  data=calibration_source),
            )
            files[name.removesuffix(".safetensors")] = str(cache_dir / name)
        return thresholds[key]

    rows = []
    for v in all_variants:
        attention = v.attention(settings.tile, settings.sink_tiles, settings.dense_layers)
        th = thresholds_for(v, attention) if attention.needs_thresholds else None
        result = perplexity(model, eval_ids, attention=attention, thresholds=th, **ppl_kwargs)
        row = {
            "label": v.label, "method": v.method, "k": v.k, "tile_budget": v.tile_budget,
            "compensation": v.compensation, "decode_gate": v.decode_gate, "tile_cap": v.tile_cap,
            "dense_layers": sorted(attention.dense_layers),
            "ppl": result["ppl"], "nll": result["nll"],
            "delta_ppl": result["ppl"] - dense["ppl"], "delta_ppl_rel": result["ppl"] / dense["ppl"] - 1.0,
            **probe.measure(model, attention, th),
        }
        rows.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(rule=v.label, k=v.k)
    if bar is not None:
        bar.close()
    return {
        "dense": {"ppl": dense["ppl"], "nll": dense["nll"]}, "tokens": dense["tokens"], "windows": dense["windows"],
        "context": context, "stride": settings.stride or context, "tile": settings.tile, **probe.settings(),
        "rows": rows, "compensation_effect": compensation_effect(rows), "thresholds": files,
    }


def compensation_effect(rows: list[dict]) -> list[dict]:
    """Per (k, f) and compensation variant: Δppl of Top-θ without and with it, and whether it helped."""
    by_key: dict[tuple, dict] = {}
    for row in rows:
        if row["method"] == "toptheta":
            by_key.setdefault((row["k"], row["tile_budget"]), {})[row["compensation"]] = row
    out = []
    for (k, f), variants_at in by_key.items():
        if "none" not in variants_at:
            continue
        off = variants_at["none"]["delta_ppl_rel"]
        for name, row in variants_at.items():
            if name != "none":
                on = row["delta_ppl_rel"]
                out.append({"k": k, "tile_budget": f, "compensation": name, "delta_ppl_rel_none": off,
                            "delta_ppl_rel_compensated": on, "helped": bool(on < off)})
    return out

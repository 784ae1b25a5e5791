"""Stages 3 and 4: calibrate Top-θ and the tile gate on corpus training blocks, then measure each
rule on held-out corpus text and on WikiText-2 (perplexity and kept fractions).

The rules are the sweep's (`condensa.eval.sweep`): dense, exact top-k and Top-θ (with and without
SDC + VMC) at every k, and gate + Top-θ at every budget f at one k; with evaluation.gate_alone and
evaluation.decode_gate, held-out corpus text also gets the gate alone and rows gated as decoding
steps. WikiText-2 gets the rules without compensation, which is what question (b), whether the
thresholds transfer, needs.
Thresholds are calibrated once per model and (k, f) and shared by both held-out sets.
"""

from __future__ import annotations

from pathlib import Path

from condensa.attention import AttentionConfig
from condensa.eval.study.config import StudyConfig
from condensa.eval.study.data import calibration_blocks, held_out
from condensa.eval.study.training import ensure_model
from condensa.eval.sweep import SweepSettings, run_sweep
from condensa.model import load_pretrained
from condensa.sparsity import Thresholds


def sweep_settings(config: StudyConfig, compensations: tuple[str, ...], *, extra_rules: bool = True):
    cal = config.calibration
    return SweepSettings(
        ks=cal.ks, tile_budgets=[None, *cal.tile_budgets], compensations=compensations, tile=cal.tile,
        sink_tiles=cal.sink_tiles, sigma_add=cal.sigma_add, batch_size=config.evaluation.batch_size,
        metric_blocks=config.evaluation.metric_blocks, decode_steps=0, gate_ks=[cal.gate_k],
        calibration_batch_size=cal.batch_size, gate_alone=extra_rules and config.evaluation.gate_alone,
        decode_gate=extra_rules and config.evaluation.decode_gate, tile_cap=config.evaluation.tile_cap,
        dense_layers=config.evaluation.dense_layers,
    )


def evaluate_model(config: StudyConfig, name: str, progress=None) -> dict:
    hf = ensure_model(config, name)
    model, _ = load_pretrained(hf)
    blocks = calibration_blocks(config)
    cache = Path(config.out) / "thresholds" / name
    results = {}
    for split, compensations in (("corpus", ("none", "sdc+vmc")), ("wikitext", ("none",))):
        results[split] = run_sweep(
            model, held_out(config)[split], blocks, sweep_settings(config, compensations, extra_rules=split == "corpus"),
            cache_dir=cache,
            model_file=hf / "model.safetensors", calibration_source="corpus training blocks", progress=progress,
        )
    results["model_sha256"] = weights_sha256(hf)
    return results


def weights_sha256(hf: Path) -> str:
    """The evaluated weights' fingerprint, so the timing stage can tell whether it times the same copy."""
    import hashlib

    return hashlib.sha256((hf / "model.safetensors").read_bytes()).hexdigest()


def plot_model(config: StudyConfig, name: str, figures: Path) -> list[Path]:
    """The model's thresholds per layer and one attention map, dense against gate + Top-θ."""
    import numpy as np

    from condensa.eval.plots import plot_attention_heatmaps, plot_thresholds  # lazy: pulls in matplotlib

    cal = config.calibration
    cache = Path(config.out) / "thresholds" / name
    by_k = {k: Thresholds.load(cache / f"k{k}-foff.safetensors") for k in cal.ks
            if (cache / f"k{k}-foff.safetensors").is_file()}
    paths = []
    if by_k:
        paths.append(plot_thresholds(by_k, figures / f"thresholds_{name}.png"))
    f = min(cal.tile_budgets)
    gated = cache / f"k{cal.gate_k}-f{f:g}.safetensors"
    if gated.is_file():
        model, _ = load_pretrained(ensure_model(config, name))
        t = min(model.config.n_positions, 1024)  # a readable map; the full context is too large to see
        ids = np.asarray(held_out(config)["wikitext"][:t], np.int32)[None]
        attention = AttentionConfig(mode="toptheta", k=cal.gate_k, tile_gate=True, block_q=min(cal.tile, t // 4),
                                    block_k=min(cal.tile, t // 4), tile_budget=f, sink_tiles=cal.sink_tiles)
        if attention.block_q == cal.tile:
            panels = {"dense": None, f"gate f={f:g} + Top-θ k={cal.gate_k}": (attention, Thresholds.load(gated))}
            paths.append(plot_attention_heatmaps(model, ids, panels, layer=model.config.n_layer - 1, head=0,
                                                 path=figures / f"attention_{name}.png"))
    return paths

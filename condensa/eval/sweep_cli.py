"""`python -m condensa.eval sweep`: the sparsity / accuracy table of a model, in one command.

Writes under `--out`: `results.json` (every measurement), `results.md` (the table, generated from
the JSON), `ppl_vs_kept.png`, `thresholds.png`, `heatmap.png`, the resolved `config.json`, and the
calibrated thresholds (`thresholds/`, reused by the next run with the same model and settings).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from condensa.cli import check_writable, config_parser, parse_config_args, config_to_dict, plural, progress, write_json
from condensa.data import load_token_stream, pack_blocks
from condensa.errors import ConfigError
from condensa.eval.sweep import SweepSettings, Variant, check_ks, parse_tile_budgets, run_sweep
from condensa.eval.text import ModelText, read_eval_text
from condensa.model import load_pretrained
from condensa.sparsity import Thresholds


@dataclasses.dataclass
class SweepConfig:
    model: str = ""  # HF directory, .gguf file, named model (smollm2-135m) or hub id
    tokenizer: str | None = None  # default: the model directory's own tokenizer
    data: list[str] = dataclasses.field(default_factory=list)  # evaluation text: files/folders, or HF dataset name[:config]
    split: str = "test"  # split of an HF evaluation dataset
    calibration_data: list[str] = dataclasses.field(default_factory=lambda: ["../shared/data/corpus"])  # calibration text
    calibration_samples: int = 64  # calibration blocks of max_length tokens
    token_cache: str = "~/.cache/condensa/tokens"  # tokenized calibration text is cached here ($CONDENSA_CACHE_DIR moves ~/.cache/condensa)
    ks: list[int] = dataclasses.field(default_factory=lambda: [8, 16, 32, 64, 128, 256])  # the k values (kept per row)
    tile_budgets: list[Any] = dataclasses.field(default_factory=lambda: ["off", 0.5, 0.25, 0.125])  # gate budgets f, or off
    compensations: list[str] = dataclasses.field(default_factory=lambda: ["none", "sdc+vmc"])  # none / sdc+vmc / exact+vmc
    tile: int = 64  # gate tile size (block_q = block_k), and the tile size of the tile metrics
    sink_tiles: int = 1  # leading key tiles the gate always keeps
    sigma_add: float = 0.1  # calibration: θ = mean + sigma_add * std
    stride: int | None = None  # default: the window length
    max_length: int | None = None  # default: n_positions
    max_tokens: int | None = None  # evaluate only the first N tokens (quick runs)
    batch_size: int = 8  # windows per forward pass
    metric_blocks: int = 2  # windows of evaluation text for the element / tile metrics and heatmaps
    decode_steps: int = 16  # KV-cache decoding steps for the V-row fraction (0: skip)
    gate_alone: bool = False  # also the gate with dense tiles at every budget: the gate's own perplexity cost
    decode_gate: bool = False  # also each gated rule with every row gated as its decoding step gates it
    tile_cap: bool = False  # every gate keeps at most its budget of tiles, the best-scored above Θ
    dense_layers: list[int] = dataclasses.field(default_factory=list)  # layers every rule leaves dense
    heatmap_layer: int = 0  # layer shown in heatmap.png
    heatmap_head: int = 0  # head shown in heatmap.png
    heatmap_k: int | None = None  # default: the middle k of the sweep
    out: str = "runs/eval-sweep"  # output folder: results, tables, plots and cached thresholds/


def calibration_blocks(cfg: SweepConfig, text: ModelText, context: int) -> np.ndarray:
    """`calibration_samples` blocks of the calibration text, spread over all of it by a seeded shuffle."""
    if not cfg.calibration_data:
        raise ConfigError("no calibration text given; pass --calibration_data FILE_OR_FOLDER (e.g. ../shared/data/corpus).")
    stream = np.concatenate([load_token_stream(s, text.tokenizer, cache_dir=cfg.token_cache) for s in cfg.calibration_data])
    blocks = pack_blocks(text.to_model_ids(stream), context)
    order = np.random.default_rng(0).permutation(len(blocks))[: max(1, cfg.calibration_samples)]
    return blocks[np.sort(order)]


def run(cfg: SweepConfig) -> dict:
    if not cfg.model:
        raise ConfigError("no model given; pass --model DIR (a Hugging Face GPT-2 directory) or a hub id.")
    if cfg.stride is not None and cfg.stride <= 0:
        raise ConfigError(f"--stride must be a positive number of tokens; got {cfg.stride}.")
    budgets = parse_tile_budgets(cfg.tile_budgets)
    out = check_writable(cfg.out)
    model, model_config = load_pretrained(cfg.model)
    context = cfg.max_length or model_config.n_positions
    if context > model_config.n_positions:
        raise ConfigError(f"--max_length {context} exceeds the model's n_positions={model_config.n_positions}.")
    ks = check_ks(cfg.ks, context)  # before the slow parts
    if cfg.heatmap_k is not None and cfg.heatmap_k not in ks:
        raise ConfigError(f"--heatmap_k {cfg.heatmap_k} is not one of the swept ks {ks}; pick one of them.")
    if not 0 <= cfg.heatmap_layer < model_config.n_layer or not 0 <= cfg.heatmap_head < model_config.n_head:
        raise ConfigError(f"heatmap layer/head ({cfg.heatmap_layer}, {cfg.heatmap_head}) outside the model's "
                          f"{model_config.n_layer} layers x {model_config.n_head} heads.")
    text = ModelText.for_model(cfg.model, cfg.tokenizer)
    eval_ids = text.encode(read_eval_text(cfg.data, cfg.split), cfg.max_tokens)
    settings = SweepSettings(
        ks=ks, tile_budgets=budgets, compensations=cfg.compensations, tile=cfg.tile, sink_tiles=cfg.sink_tiles,
        sigma_add=cfg.sigma_add, stride=cfg.stride, max_length=context, batch_size=cfg.batch_size,
        metric_blocks=cfg.metric_blocks, decode_steps=cfg.decode_steps, gate_alone=cfg.gate_alone,
        decode_gate=cfg.decode_gate, tile_cap=cfg.tile_cap, dense_layers=cfg.dense_layers,
    )
    model_file = Path(cfg.model) / "model.safetensors"
    results = run_sweep(
        model, eval_ids, calibration_blocks(cfg, text, context), settings, cache_dir=out / "thresholds",
        model_file=model_file if model_file.is_file() else None, calibration_source=",".join(cfg.calibration_data),
        progress=progress,
    )
    results["model"] = cfg.model
    results["data"] = list(cfg.data)
    results["plots"] = write_plots(cfg, results, model, eval_ids, out)
    write_json(out / "results.json", results)
    write_json(out / "config.json", config_to_dict(cfg))  # only with the results it made
    (out / "results.md").write_text(markdown_table(results))
    print(text_table(results))
    print(f"-> {out / 'results.json'}, {out / 'results.md'}, plots in {out}")
    return results


def write_plots(cfg: SweepConfig, results: dict, model, eval_ids: np.ndarray, out: Path) -> dict[str, str]:
    from condensa.eval import plots  # lazy: pulls in matplotlib

    files = {"ppl_vs_kept": plots.plot_ppl_vs_kept(results, out / "ppl_vs_kept.png")}
    ks = sorted({row["k"] for row in results["rows"]})
    budgets = list(dict.fromkeys(row["tile_budget"] for row in results["rows"] if row["method"] == "toptheta"
                                 and not row.get("decode_gate")))
    first = "off" if None in budgets else f"{budgets[0]:g}"
    by_k = {k: Thresholds.load(results["thresholds"][f"k{k}-f{first}"]) for k in ks}
    files["thresholds"] = plots.plot_thresholds(by_k, out / "thresholds.png")
    k = cfg.heatmap_k if cfg.heatmap_k in ks else ks[len(ks) // 2]
    chosen = [Variant("topk", k)] + [Variant("toptheta", k, f) for f in budgets[:2]]
    context = results["context"]
    blocks = np.asarray(eval_ids[: results["metric_blocks"] * context]).reshape(-1, context)
    panels = {"dense": None}
    for v in chosen:
        key = f"k{k}-f{'off' if v.tile_budget is None else f'{v.tile_budget:g}'}"
        panels[f"{v.label}, k={k}"] = (v.attention(cfg.tile, cfg.sink_tiles, cfg.dense_layers),
                                       Thresholds.load(results["thresholds"][key]) if v.method == "toptheta" else None)
    files["heatmap"] = plots.plot_attention_heatmaps(
        model, blocks, panels, layer=cfg.heatmap_layer, head=cfg.heatmap_head, path=out / "heatmap.png")
    return {name: str(path) for name, path in files.items()}


COLUMNS = [  # (JSON key, header, format)
    ("label", "rule", "{}"), ("k", "k", "{}"), ("ppl", "ppl", "{:.3f}"), ("delta_ppl_rel", "Δppl", "{:+.2%}"),
    ("kept_fraction", "kept elements", "{:.3f}"), ("tile_kept_fraction", "kept tiles", "{:.3f}"),
    ("decode_v_rows_fraction", "V rows (decode)", "{:.3f}"), ("gate_tile_mass", "gate mass", "{:.3f}"),
    ("oracle_tile_mass", "oracle mass", "{:.3f}"), ("decode_token_agreement", "tokens = dense", "{:.2f}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def markdown_table(results: dict) -> str:
    """The Markdown report, generated from results.json only (so it can be rebuilt from the JSON)."""
    lines = [
        f"# Sparsity sweep: {results.get('model', '')}",
        "",
        f"Dense perplexity {results['dense']['ppl']:.3f} on {results['tokens']} tokens "
        f"({plural(results['windows'], 'window')} of {results['context']}, stride {results['stride']}); "
        f"tile size {results['tile']}; metrics on {plural(results['metric_blocks'], 'window')}; V rows over "
        f"{plural(results['decode']['steps'], 'greedy decoding step')} after a {results['decode']['prompt_tokens']}-token "
        "prompt.",
        "",
        "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in COLUMNS) + " |" for row in results["rows"]]
    effect = results.get("compensation_effect", [])
    if effect:
        lines += ["", "## Compensation on Top-θ", "",
                  "| k | gate f | compensation | Δppl without | Δppl with | helped |", "|---|---|---|---|---|---|"]
        for e in effect:
            f = "off" if e["tile_budget"] is None else f"{e['tile_budget']:g}"
            lines.append(f"| {e['k']} | {f} | {e['compensation']} | {e['delta_ppl_rel_none']:+.2%} | "
                         f"{e['delta_ppl_rel_compensated']:+.2%} | {'yes' if e['helped'] else 'no'} |")
    plots = results.get("plots", {})
    if plots:
        lines += [""] + [f"![{name}]({Path(path).name})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def text_table(results: dict) -> str:
    """The short table printed at the end of a run."""
    header = f"{'rule':34s} {'k':>5s} {'ppl':>9s} {'Δppl':>8s} {'kept':>6s} {'tiles':>6s} {'V rows':>6s}"
    lines = [f"dense perplexity {results['dense']['ppl']:.3f}", header]
    for row in results["rows"]:
        lines.append(f"{row['label']:34s} {row['k']:5d} {row['ppl']:9.3f} {row['delta_ppl_rel']:+8.2%} "
                     f"{row['kept_fraction']:6.3f} {_cell(row, 'tile_kept_fraction', '{:.3f}'):>6s} "
                     f"{_cell(row, 'decode_v_rows_fraction', '{:.3f}'):>6s}")
    return "\n".join(lines)


PARSER = dict(  # the command line, shared by main() and build_parser()
    prog="python -m condensa.eval sweep",
    description="Perplexity against sparsity for top-k, Top-θ and gate + Top-θ, at every k, tile budget f "
    "(or 'off') and compensation variant (none, sdc+vmc, exact+vmc). Thresholds are calibrated on --calibration_data and "
    "cached under OUT/thresholds. Any key of the config can be set as --key value, lists as a,b,c.",
    epilog="example: python -m condensa.eval sweep --model runs/quickstart/hf --tokenizer ../shared/data/gpt2-tokenizer "
    "--data ../shared/data/wikitext-2-raw/wiki.test.raw --calibration_data ../shared/data/corpus "
    "--ks 8,16,32 --tile_budgets off,0.25 --tile 16 --out runs/sweep"
    "\n\nEvery key of results.json (and column of results.md) is explained in docs/metrics.md.",
)


def build_parser():
    """This tool's argparse parser (for --help and docs/cli.md)."""
    return config_parser(SweepConfig, **PARSER)


def main(argv) -> None:
    run(parse_config_args(argv, SweepConfig, **PARSER))

"""python -m condensa.eval.attention_figure: one head's attention, dense next to gate + Top-θ.

    python -m condensa.eval.attention_figure --model runs/quickstart/hf \
        --thresholds runs/thresholds/thresholds.safetensors \
        --data ../shared/data/wikitext-2-raw/wiki.test.raw --out docs/img/attention_maps.png

The sparse rule is read from the thresholds file itself (its k, placement and, when it holds a
gate, its tile sizes and budget), so the picture always shows what those thresholds do. The
README's picture is made with this command.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from condensa.cli import config_parser, parse_config_args
from condensa.data import model_tokenizer
from condensa.errors import ConfigError, DataError
from condensa.eval.text import read_eval_text
from condensa.model import load_pretrained
from condensa.sparsity import Thresholds


@dataclasses.dataclass
class FigureConfig:
    """The options of `python -m condensa.eval.attention_figure` (YAML keys = these names)."""

    model: str = ""  # HF directory, .gguf file, named model (smollm2-135m) or hub id
    thresholds: str = ""  # a thresholds file from python -m condensa.calibrate
    data: list[str] = dataclasses.field(default_factory=list)  # text files/folders, or HF dataset name[:config]
    split: str = "test"  # split of an HF dataset
    tokenizer: str | None = None  # default: the model directory's own tokenizer
    offset: int = 0  # first token of the block shown
    length: int | None = None  # tokens shown (default: n_positions)
    layer: int = -1  # negative counts from the last layer
    head: int = 0  # the attention head drawn
    out: str = "attention_maps.png"  # the PNG to write


def draw(cfg: FigureConfig) -> Path:
    from condensa.eval.plots import plot_attention_heatmaps  # lazy: pulls in matplotlib

    if not cfg.model or not cfg.thresholds:
        raise ConfigError("pass --model DIR and --thresholds FILE (from python -m condensa.calibrate).")
    model, config = load_pretrained(cfg.model)
    if not -config.n_layer <= cfg.layer < config.n_layer:
        raise ConfigError(f"--layer {cfg.layer} is not a layer of this model (0..{config.n_layer - 1}, or -1 for "
                          "the last).")
    thresholds = Thresholds.load(cfg.thresholds)
    attention = thresholds.attention()  # the rule the file was calibrated for
    thresholds.validate_for(config, attention, source=cfg.thresholds)
    length = cfg.length or config.n_positions
    ids = model_tokenizer(cfg.model, cfg.tokenizer)(read_eval_text(cfg.data, cfg.split), verbose=False)["input_ids"]
    block = np.asarray(ids[cfg.offset : cfg.offset + length], np.int32)
    if block.size < length:
        raise DataError(f"the text has {len(ids)} tokens, fewer than --offset {cfg.offset} + --length {length}.")
    layer = cfg.layer % config.n_layer
    if not 0 <= cfg.head < config.n_head:
        raise ConfigError(f"--head {cfg.head} is not a head of this model (0..{config.n_head - 1}).")
    name = "gate + Top-θ" if attention.tile_gate else "Top-θ"
    budget = f", f={attention.tile_budget:g}, {attention.block_q}×{attention.block_k} tiles" if attention.tile_gate else ""
    panels = {"dense": None, f"{name} (k={attention.k}{budget})": (attention, thresholds)}
    return plot_attention_heatmaps(model, block[None], panels, layer=layer, head=cfg.head, path=Path(cfg.out))


PARSER = dict(
    prog="python -m condensa.eval.attention_figure",
    description="Draws one layer and head's attention probabilities on a block of text: dense next to the "
    "sparse rule of a thresholds file (gate + Top-θ when it holds a gate), colours log10 p, dropped elements "
    "blank, with the sparse panel's kept fraction of the causal elements in its title. Writes a PNG.",
    epilog="example: python -m condensa.eval.attention_figure --model runs/quickstart/hf --thresholds "
    "runs/thresholds/thresholds.safetensors --data ../shared/data/wikitext-2-raw/wiki.test.raw --out attention.png",
)


def build_parser():
    """This tool's argparse parser (for --help and docs/cli.md)."""
    return config_parser(FigureConfig, **PARSER)


def main(argv=None) -> None:
    path = draw(parse_config_args(argv, FigureConfig, **PARSER))
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    import sys

    from condensa.cli import run_main

    sys.exit(run_main(main)())

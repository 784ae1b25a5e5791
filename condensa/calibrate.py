"""python -m condensa.calibrate: calibrate Top-θ (and tile-gate) thresholds for a GPT-2.

    python -m condensa.calibrate --model gpt2 --data ../shared/data/corpus --k 64 \
        --tile 128 --tile-budget 0.125 --samples 256 --out runs/thresholds-k64

Writes OUT/thresholds.safetensors, OUT/summary.json (achieved kept elements per row vs k, per
layer, on held-out blocks) and OUT/config.yaml (the resolved settings). A YAML file given with
--config supplies defaults; flags and dotted overrides (--sigma_add 0.2) win over it.
"""

from __future__ import annotations

import argparse
import json
import dataclasses
from collections.abc import Sequence

import yaml

from condensa.cli import check_writable, load_config, progress, run_main
from condensa.sparsity.calibration import CalibrationConfig, run_calibration

_FLAGS = {  # flag -> (config key, help)
    "--model": ("model", "model: HF directory (config.json + weights), .gguf file, named model (smollm2-135m) or hub id"),
    "--data": ("data", "calibration text: text files, folders of .txt, or HF datasets name[:config]"),
    "--tokenizer": ("tokenizer", "tokenizer directory or hub id (default: the model directory)"),
    "--k": ("k", "target kept elements per row (rows with n <= k stay dense)"),
    "--layer-k": ("layer_k", "per-layer k overrides, e.g. 0:512,1:512"),
    "--placement": ("placement", "pre (threshold the scaled logits) or post (threshold the probabilities)"),
    "--sigma-add": ("sigma_add", "theta = mean + sigma_add * std of the per-row thresholds (default 0.1)"),
    "--length-pooling": ("length_pooling", "theta and the SDC table of row length n pool the samples of lengths "
                         "within n (1 +- this), against the noise of few blocks (default 0: one length per cell)"),
    "--tile": ("tile", "tile size of the gate (block_q = block_k); 0 or absent = no gate"),
    "--tile-budget": ("tile_budget", "gate budget f: m_b = max(1, ceil(f (b + 1))) optional tiles (default 0.125)"),
    "--sink-tiles": ("sink_tiles", "leading key tiles the gate always keeps (default 1)"),
    "--samples": ("samples", "number of calibration blocks (default 256)"),
    "--seq-len": ("seq_len", "tokens per block (default: the model's n_positions)"),
    "--batch-size": ("batch_size", "blocks per jitted step (default 8)"),
    "--check-blocks": ("check_blocks", "held-out blocks for the summary (default 8)"),
    "--seed": ("seed", "seed of the block shuffle"),
    "--out": ("out", "output folder"),
}


_STRING_KEYS = {f.name for f in dataclasses.fields(CalibrationConfig) if f.type in (str, "str")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m condensa.calibrate",
        description=__doc__.split("\n\n")[0] + " For each layer, head and row length, theta is set so "
        "that `score > theta` keeps k elements on average on the calibration text.",
        epilog="Any CalibrationConfig key can also be set as --key value (e.g. --check_blocks 4).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file with calibration settings (keys as in the flags, with _)")
    for flag, (key, help_text) in _FLAGS.items():
        parser.add_argument(flag, dest=key, nargs="+" if key == "data" else None, help=help_text)
    parser.add_argument("--topk-at-calibration", dest="topk_at_calibration", action="store_true",
                        help="run exact top-k in the layers before the one being calibrated")
    return parser


def parse_config(argv: Sequence[str] | None) -> CalibrationConfig:
    args, extra = build_parser().parse_known_args(argv)
    values = vars(args)
    config_path = values.pop("config", None)
    overrides = []
    for key, value in values.items():
        if isinstance(value, list):
            text = ",".join(value)
        elif value is True:
            text = "true"
        elif key in _STRING_KEYS:
            text = json.dumps(value)  # quoted, so YAML never reads "1:30" as the number 90
        else:
            text = str(value)
        overrides += [f"--{key}", text]
    return load_config(CalibrationConfig, config_path, overrides + list(extra))


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    out = check_writable(config.out)
    summary = run_calibration(config, progress=lambda it: progress(it, desc="calibrating", unit="batch"))
    # the config only beside the thresholds it made (a failed run leaves the folder's old pair as it was)
    config_tmp = out / ".config.yaml.tmp"
    config_tmp.write_text(yaml.safe_dump(_plain(dataclasses.asdict(config)), sort_keys=False))
    config_tmp.replace(out / "config.yaml")
    for entry in summary["layers"]:
        line = f"layer {entry['layer']}: kept/row {entry['kept_per_row']:.1f} vs k={entry['k']} ({entry['ratio']:.2f}x)"
        if "tiles_ratio" in entry:
            line += f", gate tiles {entry['tiles_ratio']:.2f}x budget"
        print(line)
    print(f"wrote {summary['thresholds']}")


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


cli = run_main(main)

if __name__ == "__main__":
    raise SystemExit(cli())

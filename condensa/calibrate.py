"""python -m condensa.calibrate: calibrate Top-θ (and tile-gate) thresholds for a GPT-2 or LLaMA-family model.

    python -m condensa.calibrate --model gpt2 --data ../shared/data/corpus --k 64 \
        --tile 128 --tile_budget 0.125 --samples 256 --out runs/thresholds-k64

Writes OUT/thresholds.safetensors, OUT/summary.json (achieved kept elements per row vs k, per
layer, on held-out blocks) and OUT/config.yaml (the resolved settings). A YAML file given with
--config supplies the keys of CalibrationConfig; --key value (--sigma_add 0.2) wins over it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import yaml

from condensa.cli import check_writable, config_parser, parse_config_args, progress, run_main
from condensa.sparsity.calibration import CalibrationConfig, run_calibration

PARSER = dict(  # the command line, shared by main() and build_parser()
    prog="python -m condensa.calibrate",
    description="Calibrate Top-θ (and tile-gate) thresholds. For each layer, head and row length, θ is set "
    "so that `score > θ` keeps k elements on average on the calibration text. A YAML file given with "
    "--config supplies the keys; --key value overrides any of them.",
    epilog="example: python -m condensa.calibrate --model smollm2-135m --data ../shared/data/corpus/misc "
    "--k 64 --tile 128 --tile_budget 0.125 --samples 256 --out runs/thresholds-k64"
    "\n\nEvery key of summary.json is explained in docs/metrics.md.",
)


def build_parser():
    """This tool's argparse parser (for --help and docs/cli.md)."""
    return config_parser(CalibrationConfig, **PARSER)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config_args(argv, CalibrationConfig, **PARSER)
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

"""python -m condensa.export: a training checkpoint -> a Hugging Face directory (GPT-2 or LLaMA family).

    python -m condensa.export runs/quickstart --out runs/quickstart/hf-export \
        --thresholds runs/thresholds/thresholds.safetensors --verify

Reads a checkpoint of a `python -m condensa.train` run (the newest one that reads back intact, or
--step N) and writes OUT/config.json + model.safetensors + the tokenizer, which
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` (GPT2LMHeadModel, LlamaForCausalLM, ...) and
`condensa.load_pretrained(OUT)` load.
--thresholds copies a thresholds file into OUT/thresholds.safetensors after checking that it fits
the model. --verify reloads OUT in transformers (PyTorch, CPU) and fails unless its logits match
condensa's on a few real tokens. OUT/export.json records the settings, the step and the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from condensa.cli import config_to_dict, load_config, run_main, write_json
from condensa.errors import CheckpointError, ConfigError

THRESHOLDS_FILE = "thresholds.safetensors"


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    run: str = ""  # the training run's output folder (its --out; it holds config.yaml and checkpoints/)
    out: str = ""  # the HF directory to write; default RUN/hf-step<N>
    step: int | None = None  # default: the newest checkpoint that reads back intact
    thresholds: str | None = None  # a file from python -m condensa.calibrate, copied next to the weights
    verify: bool = False  # compare logits with transformers (AutoModelForCausalLM: GPT2LMHeadModel, LlamaForCausalLM, ...; needs torch)
    tolerance: float = 1e-4  # --verify fails when max |logit difference| is larger

    def __post_init__(self) -> None:
        if not self.run:
            raise ConfigError("no training run given; pass its output folder: python -m condensa.export RUN_DIR.")
        if self.step is not None and self.step < 1:
            raise ConfigError(f"--step must be a checkpoint step >= 1; got {self.step}.")
        if not self.tolerance > 0:
            raise ConfigError(f"--tolerance must be > 0; got {self.tolerance}.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m condensa.export",
        description=__doc__.split("\n\n", 2)[2].replace("\n", " "),
        epilog="example: python -m condensa.export runs/quickstart --out runs/quickstart/hf-export --verify",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("run", nargs="?", help="output folder of the training run (holds config.yaml, checkpoints/)")
    parser.add_argument("--config", help="YAML file with these settings (keys: run, out, step, thresholds, verify, tolerance)")
    parser.add_argument("--out", help="HF directory to write (default: RUN/hf-step<N>)")
    parser.add_argument("--step", type=int, help="checkpoint step to export (default: the newest good one)")
    parser.add_argument("--thresholds", help="thresholds file to validate against the model and copy into OUT")
    parser.add_argument("--verify", action="store_true",
                        help="reload OUT in transformers (torch, CPU) and compare logits with condensa")
    parser.add_argument("--tolerance", type=float, help="largest max |logit difference| --verify accepts (1e-4)")
    return parser


def parse_config(argv: Sequence[str] | None) -> ExportConfig:
    values = vars(build_parser().parse_args(argv))
    config_path = values.pop("config", None)
    overrides = []
    for key, value in values.items():
        overrides += [f"--{key}", json.dumps(value)]  # JSON is YAML: strings stay strings
    return load_config(ExportConfig, config_path, overrides)


def export(cfg: ExportConfig) -> dict:
    """Restores, validates, writes and (optionally) verifies; returns what export.json records."""
    from condensa.model.transformers_check import max_logit_difference, sample_ids
    from condensa.sparsity import Thresholds
    from condensa.train.export import restore_run, save_hf

    restored = restore_run(cfg.run, cfg.step)
    thresholds = None
    if cfg.thresholds:
        thresholds = Thresholds.load(cfg.thresholds).validate_for(restored.config, source=cfg.thresholds)
    out = Path(cfg.out or restored.run / f"hf-step{restored.step}")
    save_hf(restored.model, restored.config, out, tokenizer=restored.tokenizer, kept_ids=restored.kept_ids,
            vocab_size=restored.vocab_size)
    if thresholds is not None:
        shutil.copyfile(cfg.thresholds, out / THRESHOLDS_FILE)
    record = {"config": config_to_dict(cfg), "step": restored.step, "out": str(out)}
    print(f"exported step {restored.step} of {cfg.run} to {out}")
    if cfg.verify:
        context = getattr(restored.config, "n_positions", None) or restored.config.max_position_embeddings
        ids = sample_ids(restored.tokenizer, context, restored.kept_ids, restored.vocab_size - 1)
        diff = max_logit_difference(restored.model, out, ids)
        record["verify"] = {"max_abs_logit_diff": diff, "tokens": int(ids.size), "tolerance": cfg.tolerance}
        write_json(out / "export.json", record)
        print(f"verify: max |logit difference| condensa vs transformers = {diff:.3g} on {ids.size} tokens "
              f"(tolerance {cfg.tolerance:g})")
        if not diff <= cfg.tolerance:
            raise CheckpointError(
                f"the export in {out} does not reproduce the model in transformers: max |logit difference| "
                f"{diff:.3g} > {cfg.tolerance:g}. Report it as a bug, with {out / 'export.json'}."
            )
    else:
        write_json(out / "export.json", record)
    return record


def main(argv: Sequence[str] | None = None) -> None:
    export(parse_config(argv))


cli = run_main(main)

if __name__ == "__main__":
    raise SystemExit(cli())

"""python -m condensa.export: a training checkpoint, or any model condensa loads (a GGUF file, a
named model), -> a Hugging Face directory (GPT-2 or LLaMA family).

    python -m condensa.export runs/quickstart --out runs/quickstart/hf-export \
        --thresholds runs/thresholds/thresholds.safetensors --verify
    python -m condensa.export --model smollm2-135m --out runs/smollm2-hf --verify

Reads a checkpoint of a `python -m condensa.train` run (the newest one that reads back intact, or
--step N), or with --model any model `load_pretrained` reads (a .gguf file, `smollm2-135m`, an HF
directory or hub id; GGUF weights are written dequantised, as float32), and writes
OUT/config.json + model.safetensors + the tokenizer, which
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` (GPT2LMHeadModel, LlamaForCausalLM, ...) and
`condensa.load_pretrained(OUT)` load.
--thresholds copies a thresholds file into OUT/thresholds.safetensors after checking that it fits
the model. --verify reloads OUT in transformers (PyTorch, CPU) and fails unless its logits match
condensa's on a few real tokens. OUT/export.json records the settings, the step and the check.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from condensa.cli import check_writable, config_parser, config_to_dict, parse_config_args, run_main, write_json
from condensa.errors import CheckpointError, ConfigError
from condensa.model.transformers_check import max_logit_difference, sample_ids
from condensa.sparsity import Thresholds
from condensa.train.run_model import loaded_model, restore_run, save_hf

THRESHOLDS_FILE = "thresholds.safetensors"


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    run: str = ""  # the training run's output folder (its --out; it holds config.yaml and checkpoints/)
    model: str = ""  # instead of a run: a model to convert (a .gguf file, smollm2-135m, an HF directory or hub id)
    out: str = ""  # the HF directory to write; default RUN/hf-step<N> (required with --model)
    step: int | None = None  # default: the newest checkpoint that reads back intact
    thresholds: str | None = None  # a file from python -m condensa.calibrate, copied next to the weights
    verify: bool = False  # compare logits with transformers (AutoModelForCausalLM: GPT2LMHeadModel, LlamaForCausalLM, ...; needs torch)
    tolerance: float = 1e-4  # --verify fails when max |logit difference| is larger
    force: bool = False  # write into an --out that holds another model's files (they are cleared first)

    def __post_init__(self) -> None:
        if not self.run and not self.model:
            raise ConfigError("nothing to export; pass a training run's output folder (python -m condensa.export "
                              "RUN_DIR) or a model to convert (--model smollm2-135m --out DIR).")
        if self.run and self.model:
            raise ConfigError(f"pass a training run ({self.run}) or --model ({self.model}), not both.")
        if self.model and not self.out:
            raise ConfigError("--model needs --out DIR, the Hugging Face directory to write.")
        if self.model and self.step is not None:
            raise ConfigError("--step picks a checkpoint of a training run; it does not apply to --model.")
        if self.step is not None and self.step < 1:
            raise ConfigError(f"--step must be a checkpoint step >= 1; got {self.step}.")
        if not self.tolerance > 0:
            raise ConfigError(f"--tolerance must be > 0; got {self.tolerance}.")


PARSER = dict(  # the command line, shared by parse_config() and build_parser()
    prog="python -m condensa.export",
    description=__doc__.split("\n\n", 2)[2].replace("\n", " ") + " The run's folder may also come first, "
    "without --run: python -m condensa.export RUN_DIR [--key value ...].",
    epilog="example: python -m condensa.export runs/quickstart --out runs/quickstart/hf-export --verify",
)


def build_parser():
    """This tool's argparse parser (for --help and docs/cli.md)."""
    return config_parser(ExportConfig, **PARSER)


def parse_config(argv: Sequence[str] | None) -> ExportConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # the run's folder, given first as a bare path
        argv = ["--run", *argv]
    return parse_config_args(argv, ExportConfig, **PARSER)


# What an export writes (the tokenizer's files vary by tokenizer): replacing an export clears them
# all, so no stale tokenizer or thresholds of another model stay beside the new weights.
_EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "vocab_map.json", "export.json",
                 THRESHOLDS_FILE, "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                 "chat_template.jinja")


def _source_of(cfg: ExportConfig, restored) -> str:
    """What an export is of, as export.json records it: the run's folder, or the model as given."""
    return str(Path(restored.run).resolve()) if cfg.run else str(cfg.model)


def _prepare_target(out: Path, cfg: ExportConfig, source: str) -> None:
    """Refuses an --out that holds anything but an export of the same run or model (unless
    --force), and clears the files of the export it replaces."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        earlier = json.loads((out / "export.json").read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if not (earlier == source or cfg.force):
        held = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise CheckpointError(f"{out} already holds files ({held}, ...) that are not an export of {source}; "
                              "choose an empty --out, or pass --force to replace the export files in it.")
    for path in out.iterdir():
        if path.is_file() and (path.name in _EXPORT_FILES or path.name.startswith("tokenizer")):
            path.unlink()


def export(cfg: ExportConfig) -> dict:
    """Restores, validates, writes and (optionally) verifies; returns what export.json records."""
    if cfg.out:  # before restoring, which takes a while; a refused export leaves no folder behind
        check_writable(cfg.out, create=False)
    restored = restore_run(cfg.run, cfg.step) if cfg.run else loaded_model(cfg.model)
    thresholds = None
    if cfg.thresholds:
        thresholds = Thresholds.load(cfg.thresholds).validate_for(restored.config, source=cfg.thresholds)
    out = check_writable(cfg.out or restored.run / f"hf-step{restored.step}", create=False)
    _prepare_target(out, cfg, _source_of(cfg, restored))
    save_hf(restored.model, restored.config, out, tokenizer=restored.tokenizer, kept_ids=restored.kept_ids,
            vocab_size=restored.vocab_size)
    if thresholds is not None:
        shutil.copyfile(cfg.thresholds, out / THRESHOLDS_FILE)
    record = {"config": config_to_dict(cfg), "step": restored.step, "out": str(out), "source": _source_of(cfg, restored)}
    what = f"step {restored.step} of {cfg.run}" if cfg.run else cfg.model
    print(f"exported {what} to {out}" + ("" if restored.tokenizer is not None else " (the model has no tokenizer to copy)"))
    if cfg.verify:
        context = getattr(restored.config, "n_positions", None) or restored.config.max_position_embeddings
        if restored.tokenizer is None:
            raise CheckpointError(f"--verify needs a tokenizer to make its test tokens, and {cfg.model} has none; "
                                  "export without --verify.")
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

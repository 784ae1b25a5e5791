"""`python -m condensa.eval ppl`: perplexity of a model on a text under any attention rule."""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from condensa.attention import AttentionConfig
from condensa.cli import check_writable, config_parser, config_to_dict, parse_config_args, plural, progress, write_json
from condensa.errors import ConfigError
from condensa.data import model_tokenizer
from condensa.eval.perplexity import perplexity
from condensa.eval.rule import with_thresholds
from condensa.eval.sweep import SparsityProbe, kept_line
from condensa.eval.text import read_eval_text
from condensa.model import load_pretrained

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class PerplexityConfig:
    model: str = ""  # HF directory, .gguf file, named model (smollm2-135m) or hub id
    data: list[str] = dataclasses.field(default_factory=list)  # text files/folders, or HF dataset name[:config]
    split: str = "test"  # split of an HF dataset
    tokenizer: str | None = None  # default: the model directory's own tokenizer
    stride: int | None = None  # default: the window length (no overlap)
    max_length: int | None = None  # default: n_positions
    max_tokens: int | None = None  # evaluate only the first N tokens (quick runs)
    batch_size: int = 8  # windows per forward pass
    dtype: str = "float32"  # model compute dtype: float32, bfloat16 or float16
    thresholds: str | None = None  # from `python -m condensa.calibrate`; sets the attention keys left unset (k, gate)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    metric_blocks: int = 2  # sparse rules: windows on which the kept elements and tiles are counted (0: skip)
    decode_steps: int = 16  # sparse rules: greedy decoding steps for the kept V rows (0: skip)
    out: str = "runs/eval-ppl"  # output folder: results.json (with a sparse rule's kept fractions) and config.json


def run(cfg: PerplexityConfig) -> dict:
    if not cfg.model:
        raise ConfigError("no model given; pass --model DIR (a Hugging Face GPT-2 directory) or a hub id.")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype {cfg.dtype!r} is not one of {', '.join(DTYPES)}.")
    if cfg.attention.needs_thresholds and not cfg.thresholds:
        raise ConfigError(f"--attention.mode {cfg.attention.mode} needs calibrated thresholds: pass --thresholds FILE "
                          "(made by python -m condensa.calibrate).")
    check_writable(cfg.out, create=False)  # before the load; created once the settings are known good
    model, _ = load_pretrained(cfg.model, dtype=DTYPES[cfg.dtype])
    cfg, thresholds = with_thresholds(cfg, model.config)
    out = check_writable(cfg.out)
    tokenizer = model_tokenizer(cfg.model, cfg.tokenizer)
    ids = tokenizer(read_eval_text(cfg.data, cfg.split), verbose=False)["input_ids"]
    if cfg.max_tokens:
        ids = ids[: cfg.max_tokens]
    start = time.perf_counter()
    result = perplexity(
        model, ids, stride=cfg.stride, max_length=cfg.max_length, batch_size=cfg.batch_size,
        attention=cfg.attention, thresholds=thresholds, progress=progress,
    )
    result.update(seconds=time.perf_counter() - start, mode=cfg.attention.mode, stride=cfg.stride)
    if not cfg.attention.is_dense:  # how sparse the rule was, counted as the sweep counts it
        result.update(kept_fractions(model, ids, cfg, thresholds))
    write_json(out / "results.json", result)
    write_json(out / "config.json", config_to_dict(cfg))  # only with the results it made
    print(f"perplexity {result['ppl']:.4f}  (nll {result['nll']:.4f}, {result['tokens']} tokens, "
          f"{plural(result['windows'], 'window')}, {cfg.attention.mode} attention) -> {out / 'results.json'}")
    if not cfg.attention.is_dense:
        print(kept_line(result))
    return result


def kept_fractions(model, ids, cfg: PerplexityConfig, thresholds) -> dict:
    """The sweep's sparsity measurement (`SparsityProbe`) of cfg.attention on the first windows of
    the text; a rule without a gate counts tiles of its attention config's block_k."""
    ids = np.asarray(ids, np.int32)
    context = min(cfg.max_length or model.config.n_positions, ids.size)
    probe = SparsityProbe.build(model, ids, context, tile=cfg.attention.block_k, metric_blocks=cfg.metric_blocks,
                                decode_steps=cfg.decode_steps)
    return {**probe.measure(model, cfg.attention, thresholds), **probe.settings()}


PARSER = dict(  # the command line, shared by main() and build_parser()
    prog="python -m condensa.eval ppl",
    description="Strided sliding-window perplexity (the Hugging Face protocol). Any key of the config "
    "can be set as --key value or --section.key value, e.g. --attention.mode topk. With --thresholds FILE the "
    "rule is the file's (Top-θ with its k, and its tile gate when it holds one); an --attention key you set "
    "overrides it where those thresholds can serve the value, and is refused where they cannot.",
    epilog="example: python -m condensa.eval ppl --model runs/quickstart/hf --data ../shared/data/wikitext-2-raw/wiki.test.raw "
    "--stride 512 --tokenizer ../shared/data/gpt2-tokenizer --thresholds runs/thresholds/thresholds.safetensors"
    "\n\nEvery key of results.json is explained in docs/metrics.md.",
)


def build_parser():
    """This tool's argparse parser (for --help and docs/cli.md)."""
    return config_parser(PerplexityConfig, **PARSER)


def main(argv) -> None:
    run(parse_config_args(argv, PerplexityConfig, **PARSER))

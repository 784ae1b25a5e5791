"""`python -m condensa.eval generate`: what a sparse rule saves and changes during real decoding.

Greedy generation with the KV cache, once densely and once under the chosen attention rule. Per
decoding step it records the kept fraction of V rows (the V rows that some kept element needs,
`condensa.sparsity.metrics.v_rows_fraction`: the V traffic a decode kernel must load), and it
compares the generated tokens with dense greedy decoding. The kept elements and tiles of the
prompts' prefill are counted as the sweep counts them (`condensa.eval.sweep.SparsityProbe`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from condensa.attention import AttentionConfig
from condensa.cli import check_writable, config_parser, parse_config_args, config_to_dict, progress, write_json
from condensa.errors import ConfigError, DataError
from condensa.eval.decode_trace import decode_trace, generation_report
from condensa.eval.rule import with_thresholds
from condensa.eval.sweep import SparsityProbe, kept_line
from condensa.eval.text import ModelText, read_eval_text
from condensa.model import load_pretrained


# ---- the CLI -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerateConfig:
    model: str = ""  # HF directory, .gguf file, named model (smollm2-135m) or hub id
    tokenizer: str | None = None  # default: the model directory's own tokenizer
    data: list[str] = dataclasses.field(default_factory=list)  # text files/folders, or HF dataset name[:config]
    split: str = "test"  # split of an HF dataset
    prompt: str = ""  # a prompt text; default: prompts cut from --data
    prompts: int = 4  # number of prompts cut from --data (consecutive, non-overlapping)
    prompt_tokens: int = 64  # tokens per prompt cut from --data
    max_new_tokens: int = 32  # greedy decoding steps after each prompt
    thresholds: str | None = None  # from `python -m condensa.calibrate`; sets the attention keys left unset (k, gate)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)  # set mode: topk | toptheta
    out: str = "runs/eval-generate"  # output folder: results.json, config.json, v_rows.png


def prompt_ids(cfg: GenerateConfig, encode) -> np.ndarray:
    """[B, P] prompts: the given text, or `prompts` consecutive slices of the evaluation text."""
    if cfg.prompt:
        ids = encode(cfg.prompt)
        if ids.size == 0:
            raise DataError("--prompt is empty after tokenization; give a prompt text.")
        return ids[None]
    if cfg.prompts < 1 or cfg.prompt_tokens < 1:
        raise ConfigError(f"prompts and prompt_tokens must be >= 1; got {cfg.prompts} and {cfg.prompt_tokens}.")
    need = cfg.prompts * cfg.prompt_tokens
    ids = encode(read_eval_text(cfg.data, cfg.split), need)
    if ids.size < need:
        raise ConfigError(f"the text has {ids.size} tokens, fewer than {cfg.prompts} prompts x {cfg.prompt_tokens}; "
                          "give more text or fewer/shorter prompts.")
    return ids[:need].reshape(cfg.prompts, cfg.prompt_tokens)


def run(cfg: GenerateConfig) -> dict:
    if not cfg.model:
        raise ConfigError("no model given; pass --model DIR (a Hugging Face GPT-2 directory) or a hub id.")
    if cfg.attention.needs_thresholds and not cfg.thresholds:
        raise ConfigError(f"attention mode {cfg.attention.mode!r} (or the tile gate) needs --thresholds FILE "
                          "from python -m condensa.calibrate.")
    check_writable(cfg.out, create=False)  # before the load; created once the settings are known good
    model, _ = load_pretrained(cfg.model)
    cfg, thresholds = with_thresholds(cfg, model.config)
    if cfg.attention.mode == "dense" and not cfg.attention.tile_gate:
        raise ConfigError("generate compares a sparse rule with dense decoding; pass --thresholds FILE (its Top-θ "
                          "rule and gate), or set --attention.mode topk, or turn on --attention.tile_gate.")
    out = check_writable(cfg.out)
    text = ModelText.for_model(cfg.model, cfg.tokenizer)
    prompts = prompt_ids(cfg, text.encode)
    total = prompts.shape[1] + cfg.max_new_tokens
    longest_k = max(cfg.attention.k_for(l) for l in range(model.config.n_layer))
    if cfg.attention.mode != "dense" and longest_k >= total:
        raise ConfigError(f"k={longest_k} is not smaller than the longest row ({total} tokens = prompt + new "
                          "tokens): every row would stay dense. Use a smaller k or a longer prompt.")
    if not cfg.attention.needs_thresholds:
        thresholds = None  # a rule that reads none (top-k) runs without them
    bar = progress(total=2, desc="generate", unit="run")
    dense = decode_trace(model, prompts, cfg.max_new_tokens, AttentionConfig(), None)
    bar.update(1)
    sparse = decode_trace(model, prompts, cfg.max_new_tokens, cfg.attention, thresholds)
    bar.update(1)
    bar.close()
    result = generation_report(dense, sparse, prompts.shape[1])
    # the kept elements and tiles of the prompts' prefill, counted as the sweep counts them
    probe = SparsityProbe.build(model, prompts, prompts.shape[1], tile=cfg.attention.block_k,
                                metric_blocks=prompts.shape[0])
    result.update(probe.measure(model, cfg.attention, thresholds), metric_blocks=probe.settings()["metric_blocks"])
    result["samples"] = [{"prompt": text.decode(p), "dense": text.decode(d), "sparse": text.decode(s),
                          "prompt_ids": p.tolist(), "dense_ids": d.tolist(), "sparse_ids": s.tolist()}
                         for p, d, s in zip(prompts, dense["tokens"], sparse["tokens"])]
    result["attention"] = dataclasses.asdict(cfg.attention)
    write_json(out / "results.json", result)
    write_json(out / "config.json", config_to_dict(cfg))  # with the results: a failed run leaves a folder's config alone
    from condensa.eval.plots import plot_decode_v_rows  # lazy: pulls in matplotlib

    plot_decode_v_rows(result, out / "v_rows.png")
    print_generation(result, out)
    return result


def print_generation(result: dict, out: Path) -> None:
    steps = result["steps"]
    shown = steps if len(steps) <= 8 else [*steps[:4], *steps[-4:]]
    print("step  row length  kept V rows")
    for s in shown:
        print(f"{s['step']:4d}  {s['row_length']:10d}  {s['v_rows_fraction']:11.3f}")
    print(f"mean kept V rows {result['v_rows_fraction']:.3f}; token agreement with dense greedy "
          f"{result['token_agreement']:.3f} (first divergence per prompt: {result['first_divergence']}) -> {out / 'results.json'}")
    print(kept_line(result, "prefill of the prompts"))


PARSER = dict(  # the command line, shared by main() and build_parser()
    prog="python -m condensa.eval generate",
    description="Greedy generation with the KV cache under a sparse attention rule: the kept fraction of V "
    "rows per decoding step, and the agreement of the tokens with dense greedy decoding. Any key of the config "
    "can be set as --key value or --section.key value, e.g. --attention.mode topk --attention.k 32. With "
    "--thresholds FILE the rule is the file's (Top-θ with its k, and its tile gate when it holds one); an "
    "--attention key you set overrides it where those thresholds can serve the value, and is refused where they "
    "cannot.",
    epilog="example: python -m condensa.eval generate --model runs/quickstart/hf --data ../shared/data/wikitext-2-raw/"
    "wiki.test.raw --tokenizer ../shared/data/gpt2-tokenizer --thresholds runs/thresholds/thresholds.safetensors"
    "\n\nEvery key of results.json is explained in docs/metrics.md.",
)


def build_parser():
    """This tool's argparse parser (for --help and docs/cli.md)."""
    return config_parser(GenerateConfig, **PARSER)


def main(argv) -> None:
    run(parse_config_args(argv, GenerateConfig, **PARSER))

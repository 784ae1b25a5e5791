"""python -m condensa.eval.bench generate [options]

Whole-model generation at long context, as a user sees it: time to first token (TTFT), time per
output token (TPOT), tokens per second and peak device memory, dense (cuDNN) against a sparse rule
(the capped tile gate + Top-θ on the Pallas kernels), on LLaMA shapes with random weights and
thresholds calibrated on random tokens. Every timed call is `condensa.generate`, the public API:
TTFT is a call that generates one token, TPOT the extra time of `new_tokens` tokens per token
after the first. A bare forward over the same prompt (logits of the last position) is timed beside
it. Before timing, each rule's greedy tokens must equal an independent path's at a small size, in
float32 (see `check`). Peak memory is the process's so far (JAX cannot reset it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import condensa
from condensa.attention import AttentionConfig
from condensa.cli import check_writable, config_parser, parse_config_args, progress, run_main, write_json
from condensa.errors import ConfigError
from condensa.eval.bench.memory import device_peak_bytes
from condensa.eval.bench.timing import environment, header, measure
from condensa.model.llama.config import LlamaConfig
from condensa.model.llama.network import Llama
from condensa.sparsity.calibration import GateSpec, calibrate

SHAPES = {  # random-weight LLaMA shapes (HF config fields); max_position_embeddings is set per run
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192}),
    "llama-tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
}


@dataclasses.dataclass(frozen=True)
class GenerateBenchConfig:
    """The options of `python -m condensa.eval.bench generate` (YAML keys = these names)."""

    out_dir: str = "runs/bench_generate"  # writes results.json and summary.md here
    shape: str = "smollm2-135m"  # model shape: smollm2-135m, llama-1b or llama-tiny (random weights)
    batches: list[int] = dataclasses.field(default_factory=lambda: [1, 8])  # batch sizes timed
    prompt_lens: list[int] = dataclasses.field(default_factory=lambda: [8192, 32768])  # prompt lengths timed
    new_tokens: int = 33  # tokens generated per timed call for TPOT (the first one is TTFT's)
    prefill_chunk: int = 0  # write prompts into the cache this many tokens per call (0: all at once)
    dtype: str = "bfloat16"  # parameter and compute dtype
    k: int = 64  # Top-θ k of the sparse rule
    tile_budget: float = 0.125  # the capped gate's budget f
    block: int = 128  # tile size of the gate and the kernels
    calibration_len: int = 8192  # tokens per calibration block (random tokens)
    calibration_blocks: int = 2  # calibration blocks
    check_len: int = 1024  # prompt length of the correctness check (several tiles, so the gate chooses)
    check_layers: int = 2  # layers of the checked model (the shape's first ones; see `check`)
    check_steps: int = 32  # greedy tokens compared in the correctness check
    check_tolerance: float = 1e-3  # logits: how far the timed path's logits (and chosen tokens) may be from the independent path's
    warmup: int = 1  # untimed calls first
    repeats: int = 3  # timed calls; the median is reported

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ConfigError(f"unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)}.")
        if self.new_tokens < 2:
            raise ConfigError(f"new_tokens must be at least 2 (TPOT is the time after the first); got {self.new_tokens}.")
        if self.check_layers < 1:
            raise ConfigError(f"check_layers must be at least 1; got {self.check_layers}.")
        if min(self.prompt_lens) < self.block or min(self.batches) < 1:
            raise ConfigError(f"prompt_lens must be at least one tile ({self.block}) and batches at least 1.")


def build_model(cfg: GenerateBenchConfig, positions: int, layers: int | None = None):
    shape = SHAPES[cfg.shape] if layers is None else {**SHAPES[cfg.shape], "num_hidden_layers": layers}
    config = LlamaConfig(**shape, max_position_embeddings=positions)
    return Llama(config, dtype=jnp.dtype(cfg.dtype), rngs=nnx.Rngs(0))


def rules(cfg: GenerateBenchConfig, model) -> dict:
    """{name: (AttentionConfig, thresholds)}: dense on its fused path, and the capped gate + Top-θ."""
    blocks = np.random.default_rng(1).integers(0, model.config.vocab_size, (cfg.calibration_blocks, cfg.calibration_len))
    thresholds = calibrate(model, blocks, k=cfg.k, gate=GateSpec(cfg.block, cfg.block, cfg.tile_budget), batch_size=1)
    sparse = AttentionConfig(mode="toptheta", k=cfg.k, tile_gate=True, tile_cap=True, tile_budget=cfg.tile_budget,
                             block_q=cfg.block, block_k=cfg.block, backend="pallas")
    return {"dense": (AttentionConfig(), None), f"gate f={cfg.tile_budget} + Top-θ k={cfg.k}": (sparse, thresholds)}


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "attention", "use_cache"))
def _forced_logits(graphdef, state, tokens, thresholds, *, prompt_len, attention, use_cache):
    """[B, steps, V] logits of the independent path at each generated position, fed the tokens
    the timed path chose (teacher forcing), so one near-tie does not change every later step."""
    model = nnx.merge(graphdef, state)
    call = functools.partial(model, attention=attention, thresholds=thresholds)
    if not use_cache:  # recompute the whole prefix: one causal pass gives every position
        return call(tokens[:, :-1]).logits[:, prompt_len - 1:]
    b, total = tokens.shape
    cache = model.init_cache(b, total, tile_size=attention.block_k if attention.tile_gate else None)
    out = call(tokens[:, :prompt_len], cache=cache, prompt=True, last_logits_only=True)

    def step(cache, token):
        out = call(token[:, None], cache=cache)
        return out.cache, out.logits[:, -1]

    _, logits = jax.lax.scan(step, out.cache, tokens[:, prompt_len:-1].T)
    return jnp.concatenate([out.logits[:, -1:], logits.transpose(1, 0, 2)], axis=1)


def check(model, attention, thresholds, cfg: GenerateBenchConfig) -> dict:
    """Greedy tokens of the timed path against an independent one's, in float32 at the highest
    matmul precision, on a model of the shape's first `check_layers` layers: a Pallas rule against
    the same rule on the reference ops, both through the cache (the decode gate is not the prefill
    gate, so recomputing the prefix would not be the same rule); dense against recomputing the
    whole prefix every step. Both are fed the timed path's tokens (teacher forcing): each token
    must be the independent path's argmax or within `check_tolerance` of its logit, and the two
    paths' logits must agree within `check_tolerance`; anything further apart is a wrong kernel,
    and nothing is timed. Few layers, because a hard threshold is discontinuous:
    an element at θ that one path keeps and the other drops (last-bit differences in the scores)
    changes the next layer's input, and over many random layers such flips grow into visible logit
    gaps with both kernels correct (measured in docs/benchmarks.md). Returns what it measured."""
    prompt = np.random.default_rng(2).integers(0, model.config.vocab_size, (1, cfg.check_len))
    chunk = None if attention.tile_gate else cfg.prefill_chunk or None
    reference = attention.replace(backend="reference")
    with jax.default_matmul_precision("highest"):
        fast = condensa.generate(model, prompt, cfg.check_steps, thresholds=thresholds, attention=attention,
                                 prefill_chunk=chunk)
        graphdef, state = nnx.split(model)
        forced = functools.partial(_forced_logits, graphdef, state, jnp.asarray(fast), thresholds,
                                   prompt_len=cfg.check_len)
        logits = np.asarray(forced(attention=reference, use_cache=attention.backend != "reference"))
        timed = np.asarray(forced(attention=attention, use_cache=True))  # the timed path's own logits
    chosen = np.take_along_axis(logits, fast[:, cfg.check_len:, None], axis=-1)[..., 0]
    gaps = logits.max(axis=-1) - chosen  # 0 where the timed path chose the independent argmax
    report = {"steps": int(gaps.size), "argmax_agreement": float(np.mean(gaps == 0)),
              "worst_logit_gap": float(gaps.max()), "max_logit_difference": float(np.abs(timed - logits).max()),
              "tolerance": cfg.check_tolerance}
    if report["worst_logit_gap"] > cfg.check_tolerance:
        first = int(np.argmax((gaps > cfg.check_tolerance).any(axis=0)))
        raise RuntimeError(f"the timed path's greedy token at step {first} is {gaps[:, first].max():.3g} logits below "
                           f"an independent path's argmax (tolerance {cfg.check_tolerance}); not timing")
    if report["max_logit_difference"] > cfg.check_tolerance:
        raise RuntimeError(f"the timed path's logits differ from an independent path's by up to "
                           f"{report['max_logit_difference']:.3g} (tolerance {cfg.check_tolerance}); not timing")
    return report


def time_shape(model, attention, thresholds, batch: int, prompt_len: int, cfg: GenerateBenchConfig) -> dict:
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, model.config.vocab_size, (batch, prompt_len)) for _ in range(2)]  # rotated
    box = {"i": 0}

    def rotating(fn):
        def run_once():
            box["i"] += 1
            return fn(prompts[box["i"] % len(prompts)])
        return run_once

    chunk = None if attention.tile_gate else cfg.prefill_chunk or None  # chunking does not take the gate yet
    generate = functools.partial(condensa.generate, model, attention=attention, thresholds=thresholds,
                                 prefill_chunk=chunk)
    forward = nnx.jit(lambda m, ids: m(ids, attention=attention, thresholds=thresholds, last_logits_only=True).logits)
    first = measure(rotating(lambda ids: generate(ids, 1)), warmup=cfg.warmup, repeats=cfg.repeats)["median_s"]
    whole = measure(rotating(lambda ids: generate(ids, cfg.new_tokens)), warmup=cfg.warmup,
                    repeats=cfg.repeats)["median_s"]
    bare = measure(rotating(lambda ids: forward(model, jnp.asarray(ids))), warmup=cfg.warmup,
                   repeats=cfg.repeats)["median_s"]
    tpot = (whole - first) / (cfg.new_tokens - 1)
    peak = device_peak_bytes()
    return {"batch": batch, "prompt_len": prompt_len, "ttft_s": first, "tpot_s": tpot, "forward_s": bare,
            "ttft_over_forward": first / bare, "tokens_per_s": batch * (cfg.new_tokens - 1) / (whole - first),
            "process_peak_gib": None if peak is None else peak / 2**30}


def run(cfg: GenerateBenchConfig) -> tuple[dict, list[dict]]:
    """({rule: its correctness check}, timed rows): every rule at every shape, each shape's rows in
    the order they ran (the memory peak is the process's so far: JAX cannot reset it, so a row's
    peak bounds its own from above)."""
    longest = max(max(cfg.prompt_lens), cfg.calibration_len, cfg.check_len) + max(cfg.new_tokens, cfg.check_steps)
    align = math.lcm(cfg.block, 128)  # a cache the decode kernel need not pad (copy) at every step
    positions = -(-longest // align) * align
    model = build_model(cfg, positions)
    checked = build_model(dataclasses.replace(cfg, dtype="float32"), positions, layers=cfg.check_layers)
    checks = {}
    for name, (attention, thresholds) in rules(cfg, checked).items():  # thresholds calibrated on the checked model
        try:
            checks[name] = check(checked, attention, thresholds, cfg)
        except RuntimeError as error:
            raise RuntimeError(f"{name}: {error}") from None
    records = []
    for name, (attention, thresholds) in rules(cfg, model).items():
        for batch in cfg.batches:
            for prompt_len in progress(cfg.prompt_lens, desc=f"{name}, batch {batch}", unit="prompt"):
                try:
                    record = time_shape(model, attention, thresholds, batch, prompt_len, cfg)
                except Exception as error:  # noqa: BLE001 - an out-of-memory shape is a result, not the end
                    if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
                        raise
                    record = {"batch": batch, "prompt_len": prompt_len, "error": "out of memory"}
                records.append({"rule": name, **record})
    return checks, records


def summary_table(records: list[dict]) -> str:
    """Markdown, one row per (rule, batch, prompt), with the sparse rule's speed-up over dense."""
    dense = {(r["batch"], r["prompt_len"]): r for r in records if r["rule"] == "dense" and "error" not in r}
    lines = ["| rule | batch | prompt | TTFT (s) | TTFT / forward | TPOT (ms) | tokens/s | × dense TTFT | "
             "× dense TPOT | peak so far (GiB) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['rule']} | {r['batch']} | {r['prompt_len']} | {r['error']} | | | | | | |")
            continue
        base = dense.get((r["batch"], r["prompt_len"]))
        speed = (f"{base['ttft_s'] / r['ttft_s']:.2f}", f"{base['tpot_s'] / r['tpot_s']:.2f}") if base else ("", "")
        peak = "" if r["process_peak_gib"] is None else f"{r['process_peak_gib']:.1f}"
        lines.append(f"| {r['rule']} | {r['batch']} | {r['prompt_len']} | {r['ttft_s']:.3f} | "
                     f"{r['ttft_over_forward']:.2f} | {1e3 * r['tpot_s']:.2f} | {r['tokens_per_s']:,.0f} | "
                     f"{speed[0]} | {speed[1]} | {peak} |")
    return "\n".join(lines)


PARSER = dict(  # the command line, shared by main() and build_parser()
    prog="python -m condensa.eval.bench generate",
    description=__doc__.split("\n\n", 1)[1],
    epilog="example: python -m condensa.eval.bench generate --shape llama-1b --batches [8] --prompt_lens [32768]",
)


def build_parser():
    """This tool's argparse parser (for --help and docs/cli.md)."""
    return config_parser(GenerateBenchConfig, **PARSER)


@run_main
def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config_args(argv, GenerateBenchConfig, **PARSER)
    out = check_writable(cfg.out_dir, "--out_dir")
    env = environment()
    checks, records = run(cfg)
    table = summary_table(records)
    write_json(out / "results.json", {"environment": env, "config": dataclasses.asdict(cfg), "checks": checks,
                                      "results": records})
    for name, c in checks.items():
        print(f"check, {name}: {c['argmax_agreement']:.0%} of {c['steps']} greedy tokens are the independent "
              f"path's argmax; logits within {c['max_logit_difference']:.2g} (tolerance {c['tolerance']})")
    (out / "summary.md").write_text(f"shape {cfg.shape}, {cfg.dtype}\n\n{table}\n\n{header(env)}\n")
    print(table)
    print(header(env))
    print(f"-> {out / 'results.json'}, {out / 'summary.md'}")

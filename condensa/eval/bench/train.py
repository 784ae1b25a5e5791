"""python -m condensa.eval.bench train [options]

Training throughput of GPT-2 (default: GPT-2 small, T = 1024, bf16 compute, fp32 params, AdamW)
with the same jitted step `python -m condensa.train` uses, once per loss setting. Token ids are
random (never zeros); before timing, each setting's first loss is checked to be finite and near
ln(vocab), the loss of an untrained model.

MFU counts model FLOPs only (remat recomputation excluded), as in PaLM / nanoGPT:
6 · (non-embedding params + d · vocab for the tied output layer) + 12 · L · d · T per token
(causal attention counted in full), over the device's dense bf16 peak.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from condensa.cli import config_parser, load_config, parse_config_args, run_main, write_json
from condensa.errors import ConfigError
from condensa.eval.bench import profile as prof
from condensa.eval.bench.timing import environment, header, measure, peak_flops
from condensa.train.config import TrainConfig
from condensa.train.objective import objective, uses_mass_kernel
from condensa.train.setup import build_model, build_optimizer
from condensa.train.step import FlatState, make_train_step

LOSSES = ("topk", "tile", "gate")


@dataclasses.dataclass(frozen=True)
class TrainBenchConfig:
    """The options of `python -m condensa.eval.bench train` (YAML keys = these names)."""

    model_config: str = "gpt2-small"  # model preset
    seq_len: int = 1024  # tokens per sequence T
    batch_size: int = 8  # sequences per step
    dtype: str = "bfloat16"  # compute dtype: bfloat16 or float32
    settings: str = "none,topk,tile"  # loss settings to time: a comma list of none or '+'-joined topk, tile, gate
    weight: float = 0.5  # λ of each active loss
    k: int = 64  # the top-k loss's k
    tile_size: int = 64  # tile of the tile and gate losses
    f: float = 0.125  # the tile loss's budget fraction
    remat: bool = True  # recompute each block in the backward pass
    warmup: int = 3  # untimed repeats first
    repeats: int = 10  # timed repeats; the median is reported
    steps_per_repeat: int = 5  # steps dispatched back to back per timed repeat (the step time is its time / N)
    peak_tflops: float | None = None  # the device's dense bf16 peak for MFU (null: from the device kind)
    out: str = ""  # also write the results as JSON to this path
    profile: str = ""  # also trace 3 steps per setting under this folder and print the costliest device ops
    profile_top: int = 25  # how many device ops --profile prints

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float32"):
            raise ConfigError(f"dtype must be bfloat16 or float32; got {self.dtype!r}.")


PARSER = dict(  # the command line, shared by main() and build_parser()
    prog="python -m condensa.eval.bench train",
    description=__doc__.split("\n\n", 1)[1],
    epilog="example: python -m condensa.eval.bench train --seq_len 1024 --batch_size 8 --settings none,topk",
)


def build_parser():
    """This tool's argparse parser (for --help and docs/cli.md)."""
    return config_parser(TrainBenchConfig, **PARSER)


def model_flops_per_token(config, seq_len: int) -> float:
    d, layers = config.n_embd, config.n_layer
    per_block = 4 * d * d + 2 * d * config.inner_dim  # attention projections + MLP weights
    matmul_params = layers * per_block + d * config.vocab_size  # + the tied output layer
    return 6.0 * matmul_params + 12.0 * layers * d * seq_len


def _train_config(args, setting: str):
    active = [] if setting == "none" else setting.split("+")
    unknown = [x for x in active if x not in LOSSES]
    if unknown:
        raise ConfigError(f"unknown loss {unknown[0]!r} in --settings; use none or a '+' list of {', '.join(LOSSES)}.")
    overrides = ["--init", "scratch", "--model_config", args.model_config, "--data.seq_len", str(args.seq_len),
                 "--train.dtype", args.dtype, "--train.remat", str(args.remat).lower(), "--train.batch_size", str(args.batch_size),
                 "--loss.tile_size", str(args.tile_size), "--loss.topk.k", str(args.k), "--loss.tile.f", str(args.f),
                 "--dropout", "0.0"]
    for name in active:
        overrides += [f"--loss.{name}.weight", str(args.weight)]
    return load_config(TrainConfig, None, overrides)


def _check_loss_kernel(graphdef, flat_state, batch, loss_cfg) -> dict:
    """The losses and the gradient through the fused mass kernel against the reference path
    (probabilities from the reference attention op), on one batch, before anything is timed."""
    import dataclasses

    from flax import nnx

    model, _ = nnx.merge(graphdef, flat_state.state)
    model.eval()
    results = {}
    for kernel in ("reference", "pallas"):
        cfg = dataclasses.replace(loss_cfg, kernel=kernel)

        @nnx.jit
        def value_and_grad(m, b):
            return nnx.value_and_grad(lambda m: objective(m, b, cfg, 10**6), has_aux=True)(m)

        (_, metrics), grads = value_and_grad(model, batch)
        results[kernel] = ({k: float(v) for k, v in jax.device_get(metrics).items()}, grads)
    if not uses_mass_kernel(model, dataclasses.replace(loss_cfg, kernel="auto"), batch.shape[1] - 1):
        print("note: loss.kernel=auto would not pick the fused kernel here; the timed step uses the reference path")
    (ref_m, ref_g), (ker_m, ker_g) = results["reference"], results["pallas"]
    diff = jax.tree.map(lambda a, b: jnp.sum(jnp.square(a - b)), ref_g, ker_g)
    norm = jax.tree.map(lambda a: jnp.sum(jnp.square(a)), ref_g)
    grad_rel = float(jnp.sqrt(sum(jax.tree.leaves(diff)) / sum(jax.tree.leaves(norm))))
    out = {"grad_rel_diff": grad_rel}
    for name in ("L_topk", "L_tile", "L_gate"):
        if name in ref_m:
            out[name] = {"reference": ref_m[name], "pallas": ker_m[name],
                         "rel_diff": abs(ref_m[name] - ker_m[name]) / max(abs(ref_m[name]), 1e-12)}
    print(f"loss kernel check: {out}")
    worst = max([v["rel_diff"] for v in out.values() if isinstance(v, dict)] + [0.0])
    if not (worst < 2e-2 and grad_rel < 5e-2):
        raise RuntimeError(f"the fused loss kernel disagrees with the reference path: {out}; not timing it")
    return out


def bench_setting(args, setting: str, peak: float | None) -> dict:
    from flax import nnx

    cfg = _train_config(args, setting)
    model, config = build_model(cfg, 50257)
    optimizer = build_optimizer(model, cfg.optimizer, total_steps=1000)
    graphdef, state = nnx.split((model, optimizer))
    state = FlatState.of(state)
    del model, optimizer
    step_fn = make_train_step(graphdef, cfg.loss)
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.integers(0, config.vocab_size, (1, args.batch_size, args.seq_len + 1)), jnp.int32)
               for _ in range(4)]  # rotate a few batches so nothing is served from a cache of one input

    kernel_check = _check_loss_kernel(graphdef, state, batches[0][0], cfg.loss) if cfg.loss.active else None
    state, metrics = step_fn(state, batches[0], jnp.int32(0))
    first = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not (math.isfinite(first["loss"]) and abs(first["lm_loss"] - math.log(config.vocab_size)) < 1.0):
        raise RuntimeError(f"{setting}: first loss {first} is not finite or not near ln(vocab); not timing it")

    box = {"state": state, "i": 0}

    def run_once():
        box["i"] += 1
        box["state"], m = step_fn(box["state"], batches[box["i"] % len(batches)], jnp.int32(box["i"]))
        return m["loss"]

    timing = measure(run_once, warmup=args.warmup, repeats=args.repeats, calls_per_repeat=args.steps_per_repeat)
    final = float(jax.device_get(run_once()))
    if not math.isfinite(final):
        raise RuntimeError(f"{setting}: loss became {final} while timing")
    profile = None
    if args.profile:
        trace = prof.capture(run_once, f"{args.profile}/{setting}", calls=3)
        profile = prof.device_time_by_name(trace)
        print(f"\n### profile: {setting}\n" + "\n".join(prof.summary_lines(profile, calls=3, top=args.profile_top)))
    tokens = args.batch_size * args.seq_len
    tokens_per_s = tokens / timing["median_s"]
    flops = model_flops_per_token(config, args.seq_len) * tokens_per_s
    return {
        "setting": setting, "tokens_per_s": tokens_per_s, "step_ms": 1e3 * timing["median_s"],
        "model_tflops": flops / 1e12, "mfu": flops / peak if peak else None,
        "first_loss": first["lm_loss"], "L_conc_first": first["L_conc"], **timing,
        **({"profile_us_per_3_calls": profile} if profile is not None else {}),
        **({"kernel_check": kernel_check} if kernel_check is not None else {}),
    }


@run_main
def main(argv=None) -> None:
    args = parse_config_args(argv, TrainBenchConfig, **PARSER)
    env = environment()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(env["device"])
    results = [bench_setting(args, s.strip(), peak) for s in args.settings.split(",") if s.strip()]
    base = next((r for r in results if r["setting"] == "none"), None)
    print(f"GPT-2 {args.model_config}, T={args.seq_len}, batch {args.batch_size}, {args.dtype}, remat={args.remat}, "
          f"λ={args.weight}, k={args.k}, tile {args.tile_size}, f={args.f}")
    print("| setting | tokens/s | step (ms) | model TFLOP/s | MFU | throughput vs λ=0 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        rel = f"{100 * r['tokens_per_s'] / base['tokens_per_s']:.0f}%" if base else "n/a"
        print(f"| {r['setting']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['model_tflops']:.0f} | {mfu} | {rel} |")
    print(header(env))
    if args.out:
        write_json(args.out, {"environment": env, "args": dataclasses.asdict(args), "results": results})

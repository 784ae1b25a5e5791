"""python -m condensa.eval.bench masses [options]

Forward + backward time of the fused mass kernel (`condensa.kernels.attention_masses`) that the
concentration losses use during training, for several block settings, against the reference
path it replaces (probabilities from the reference attention op, then the loss) and against
cuDNN attention's own forward + backward on the same q, k, v, in one process. Before timing, each
setting's gradient is compared with the reference's on fresh random inputs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from condensa.attention.dense import attention_scores, masked_softmax
from condensa.cli import config_parser, parse_config_args, run_main, write_json
from condensa.errors import ConfigError
from condensa.eval.bench import profile as prof
from condensa.eval.bench.timing import environment, header, measure
from condensa.kernels.attention_masses import row_tile_masses


@dataclasses.dataclass(frozen=True)
class MassesBenchConfig:
    """The options of `python -m condensa.eval.bench masses` (YAML keys = these names)."""

    batch: int = 8  # sequences B
    heads: int = 12  # heads H
    seq_len: int = 1024  # tokens per sequence T
    head_dim: int = 64  # head dimension D
    dtype: str = "bfloat16"  # q and k dtype: bfloat16 or float32
    top_k: int | None = None  # count only the k largest scores per row (the top-k loss); null: all of them (the tile loss)
    tile: int = 64  # key tile of the masses
    configs: str = "16/64/4,16/64/8,16/32/4"  # kernel block settings to time: block_q/block_q_dk/warps[/stages[/bisect]], comma-separated
    warmup: int = 3  # untimed calls first
    repeats: int = 20  # timed calls; the median is reported
    out: str = ""  # also write the results as JSON to this path
    profile: str = ""  # also trace each fused setting under this folder and print its kernels' device time

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float32"):
            raise ConfigError(f"dtype must be bfloat16 or float32; got {self.dtype!r}.")


PARSER = dict(  # the command line, shared by main() and build_parser()
    prog="python -m condensa.eval.bench masses",
    description=__doc__.split("\n\n", 1)[1],
    epilog="example: python -m condensa.eval.bench masses --seq_len 4096 --top_k 64 --configs 16/64/4",
)


def build_parser():
    """This tool's argparse parser (for --help and docs/cli.md)."""
    return config_parser(MassesBenchConfig, **PARSER)


def _reference_masses(q, k, scale, tile, top_k):
    t = q.shape[1]
    visible = jnp.tril(jnp.ones((t, t), bool))
    s = attention_scores(q, k, scale)
    p = masked_softmax(s, visible)
    if top_k:
        kth = jax.lax.stop_gradient(jax.lax.top_k(jnp.where(visible, s, -jnp.inf), top_k)[0][..., -1:])
        p = jnp.where(s >= kth, p, 0.0)
    return p.reshape(*p.shape[:-1], t // tile, tile).sum(-1)


@run_main
def main(argv=None) -> None:
    args = parse_config_args(argv, MassesBenchConfig, **PARSER)
    env = environment()
    dtype = jnp.dtype(args.dtype)
    shape = (args.batch, args.seq_len, args.heads, args.head_dim)
    scale = args.head_dim ** -0.5
    rng = np.random.default_rng(0)

    def draw():
        q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
        w = jnp.asarray(rng.normal(size=(args.batch, args.heads, args.seq_len, args.seq_len // args.tile)), jnp.float32)
        return q, k, v, w

    def grad_fn(masses):
        return jax.jit(jax.grad(lambda q, k, w: jnp.sum(masses(q, k) * w), (0, 1)))

    reference = grad_fn(lambda q, k: _reference_masses(q, k, scale, args.tile, args.top_k))
    cudnn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, implementation="cudnn" if jax.default_backend() == "gpu" else None)
        .astype(jnp.float32)), (0, 1, 2)))
    sets = [draw() for _ in range(3)]  # rotated, so no input is served from a cache of one
    results = []

    def timed(name, fn, takes_v=False):
        box = {"i": 0}

        def run_once():
            box["i"] += 1
            q, k, v, w = sets[box["i"] % len(sets)]
            return fn(q, k, v) if takes_v else fn(q, k, w)

        r = {"name": name, **measure(run_once, warmup=args.warmup, repeats=args.repeats)}
        results.append(r)
        return r

    timed("cudnn attention fwd+bwd", cudnn, takes_v=True)
    timed("reference masses fwd+bwd", reference)
    for spec in args.configs.split(","):
        bq, bq_dk, warps, *rest = (int(x) for x in spec.split("/"))
        extra = dict(zip(("num_stages", "bisect_steps"), rest))
        fused = grad_fn(lambda q, k, bq=bq, bq_dk=bq_dk, warps=warps, extra=extra: row_tile_masses(
            q, k, scale=scale, tile=args.tile, top_k=args.top_k, block_q=bq, block_q_dk=bq_dk, num_warps=warps,
            **extra))
        q, k, _, w = draw()  # fresh inputs for the check
        got, want = fused(q, k, w), reference(q, k, w)
        rel = max(float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
                  for a, b in zip(got, want))
        r = timed(f"fused {spec}", fused)
        r["grad_rel_error"] = rel
        if args.profile:
            trace = prof.capture(lambda: fused(q, k, w), f"{args.profile}/{spec.replace('/', '_')}", calls=3)
            r["profile_us"] = prof.device_time_by_name(trace)
            print(f"\n### profile: fused {spec}\n" + "\n".join(prof.summary_lines(r["profile_us"], calls=3, top=12)))
    base = results[0]["median_s"]
    print(f"B={args.batch} H={args.heads} T={args.seq_len} D={args.head_dim} {args.dtype} top_k={args.top_k} "
          f"tile={args.tile}")
    print("| path | fwd+bwd (ms) | × cuDNN attention | grad rel. error |")
    print("| --- | ---: | ---: | ---: |")
    for r in results:
        err = f"{r['grad_rel_error']:.1e}" if "grad_rel_error" in r else ""
        print(f"| {r['name']} | {1e3 * r['median_s']:.3f} | {r['median_s'] / base:.2f} | {err} |")
    print(header(env))
    if args.out:
        write_json(args.out, {"environment": env, "args": dataclasses.asdict(args), "results": results})

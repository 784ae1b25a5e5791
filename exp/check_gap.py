"""How far apart are two correct paths of one rule? Teacher-forced float32 logits (highest matmul
precision) of bench generate's random-weight SmolLM2 shape at several depths: dense through the
cache against recomputing the prefix, and each sparse rule on the Pallas kernels (interpret mode on
a CPU) against the same rule on the reference ops, both through the cache. A hard threshold flips
elements that sit at θ on last-bit differences, and depth amplifies the flips; this is why bench
generate checks its kernels on a model of few layers.

    PYTHONPATH=. python exp/check_gap.py --layers 1,2,4,12,30 --out $OUT/check-gap.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.attention import AttentionConfig
from condensa.eval.bench import generation as bench


def max_gap(graphdef, state, tokens, thresholds, prompt_len, fast, independent, use_cache) -> float:
    with jax.default_matmul_precision("highest"):
        a, b = (np.asarray(bench._forced_logits(graphdef, state, tokens, thresholds, prompt_len=prompt_len,
                                                attention=rule, use_cache=cache))
                for rule, cache in ((fast, True), (independent, use_cache)))
    return float(np.abs(a - b).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="1,4,12,30")
    p.add_argument("--prompt_len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for layers in [int(x) for x in args.layers.split(",")]:
        cfg = bench.GenerateBenchConfig(dtype="float32", prompt_lens=[args.prompt_len], calibration_len=args.prompt_len,
                                        calibration_blocks=1)
        model = bench.build_model(cfg, args.prompt_len + args.steps, layers=layers)
        (_, _), (gated, thresholds) = bench.rules(cfg, model).values()
        tokens = jnp.asarray(np.random.default_rng(2).integers(0, model.config.vocab_size,
                                                               (1, args.prompt_len + args.steps)))
        graphdef, state = nnx.split(model)
        cases = {"dense, cache vs recompute": (AttentionConfig(), AttentionConfig(), False),
                 "kernel dense mode": (AttentionConfig(backend="pallas"), AttentionConfig(), True),
                 "capped gate alone": (gated.replace(mode="dense"), gated.replace(mode="dense", backend="reference"), True),
                 f"Top-θ k={cfg.k} alone": (AttentionConfig(mode="toptheta", k=cfg.k, backend="pallas"),
                                            AttentionConfig(mode="toptheta", k=cfg.k), True),
                 "capped gate + Top-θ": (gated, gated.replace(backend="reference"), True)}
        for name, (fast, independent, use_cache) in cases.items():
            gap = max_gap(graphdef, state, tokens, thresholds, args.prompt_len, fast, independent, use_cache)
            rows.append({"layers": layers, "case": name, "max_abs_logit_difference": gap})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

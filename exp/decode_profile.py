"""Experiment (issue 7): where a jitted decode call's device time goes, per op, at the acceptance
shape (B 8, S 16k, bf16; 12 heads and tiles of 64 by default), with the bench's synthetic thresholds.

    XLA_FLAGS=--xla_gpu_enable_command_buffer= PYTHONPATH=. python exp/decode_profile.py
    # the study model's shape (6 heads, gate tiles of 128, capped gate, V rows):
    XLA_FLAGS=--xla_gpu_enable_command_buffer= PYTHONPATH=. python exp/decode_profile.py \
        --heads 6 --block_k 128 --head_dims 64 --tile_cap --skip_v rows
"""
from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

from condensa.eval.bench import profile as prof
from condensa.eval.bench.decode import DecodeBenchConfig, derive_thresholds, structured_cache
from condensa.eval.bench.decode_baselines import tile_state
from condensa.eval.bench.timing import jit_with_options, measure
from condensa.kernels.toptheta_decode import toptheta_decode

B, S = 8, 16384


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--block_k", type=int, default=64)
    parser.add_argument("--head_dims", default="64,128")
    parser.add_argument("--tile_cap", action="store_true", help="cap the gate at its budget")
    parser.add_argument("--skip_v", default="auto", choices=["auto", "rows", "blocks"])
    args = parser.parse_args()
    cfg = DecodeBenchConfig(block_k=args.block_k)
    for d in (int(x) for x in args.head_dims.split(",")):
        scale = 1 / math.sqrt(d)
        q, k, v = structured_cache(jax.random.PRNGKey(7), B, S, args.heads, d, jnp.bfloat16, block_k=args.block_k,
                                   retrieval_tiles=4)
        lengths = jnp.full((B,), S, jnp.int32)
        k_bar, v_mean = tile_state(k, v, lengths, args.block_k)
        for budget in (None, 0.125, 0.0625):
            theta, gate, _ = derive_thresholds(q, k, lengths, k_bar, scale=scale, cfg=cfg, budget=budget)
            opts = dict(scale=scale, theta=theta, block_k=args.block_k, skip_v=args.skip_v)
            if budget is not None:
                opts.update(tile_theta_decode=gate, tile_budget=budget, k_tile_mean=k_bar, tile_cap=args.tile_cap)
            for splits in (None, 2):
                fast = jit_with_options(toptheta_decode, num_splits=splits, **opts)
                run = lambda: fast(q, k, v, lengths)[0]  # noqa: E731
                t = measure(run, warmup=3, repeats=20, calls_per_repeat=10)["median_s"]
                trace = prof.capture(run, f"/tmp/dprof/{d}_{budget}_{splits}", calls=10)
                totals = prof.device_time_by_name(trace)
                print(f"\n### hd {d} f {budget} splits {splits or 'auto'}: {1e6 * t:.1f} us per call (wall)")
                print("\n".join(prof.summary_lines(totals, calls=10, top=8)))


if __name__ == "__main__":
    main()

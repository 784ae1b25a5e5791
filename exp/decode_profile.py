"""Experiment (issue 7): where a jitted decode call's device time goes, per op, at the acceptance
shape (B 8, S 16k, 12 heads, bf16, tiles of 64), with the bench's synthetic thresholds.

    XLA_FLAGS=--xla_gpu_enable_command_buffer= PYTHONPATH=. python exp/decode_profile.py
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from condensa.eval.bench import profile as prof
from condensa.eval.bench.decode import DecodeBenchConfig, derive_thresholds, structured_cache, tile_state
from condensa.eval.bench.timing import jit_with_options, measure
from condensa.kernels.toptheta_decode import toptheta_decode

B, S, H = 8, 16384, 12


def main():
    cfg = DecodeBenchConfig()
    for d in (64, 128):
        scale = 1 / math.sqrt(d)
        q, k, v = structured_cache(jax.random.PRNGKey(7), B, S, H, d, jnp.bfloat16, block_k=64, retrieval_tiles=4)
        lengths = jnp.full((B,), S, jnp.int32)
        k_bar, v_mean = tile_state(k, v, lengths, 64)
        for budget in (None, 0.125, 0.0625):
            theta, gate, _ = derive_thresholds(q, k, lengths, k_bar, scale=scale, cfg=cfg, budget=budget)
            opts = dict(scale=scale, theta=theta)
            if budget is not None:
                opts.update(tile_theta_decode=gate, tile_budget=budget, k_tile_mean=k_bar)
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

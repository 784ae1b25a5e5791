"""Each Triton kernel compiled and run on the GPU against the same kernel in interpret mode, on
small shapes: what `tests/test_triton_lowering.py` cannot check without a GPU (the Triton compile
itself, register and shared-memory limits). Seconds, not minutes; run it first on a lent GPU.

    PYTHONPATH=. python exp/gpu_smoke.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from condensa.kernels import toptheta_prefill
from condensa.kernels.selector_prepass import fused_prepass_table
from condensa.kernels.toptheta_decode import toptheta_decode

B, T, H, HKV, D = 2, 1000, 9, 3, 64
FAST = "triton" if jax.default_backend() == "gpu" else "interpret"  # interpret here: checks the script itself
RULES = [("rowmean", True), ("rowmean", False), ("window", False)]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, T, H, D), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, HKV, D), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, HKV, D), jnp.bfloat16)
    failures = []
    for selector, shared in RULES:
        rule = dict(tile_selector=selector, shared_heads=shared, tile_budget=0.4, block_q=128, block_k=128)
        got = toptheta_prefill(q, k, v, scale=0.125, backend=FAST, **rule)[0]
        want = toptheta_prefill(q, k, v, scale=0.125, backend="interpret", **rule)[0]
        err = _rel(got, want)
        print(f"prefill {selector} shared={shared}: max rel err vs interpret {err:.2e}", flush=True)
        failures += [f"prefill {selector}"] if err > 2e-2 else []

        tp = 1024
        pad = lambda x: jnp.pad(x, [(0, 0), (0, tp - T), (0, 0), (0, 0)])  # noqa: E731
        common = dict(scale=0.125, block_q=128, block_k=128, length=T, sink_tiles=1, tile_budget=0.4,
                      selector=selector, shared_heads=shared)
        a = np.asarray(fused_prepass_table(pad(q), pad(k), backend=FAST, **common))
        b = np.asarray(fused_prepass_table(pad(q), pad(k), backend="interpret", **common))
        rows = int(np.sum(np.any(a != b, axis=-1)))
        print(f"fused pre-pass {selector} shared={shared}: {rows} of {a.shape[0] * a.shape[1] * a.shape[2]} "
              "table rows differ from interpret", flush=True)
        failures += [f"pre-pass {selector}"] if rows > 2 else []

        lengths = jnp.asarray([T, T // 2], jnp.int32)
        means = jnp.stack([k[:, i:i + 128].astype(jnp.float32).mean(axis=1) for i in range(0, T, 128)], axis=1)
        dec = dict(scale=0.125, k_tile_mean=means, tile_selector=selector, shared_heads=shared, tile_budget=0.4,
                   block_k=128)
        got = toptheta_decode(q[:, :1], k, v, lengths, backend=FAST, **dec)[0]
        want = toptheta_decode(q[:, :1], k, v, lengths, backend="interpret", **dec)[0]
        err = _rel(got, want)
        print(f"decode {selector} shared={shared}: max rel err vs interpret {err:.2e}", flush=True)
        failures += [f"decode {selector}"] if err > 2e-2 else []
    print("FAILED: " + ", ".join(failures) if failures else "all kernels match interpret mode", flush=True)


if __name__ == "__main__":
    main()

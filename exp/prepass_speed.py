"""The tile selectors' pre-pass on the GPU: the fused Pallas pre-pass against the XLA one, both
against the gated kernel that uses them and against cuDNN, on random inputs of SmolLM2's shape.

    python exp/prepass_speed.py --out $OUT/prepass

Checks first that the fused tables equal the XLA tables (the kept sets may differ only where two
scores tie within float rounding, so the mismatch count is reported, not asserted), and that the
gated kernel's output matches the reference op on a short sequence. Writes OUT/prepass.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from condensa.eval.bench.timing import environment, measure_unrolled
from condensa.kernels import toptheta_prefill
from condensa.kernels.selector_prepass import fused_prepass_table, layout_from_text
from condensa.kernels.tile_gate_prepass import compact_tile_lists, prepass_keep


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv_heads", type=int, default=3)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--rules", default="rowmean+shared@0.4,rowmean+shared@0.25,rowmean@0.4,window@0.4")
    p.add_argument("--variants", default="split:2048,split:2048:cw1,split:2048:cw2,split:2048:chunked,split+lists:2048",
                   help="fused pre-pass layouts to time, as LAYOUT:REGISTER_ELEMENTS[:OPTION...]: split (scores in "
                        "a launch of their own, one program per head) or one (one program scores every head), "
                        "+lists for one program per head writing the lists; options cwN / swN (the cut's / the "
                        "scoring's Triton warps) and chunked (lists written slot by slot, not by one masked store). "
                        "The fastest exact one goes in the results as fastest_variant")
    p.add_argument("--calls", type=int, default=20,
                   help="calls per timed repeat, on as many distinct inputs inside one jit: Python's dispatch is "
                        "paid once per repeat, so small kernels are timed on the device, not on the host")
    p.add_argument("--out", default="runs/prepass")
    return p.parse_args()


def parse_rule(text: str) -> dict:
    spec, _, f = text.partition("@")
    return {"selector": spec.removesuffix("+shared"), "shared_heads": spec.endswith("+shared"), "tile_budget": float(f)}


def inputs(batch: int, args, seed: int = 0):
    """bf16 q, k, v with a few strong key directions, so the selector's scores are not flat."""
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    shape_q = (batch, args.seq, args.heads, args.head_dim)
    shape_k = (batch, args.seq, args.kv_heads, args.head_dim)
    direction = jax.random.normal(kd, (args.head_dim,))
    q = jax.random.normal(kq, shape_q) + 0.5 * direction
    k = jax.random.normal(kk, shape_k) + 0.5 * direction * jnp.sin(jnp.arange(args.seq) / 300.0)[None, :, None, None]
    v = jax.random.normal(kv, shape_k)
    return tuple(x.astype(jnp.bfloat16) for x in (q, k, v))


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "environment": environment(), "rules": {}}
    scale = args.head_dim ** -0.5
    rules = [r for r in args.rules.split(",") if r]

    # correctness on a short sequence: the kernel with the fused pre-pass against the reference op
    q, k, v = inputs(1, argparse.Namespace(**{**vars(args), "seq": 1000}), seed=1)
    for rule in rules:
        r = parse_rule(rule)
        got = toptheta_prefill(q, k, v, scale=scale, backend="triton", **_kernel_args(r))[0]
        ref = jax.jit(lambda q, k, v, r=r: _reference(q, k, v, scale, r))(q, k, v)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
        results["rules"].setdefault(rule, {})["max_rel_err_vs_reference_T1000"] = err
        print(rule, "max relative error against the reference op at T=1000:", err, flush=True)

    def timed(fn):  # fn(q, k, v), on args.calls different q
        return measure_unrolled(fn, input_sets)["median_s"]

    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                                  implementation="cudnn"))
    for batch in [int(b) for b in args.batches.split(",")]:
        q, k, v = inputs(batch, args)
        input_sets = [((q.astype(jnp.float32) * (1 + 1e-3 * i)).astype(q.dtype), k, v) for i in range(args.calls)]
        row = results.setdefault(f"b{batch}", {"cudnn_s": timed(cudnn)})
        for rule in rules:
            r = parse_rule(rule)
            common = dict(scale=scale, block_q=128, block_k=128, length=args.seq, sink_tiles=1,
                          tile_budget=r["tile_budget"], selector=r["selector"], shared_heads=r["shared_heads"])
            xla = jax.jit(lambda q, k, c=common: compact_tile_lists(prepass_keep(
                q, k, None, tile_cap=False, **{key: c[key] for key in c if key != "selector"},
                selector=c["selector"])))
            kernel = jax.jit(lambda q, k, v, r=r: toptheta_prefill(q, k, v, scale=scale, backend="triton",
                                                                           **_kernel_args(r))[0])
            b = np.asarray(xla(q, k))
            entry = {"xla_prepass_s": timed(lambda q, k, v: xla(q, k)), "kernel_s": timed(kernel),
                     "kept_off_diagonal_tiles": int(b[..., 0].sum()), "table_rows": int(np.prod(b.shape[:-1]))}
            for variant in args.variants.split(","):
                fused = jax.jit(lambda q, k, c=common, o=layout_from_text(variant): fused_prepass_table(
                    q, k, backend="triton", **o, **c))
                a = np.asarray(fused(q, k))
                entry[variant] = {"table_rows_differing": int(np.sum(np.any(a != b, axis=-1))),
                                  "prepass_s": timed(lambda q, k, v, f=fused: f(q, k))}
            default = jax.jit(lambda q, k, c=common: fused_prepass_table(q, k, backend="triton", **c))
            entry["fused_prepass_s"] = timed(lambda q, k, v: default(q, k))  # the kernel's own choice
            entry["prepass_fraction_of_kernel"] = entry["fused_prepass_s"] / entry["kernel_s"]
            entry["speedup_vs_cudnn"] = row["cudnn_s"] / entry["kernel_s"]
            row[rule] = entry
            print(f"B={batch} {rule}: {json.dumps(entry)}", flush=True)
        print(f"B={batch} cudnn {row['cudnn_s'] * 1e3:.3f} ms", flush=True)
        (out / "prepass.json").write_text(json.dumps(results, indent=1))
    results["fastest_variant"] = fastest_variant(results, rules[0], args.variants.split(","))
    print("fastest exact layout for", rules[0], "over the batches:", results["fastest_variant"], flush=True)
    (out / "prepass.json").write_text(json.dumps(results, indent=1))


def fastest_variant(results: dict, rule: str, variants: list[str]) -> str | None:
    """The layout with the least pre-pass time summed over the batches, among those whose tables
    equal the XLA pre-pass's in every row at every batch."""
    rows = [results[key][rule] for key in results if key.startswith("b")]
    exact = [v for v in variants if all(row[v]["table_rows_differing"] == 0 for row in rows)]
    return min(exact, key=lambda v: sum(row[v]["prepass_s"] for row in rows), default=None)


def _kernel_args(r: dict) -> dict:
    return {"tile_selector": r["selector"], "shared_heads": r["shared_heads"], "tile_budget": r["tile_budget"],
            "block_q": 128, "block_k": 128}


def _reference(q, k, v, scale, r):
    from condensa.kernels.toptheta_reference import toptheta_prefill_reference

    return toptheta_prefill_reference(q, k, v, scale=scale, **_kernel_args(r)).astype(jnp.float32)


if __name__ == "__main__":
    main()

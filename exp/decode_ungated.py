"""Experiment (issue 7): the ungated Top-θ decode step at the study model's shape (B 8, S 16k,
6 heads of 64, bf16, one jitted step over 6 layers), against cuDNN and JAX's Pallas decode in the
same process. `--grid settings`: the kernel's launch settings (tile size, split-K shares, pipeline
stages, warps, and the tile list read from memory, as before `contiguous`, against computed
tiles). `--grid combine`: the split-K combine as one Pallas kernel against the jax.numpy
combine, and the decode kernel alone (its partial outputs, no combine). `--grid walks` (default):
how a program walks its tiles (`walk`: "reduce", the float32 walk with five reductions per tile;
"lanes", per-lane softmax state; "mma", both products on tensor cores), at several tile sizes,
warps and stages, and the dense mode (θ = None, what a layer left dense runs) with "reduce" and
"mma". `--grid layout`: the heads of one key range in neighbouring programs (`heads_first`), a
head-major cache ([B·H, S, 1, D]: each head's keys contiguous), and the two kernels alone with
their per-row inputs built outside the step (`prebuilt`). `--grid narrow`: one or two warps per
program with small tiles and many splits. `--grid dense`: the dense mode alone, both walks, tiles
of 64 / 128 / 256, twice. `--grid branch`: the ways of skipping V (`skip_v`): surviving rows in
every tile, surviving rows behind a branch per tile, whole blocks behind a branch.

Two survivor densities: θ at the bench's k = 64 (0.4% of the V rows survive on these synthetic
caches) and θ at k = 640, near the 4% that the trained 16k model keeps without a gate. Each
variant's output is checked against a float32 jax.numpy Top-θ before it is timed.

    PYTHONPATH=. python exp/decode_ungated.py [--grid settings|combine|walks|layout|narrow|dense|branch]   # JSON lines
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math

import jax
import jax.numpy as jnp

from condensa.eval.bench.decode import (DecodeBenchConfig, derive_thresholds, median_seconds, relative_error,
                                        structured_cache)
from condensa.eval.bench.decode_baselines import dense_baselines, head_major, tile_state
from condensa.kernels import toptheta_decode as td
from condensa.kernels.decode_combine import combine_splits

B, S, H, D, LAYERS = 8, 16384, 6, 64, 6


def reference(q, k, v, theta_h, scale):
    """Top-θ decode in float32: softmax over the scores above θ (every row here keeps some)."""
    a = jnp.einsum("bhd,bshd->bhs", q[:, 0].astype(jnp.float32), k.astype(jnp.float32)) * scale
    keep = a > theta_h[None, :, None]
    p = jnp.where(keep, jnp.exp(a - jnp.max(a, -1, keepdims=True)), 0.0)
    out = jnp.einsum("bhs,bshd->bhd", p, v.astype(jnp.float32)) / jnp.sum(p, -1)[..., None]
    return out[:, None], jnp.mean(keep)


def variant_call(theta, scale, lengths, *, block_k, splits, stages, warps, contiguous, fused_combine=True,
                 partials_only=False, walk="reduce", dense=False, heads_first=False, prebuilt=False,
                 skip_v="rows"):
    """One decode attention with these launch settings (`contiguous=False`: the tile list read from
    memory, as the kernel ran before; `partials_only`: the decode kernel without the combine;
    `dense`: no θ, the kernel's dense mode; `heads_first`: the heads of one key range in neighbouring
    programs; `prebuilt`: the two kernels alone, with their per-row inputs (θ lookup, metadata) built
    outside the timed step)."""
    opts = td.DecodeOptions(scale=scale, block_k=block_k, num_splits=splits, has_theta=not dense, backend="triton",
                            num_warps=warps, num_stages=stages, skip_v=skip_v, contiguous=contiguous,
                            fused_combine=fused_combine, walk=walk, heads_first=heads_first)
    theta = None if dense else theta

    def row_inputs(q):
        starts = jnp.zeros_like(lengths)
        tiles, count = td.contiguous_tiles(lengths, starts, heads=q.shape[2], n_tiles=S // block_k, block_k=block_k)
        theta_row = jnp.full(count.shape, -jnp.inf) if dense else td._lookup(theta, lengths)
        meta, theta_pair = td.row_inputs(count, lengths, starts, theta_row)
        return tiles, meta, theta_pair

    if prebuilt:
        def two_kernels(q, k, v):
            with jax.ensure_compile_time_eval():  # constants of the step, not ops in it
                tiles, meta, theta_pair = row_inputs(q)
            acc, stats = td._launch(meta, None if contiguous else tiles, theta_pair, q[:, 0], k, v, opts)
            return combine_splits(meta, theta_pair, acc, stats, v, None, num_splits=splits, queries_per_seq=1,
                                  has_sdc=False, interpret=False)[:, None]
        return two_kernels

    def call(q, k, v):
        if partials_only:
            tiles, meta, theta_pair = row_inputs(q)
            return td._launch(meta, None if contiguous else tiles, theta_pair, q[:, 0], k, v, opts)[0]
        return td._decode(q, k, v, lengths, None, theta, None, None, None, None, None, sdc_gamma=1.0, opts=opts,
                          vmc=False, sink_tiles=1)[0]
    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="walks", choices=["settings", "combine", "walks", "layout", "narrow", "dense", "branch"])
    args = parser.parse_args()
    scale = 1 / math.sqrt(D)
    lengths = jnp.full((B,), S, jnp.int32)
    caches = []
    for layer in range(LAYERS):
        q, k, v = structured_cache(jax.random.PRNGKey(11 + layer), B, S, H, D, jnp.bfloat16, block_k=128,
                                   retrieval_tiles=4)
        caches.append(dict(q=q, k=k, v=v, k_t=head_major(k), v_t=head_major(v)))

    def step_us(fn):
        step = jax.jit(lambda cs: [fn(c) for c in cs])
        return 1e6 * median_seconds([lambda: step(caches)], 3, 20, 10) / LAYERS

    base_cfg = DecodeBenchConfig()
    dense = {}
    for name, fn in dense_baselines(base_cfg.baselines, scale).items():
        dense[name] = step_us(lambda c, fn=fn: fn(c["q"], c["k"], c["v"], c["k_t"], c["v_t"], lengths))
        print(json.dumps(dict(method=name, us=dense[name])), flush=True)
    best = min(dense.values())
    for c in caches:
        c.pop("k_t"), c.pop("v_t")

    auto = td.default_num_splits(B * H, S // 128)
    settings_grid = [dict(block_k=64, splits=td.default_num_splits(B * H, S // 64), stages=2, warps=4, contiguous=False),
            dict(block_k=64, splits=td.default_num_splits(B * H, S // 64), stages=2, warps=4, contiguous=True),
            dict(block_k=128, splits=auto, stages=2, warps=4, contiguous=False)]
    for bk in (128, 256):
        for splits in (auto, 8, 16, 32):
            settings_grid.append(dict(block_k=bk, splits=splits, stages=2, warps=4, contiguous=True))
    for stages, warps in ((3, 4), (4, 4), (2, 8), (3, 8), (2, 2)):
        for bk in (128, 256):
            settings_grid.append(dict(block_k=bk, splits=16, stages=stages, warps=warps, contiguous=True))
    combine_grid = [dict(block_k=128, splits=splits, stages=2, warps=4, contiguous=True, fused_combine=fused)
                    for splits in (auto, 8, 16) for fused in (False, True)]
    combine_grid += [dict(block_k=128, splits=splits, stages=2, warps=4, contiguous=True, partials_only=True)
                     for splits in (auto, 16)]

    def walk_setting(walk, bk=128, warps=4, stages=2, **extra):
        return dict(block_k=bk, splits=td.default_num_splits(B * H, S // bk), stages=stages, warps=warps,
                    contiguous=True, walk=walk, **extra)
    walks_grid = [walk_setting("reduce"), walk_setting("lanes"), walk_setting("lanes", bk=64),
                  walk_setting("mma"), walk_setting("mma", bk=64), walk_setting("mma", bk=256),
                  walk_setting("mma", warps=8), walk_setting("mma", stages=3),
                  walk_setting("mma", partials_only=True)]
    layout_grid = [walk_setting("reduce"), walk_setting("reduce", heads_first=True),
                   walk_setting("reduce", bk=64, heads_first=True), walk_setting("reduce", prebuilt=True),
                   walk_setting("reduce", head_major=True), walk_setting("reduce", head_major=True, prebuilt=True)]
    narrow_grid = [dict(walk_setting(walk, bk=bk, warps=warps), splits=splits)
                   for walk, bk, warps, splits in (("reduce", 128, 4, 11), ("reduce", 32, 1, 32), ("reduce", 32, 1, 64),
                                                   ("reduce", 64, 1, 32), ("reduce", 64, 1, 64), ("reduce", 64, 2, 32),
                                                   ("reduce", 32, 2, 64), ("mma", 64, 1, 32), ("mma", 32, 1, 64))]
    grid = {"settings": settings_grid, "combine": combine_grid, "walks": walks_grid, "layout": layout_grid,
            "narrow": narrow_grid, "dense": [],
            "branch": [walk_setting("reduce", bk=bk, skip_v=skip_v) for bk in (128, 64)
                       for skip_v in ("rows", "rows_branch", "blocks")]}[args.grid]
    if args.grid == "layout":  # each head's cache contiguous: [B·H, S, 1, D], one head per row
        for c in caches:
            c["hm"] = (jnp.swapaxes(c["q"], 1, 2).reshape(B * H, 1, 1, D),
                       jnp.swapaxes(c["k"], 1, 2).reshape(B * H, S, 1, D),
                       jnp.swapaxes(c["v"], 1, 2).reshape(B * H, S, 1, D))

    dense_grid = {"walks": [walk_setting(walk, dense=True) for walk in ("reduce", "mma")],
                  "dense": [walk_setting(walk, bk=bk, dense=True) for _ in range(2) for bk in (64, 128, 256)
                            for walk in ("reduce", "mma")]}.get(args.grid, [])
    if dense_grid:  # the dense mode (a layer left dense), checked against plain softmax attention
        c0 = caches[0]
        ref, _ = reference(c0["q"], c0["k"], c0["v"], jnp.full((H,), -jnp.inf), scale)
        for settings in dense_grid:
            rec = dict(method="dense", **settings)
            call = variant_call(None, scale, lengths, **settings)
            rec["rel_error"] = relative_error(jax.jit(call)(c0["q"], c0["k"], c0["v"]), ref)
            if rec["rel_error"] < 2e-2:
                rec["us"] = step_us(lambda c, call=call: call(c["q"], c["k"], c["v"]))
                rec["vs_best_dense"] = best / rec["us"]
            print(json.dumps(rec), flush=True)

    for k_top in (64, 640):
        cfg = dataclasses.replace(base_cfg, k_top=k_top, block_k=128)
        c0 = caches[0]
        theta, _, _ = derive_thresholds(c0["q"], c0["k"], lengths, tile_state(c0["k"], c0["v"], lengths, 128)[0],
                                        scale=scale, cfg=cfg, budget=None)
        ref, kept = reference(c0["q"], c0["k"], c0["v"], theta[:, 0], scale)
        for settings in grid:
            rec = dict(method="ungated", k_top=k_top, kept=float(kept), **settings)
            settings = dict(settings)
            try:
                if settings.pop("head_major", False):  # one θ (head 0's) for every head, here and in the check
                    call = variant_call(theta[:1], scale, jnp.full((B * H,), S, jnp.int32), **settings)
                    want, _ = reference(c0["q"], c0["k"], c0["v"], jnp.full((H,), theta[0, 0]), scale)
                    inputs = lambda c: c["hm"]  # noqa: E731
                    back = lambda out: jnp.swapaxes(out.reshape(B, H, 1, D), 1, 2)  # noqa: E731
                else:
                    call = variant_call(theta, scale, lengths, **settings)
                    want, inputs, back = ref, (lambda c: (c["q"], c["k"], c["v"])), (lambda out: out)
                if not settings.get("partials_only"):  # partials alone are not an output to check
                    rec["rel_error"] = relative_error(back(jax.jit(call)(*inputs(c0))), want)
                if not rec.get("rel_error", 0.0) < 2e-2:
                    raise AssertionError(f"wrong output: relative error {rec['rel_error']}")
                rec["us"] = step_us(lambda c, call=call, inputs=inputs: call(*inputs(c)))
                rec["vs_best_dense"] = best / rec["us"]
            except Exception as err:  # a setting that does not compile is reported, not fatal
                rec["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()

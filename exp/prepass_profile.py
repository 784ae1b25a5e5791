"""Where the pre-pass's time goes on the GPU: each device kernel's own duration, from a JAX
profiler trace, for the fused pre-pass and the gated kernel that runs it (random inputs of
SmolLM2's shape, as in exp/prepass_speed.py). Host timers cannot split one jit into its kernels.

    PYTHONPATH=. python exp/prepass_profile.py --out $OUT/profile

Writes OUT/kernels.json: per batch and layout, the mean microseconds per call of every kernel.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepass_speed import inputs, parse_rule  # noqa: E402  (the same inputs and rules as the timing)

from condensa.kernels import toptheta_prefill  # noqa: E402
from condensa.kernels.selector_prepass import fused_prepass_table, layout_from_text  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv_heads", type=int, default=3)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--rule", default="rowmean+shared@0.4")
    p.add_argument("--layouts", default="split:2048,split:4096:cw1", help="selector_prepass.layout_from_text")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--out", default="runs/prepass-profile")
    return p.parse_args()


def device_kernel_times(trace_dir: Path, calls: int) -> dict[str, float]:
    """Mean µs per call of each kernel name in the newest perfetto trace under trace_dir."""
    trace = max(trace_dir.rglob("*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    events = json.loads(gzip.decompress(trace.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    pids = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"}
    totals = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        place = pids.get(e.get("pid"), "") + "/" + names.get((e.get("pid"), e.get("tid")), "")
        if "gpu" in place.lower() or "stream" in place.lower():
            totals[e["name"][:80]] += float(e.get("dur", 0.0))
    if not totals:  # say what the trace holds instead
        return {"no device events; places": sorted({pids.get(e.get("pid"), "") for e in events})}
    return {name: us / calls for name, us in totals.most_common()}


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rule = parse_rule(args.rule)
    scale = args.head_dim ** -0.5
    common = dict(scale=scale, block_q=128, block_k=128, length=args.seq, sink_tiles=1,
                  tile_budget=rule["tile_budget"], selector=rule["selector"], shared_heads=rule["shared_heads"])
    results = {"args": vars(args), "device": str(jax.devices()[0]), "jax": jax.__version__}
    for batch in [int(b) for b in args.batches.split(",")]:
        q, k, v = inputs(batch, args)
        jobs = {layout: jax.jit(lambda q, k, o=layout_from_text(layout): fused_prepass_table(
            q, k, backend="triton", **o, **common)) for layout in args.layouts.split(",")}
        jobs["gated kernel"] = jax.jit(lambda q, k: toptheta_prefill(
            q, k, v, scale=scale, backend="triton", tile_selector=rule["selector"], shared_heads=rule["shared_heads"],
            tile_budget=rule["tile_budget"], block_q=128, block_k=128)[0])
        for name, fn in jobs.items():
            jax.block_until_ready(fn(q, k))
            folder = out / f"trace-b{batch}-{len(results)}"
            with jax.profiler.trace(str(folder), create_perfetto_trace=True):
                for _ in range(args.calls):
                    result = fn(q, k)
                jax.block_until_ready(result)
            kernels = device_kernel_times(folder, args.calls)
            results.setdefault(f"b{batch}", {})[name] = kernels
            print(f"B={batch} {name}:", "; ".join(f"{n} {us if isinstance(us, list) else round(us, 1)}"
                                                 for n, us in list(kernels.items())[:10]), flush=True)
    (out / "kernels.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Does compensating the mass of the tiles a selector skips help, as exact SDC + VMC helps Top-θ?

    PYTHONPATH=. python exp/tile_compensation.py --seq 2048 --block 64 --windows 4 --out runs/tile-compensation

For budgeted tile rules at equal tile counts (rowmean with a shared budget, the oracle), attention
inside the kept tiles is either renormalised over them (today's rule) or left with the skipped
tiles' true mass in its denominator and that share filled with the mean visible V (exact SDC +
VMC, DESIGN.md), written as Top-θ with θ = −inf inside the kept tiles. The exact mass is the
ceiling of any estimate a kernel could make of it. WikiText-2 test windows, Δ against dense.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model_tiles import LayerRunner, evaluate, paired_delta, windows_of  # noqa: E402

from condensa import AttentionConfig, load_pretrained  # noqa: E402
from condensa.data import load_tokenizer  # noqa: E402
from condensa.sparsity.thresholds import Thresholds  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--budgets", default="0.25,0.125")
    p.add_argument("--selectors", default="rowmean+shared,oracle")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="runs/tile-compensation")
    args = p.parse_args()
    model, config = load_pretrained(args.model, dtype=jnp.dtype(args.dtype))
    ids = np.asarray(load_tokenizer(args.model)(Path(args.data).read_text(encoding="utf-8"))["input_ids"], np.int32)
    windows = windows_of(ids, args.seq, args.windows)
    runner = LayerRunner(model)
    heads, layers = config.n_head, config.n_layer
    keep_all = Thresholds(theta=np.full((layers, heads, args.seq), -np.inf, np.float32),
                          sdc_delta=np.zeros((layers, heads, args.seq), np.float32), k=1)
    tail = args.seq // 4
    dense = evaluate(runner, windows, AttentionConfig(), tail)
    results = {"args": vars(args), "dense_ppl": dense["ppl"], "rules": {}}
    for spec in args.selectors.split(","):
        selector, shared = spec.removesuffix("+shared"), spec.endswith("+shared")
        for f in [float(x) for x in args.budgets.split(",")]:
            gate = dict(tile_gate=True, tile_selector=selector, shared_heads=shared, tile_budget=f,
                        block_q=args.block, block_k=args.block)
            for name, attention, thresholds in (
                    ("renormalised", AttentionConfig(**gate), None),
                    ("exact+vmc", AttentionConfig(mode="toptheta", k=1, sdc="exact", vmc=True, **gate), keep_all)):
                r = evaluate(runner, windows, attention, tail, thresholds)
                delta = paired_delta(r, dense)
                results["rules"][f"{spec}@{f}/{name}"] = {"ppl": r["ppl"], **delta}
                print(spec, f, name, f"ppl {r['ppl']:.3f} ({delta['delta_pct']:+.2f}%)", flush=True)
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Peak memory and time of Top-θ calibration of a real model (SmolLM2-135M) on whatever device is present.

    python exp/calibration_memory.py --seq_len 2048 --blocks 2 --out runs/calibration-memory   # CPU
    python exp/calibration_memory.py --model /tmp/smollm2.gguf --data /tmp/austen-emma.txt \\
        --seq_len 8192 --blocks 2 --out $OUT/calibration-memory                                 # one GPU

Calibration runs the model one layer at a time, so its peak should be about one layer's
statistics (condensa/sparsity/calibration.py). This measures it: the host's peak resident memory
(VmHWM, which on a GPU machine counts only host buffers) and, where the device reports it, the
device's peak bytes in use. Both are read after the text is tokenised (first reading) and after
calibration (second). The defaults are configs/smollm2-calibrate.yaml's: its model, its books,
k, tile and tile budget; blocks come from its seeded shuffle. XLA's own estimate of one layer's
temporaries (the statistics of either pass) is added, compiled for the same shapes.

Results go to OUT/calibration_memory.json and are printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from condensa.attention import AttentionConfig
from condensa.data import model_tokenizer
from condensa.eval.bench.memory import peaks
from condensa.model import load_pretrained
from condensa.sparsity.calibration import (
    CalibrationConfig, LayerWalk, embed_tokens, block_dropped_mass, block_samples, calibrate, load_blocks,
)

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2-calibrate.yaml"


def parse_args():
    defaults = yaml.safe_load(CONFIG.read_text())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=defaults["model"], help="a .gguf file or a named model")
    p.add_argument("--data", nargs="+", default=defaults["data"], help="text files or folders of .txt")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--blocks", type=int, default=2, help="calibration blocks")
    p.add_argument("--k", type=int, default=defaults["k"])
    p.add_argument("--tile", type=int, default=defaults["tile"], help="gate tile size; 0 = no gate")
    p.add_argument("--tile_budget", type=float, default=defaults["tile_budget"])
    p.add_argument("--placement", default="pre")
    p.add_argument("--topk_at_calibration", action="store_true")
    p.add_argument("--out", required=True)
    return p.parse_args()


def layer_temporaries(model, args, gate) -> dict:
    """XLA's estimate of one layer's statistics temporaries, per pass, for these shapes (GiB)."""
    walk = LayerWalk(model, AttentionConfig())
    graphdef, state = walk.layers[0]
    ids = jax.ShapeDtypeStruct((args.batch_size, args.seq_len), jnp.int32)
    x, block_args = jax.eval_shape(lambda ids: embed_tokens(walk.graphdef, walk.state, ids), ids)
    k_l = jnp.int32(args.k)
    theta = jax.ShapeDtypeStruct((model.config.n_head, model.config.n_positions), jnp.float32)
    out = {}
    for name, compiled in (
        ("samples", block_samples.lower(graphdef, state, x, block_args, k_l, placement=args.placement, gate=gate)),
        ("dropped_mass", block_dropped_mass.lower(graphdef, state, x, block_args, k_l, theta,
                                                  placement=args.placement, gate=gate)),
    ):
        analysis = compiled.compile().memory_analysis()
        out[name] = None if analysis is None else analysis.temp_size_in_bytes / 2**30
    return out


def main() -> None:
    args = parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "device": str(jax.devices()[0]), "jax": jax.__version__}
    start = time.perf_counter()
    model, _ = load_pretrained(args.model)
    settings = CalibrationConfig(model=args.model, data=tuple(args.data), k=args.k, placement=args.placement,
                                 tile=args.tile, tile_budget=args.tile_budget, samples=args.blocks,
                                 seq_len=args.seq_len, batch_size=args.batch_size, check_blocks=0, out=str(out_dir))
    blocks, _ = load_blocks(settings, model_tokenizer(args.model), args.seq_len)
    result["load_s"] = time.perf_counter() - start
    result["blocks"] = int(len(blocks))
    result["after_load"] = peaks()
    print("loaded", json.dumps(result["after_load"]), flush=True)

    start = time.perf_counter()
    thresholds = calibrate(model, blocks, k=args.k, placement=args.placement, gate=settings.gate,
                           batch_size=args.batch_size, topk_at_calibration=args.topk_at_calibration,
                           data=",".join(args.data))
    result["calibrate_s"] = time.perf_counter() - start
    result["after_calibrate"] = peaks()
    n = args.seq_len
    result["tables"] = {  # to compare runs on different devices
        "theta_mean": float(np.mean(thresholds.theta[:, :, args.k:n])),
        "sdc_delta_mean": float(np.mean(thresholds.sdc_delta[:, :, args.k:n])),
        "tile_theta_mean": None if thresholds.tile_theta is None else float(np.mean(thresholds.tile_theta)),
    }
    result["xla_layer_temp_gib"] = layer_temporaries(model, args, settings.gate)
    (out_dir / "calibration_memory.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=1))


if __name__ == "__main__":
    main()

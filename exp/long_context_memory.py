"""How much device memory the long-context studies' reference-op passes need, before a GPU run.

The evaluation and calibration stages of configs/study-8k.yaml and configs/study-16k.yaml run the
jax.numpy reference op, which holds [B, H, T, T] float32 arrays per layer. A run that runs out of
memory costs a device call, so this compiles each pass for the study model's shape (without running
it) and prints XLA's memory analysis: arguments, outputs and temporaries. Compiled here for the
CPU, whose buffer assignment differs from the GPU's, so read the numbers as an estimate.

    python exp/long_context_memory.py --seq_lens 8192,16384
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.attention import AttentionConfig
from condensa.model.registry import build_model, preset
from condensa.sparsity.calibration import GateSpec, LayerWalk, embed_tokens, block_dropped_mass, block_samples
from condensa.sparsity.thresholds import Thresholds, model_fingerprint


def thresholds_for(config, tile: int) -> Thresholds:
    """Tables of the right shapes (values do not matter for memory)."""
    t, h, n = config.n_positions, config.n_head, config.n_layer
    nt = -(-t // tile)
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    return Thresholds(theta=zeros(n, h, t), sdc_delta=zeros(n, h, t), tile_theta=zeros(n, h, nt),
                      tile_theta_decode=zeros(n, h, nt), k=64, block_q=tile, block_k=tile, tile_budget=0.125,
                      sink_tiles=1, model=model_fingerprint(config))


def gib(n: int) -> str:
    return f"{n / 2**30:6.1f} GiB"


def report(name: str, compiled) -> None:
    mem = compiled.memory_analysis()
    if mem is None:
        print(f"{name:44s} no memory analysis on this backend")
        return
    print(f"{name:44s} args {gib(mem.argument_size_in_bytes)}  out {gib(mem.output_size_in_bytes)}  "
          f"temp {gib(mem.temp_size_in_bytes)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_lens", default="8192,16384")
    parser.add_argument("--tile", type=int, default=128)
    args = parser.parse_args()
    for t in (int(x) for x in args.seq_lens.split(",")):
        config = preset("tiny", n_layer=6, n_embd=384, n_head=6, n_positions=t)
        model = build_model(config, rngs=nnx.Rngs(0))
        model.eval()  # as load_pretrained returns it: no attention dropout, so no probabilities are needed
        graphdef, state = nnx.split(model)
        ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
        th = thresholds_for(config, args.tile)
        gated = dict(tile_gate=True, block_q=args.tile, block_k=args.tile, tile_budget=0.125)
        rules = {
            "top-k": (AttentionConfig(mode="topk", k=64), None),
            "Top-θ + SDC + VMC": (AttentionConfig(mode="toptheta", sdc="calibrated", vmc=True), th),
            "gate + Top-θ + SDC + VMC": (AttentionConfig(mode="toptheta", sdc="calibrated", vmc=True, **gated), th),
            "decode gate rows + Top-θ": (AttentionConfig(mode="toptheta", decode_gate_rows=True, **gated), th),
        }
        print(f"T = {t} (batch 1, 6 layers, 6 heads of 64)")
        for name, (attention, thresholds) in rules.items():

            def logits(st, x, attention=attention, thresholds=thresholds):
                return nnx.merge(graphdef, st)(x, attention=attention, thresholds=thresholds).logits

            report(f"  perplexity forward, {name}", jax.jit(logits).lower(state, ids).compile())
        # calibration runs one layer at a time; its peak is one layer's statistics (either pass)
        walk = LayerWalk(model, AttentionConfig())
        layer_graph, layer_state = walk.layers[0]
        x, block_args = jax.eval_shape(lambda ids: embed_tokens(walk.graphdef, walk.state, ids), ids)
        gate = GateSpec(args.tile, args.tile, 0.125, 1)
        k_l = jnp.int32(64)
        compiled = block_samples.lower(layer_graph, layer_state, x, block_args, k_l, placement="pre",
                                       gate=gate).compile()
        report("  calibration, one layer's samples (gate on)", compiled)
        theta = jax.ShapeDtypeStruct((config.n_head, t), jnp.float32)
        compiled = block_dropped_mass.lower(layer_graph, layer_state, x, block_args, k_l, theta, placement="pre",
                                            gate=gate).compile()
        report("  calibration, one layer's dropped mass (gate on)", compiled)


if __name__ == "__main__":
    main()

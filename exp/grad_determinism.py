"""Which op makes fine-tuning non-deterministic on the GPU? Computes the training objective's
gradients twice on the same batch, for each variant of the suspects, and says which are bit-identical.

    PYTHONPATH=. python exp/grad_determinism.py --out $OUT/grad-determinism.json

Suspects (each variant switches some of them off):
- cuDNN's flash-attention backward (dQ summed with atomics): `xla_attention` uses XLA's attention;
- the embedding's gradient, a scatter-add over token ids: `onehot_embed` takes it from a one-hot matmul;
- the concentration loss's Pallas mass kernel: the `topk` loss variants run it.
Random SmolLM2-135M-shaped weights are enough: determinism does not depend on the weights' values.
Each variant's gradients are also fingerprinted, so two processes can be compared (autotuning
chooses its kernels anew in each). Run once more under
XLA_FLAGS=--xla_gpu_exclude_nondeterministic_ops=true to see which variants compile there (each
variant's error is recorded, not raised).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.model.registry import build_model, preset
from condensa.train.config import LossConfig, TopkLoss
from condensa.train.objective import objective


@contextlib.contextmanager
def xla_attention():
    """Every `jax.nn.dot_product_attention` call on XLA's implementation (no cuDNN kernel)."""
    original = jax.nn.dot_product_attention

    def forced(*args, implementation=None, **kwargs):
        return original(*args, implementation="xla", **kwargs)

    jax.nn.dot_product_attention = forced
    try:
        yield
    finally:
        jax.nn.dot_product_attention = original


@contextlib.contextmanager
def onehot_embed():
    """nnx.Embed through a one-hot matmul, whose gradient is a matmul, not a scatter-add."""
    original = nnx.Embed.__call__

    def call(self, inputs):
        table = self.embedding[...]
        return jax.nn.one_hot(inputs, table.shape[0], dtype=self.dtype or table.dtype) @ table.astype(self.dtype or table.dtype)

    nnx.Embed.__call__ = call
    try:
        yield
    finally:
        nnx.Embed.__call__ = original


def gradients(model, batch, cfg: LossConfig):
    graphdef, state = nnx.split(model)  # each call starts from this state (RNG counters included)

    @nnx.jit
    def grads(model, batch):
        return nnx.grad(lambda m: objective(m, batch, cfg, jnp.int32(1000))[0])(model)

    return lambda: jax.tree.leaves(jax.device_get(grads(nnx.merge(graphdef, state), batch)))


def fingerprint(leaves) -> str:
    """sha256 of every gradient's bytes: equal across processes only if the runs are bit-identical."""
    digest = hashlib.sha256()
    for leaf in leaves:
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()


def compare(first, second) -> dict:
    differing = [i for i, (a, b) in enumerate(zip(first, second)) if not np.array_equal(np.asarray(a), np.asarray(b))]
    worst = max((float(np.max(np.abs(np.asarray(first[i], np.float64) - np.asarray(second[i], np.float64))))
                 for i in differing), default=0.0)
    return {"arrays": len(first), "arrays_differing": len(differing), "max_abs_difference": worst,
            "bit_identical": not differing}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8, help="SmolLM2-135M has 30; determinism does not depend on depth")
    p.add_argument("--repeats", type=int, default=3, help="gradient computations compared with the first")
    p.add_argument("--cases", default=None, help="comma-separated 'loss/variant' names to run (default: all)")
    p.add_argument("--out", default=None, help="write the report here as JSON")
    args = p.parse_args()
    config = preset("llama-tiny", **{**dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                            num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                            tie_word_embeddings=True, max_position_embeddings=8192),
                                     "num_hidden_layers": args.layers})
    model = build_model(config, dtype=jnp.bfloat16, remat=True, rngs=nnx.Rngs(0))
    model.train()
    batch = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq_len + 1)), jnp.int32)
    losses = {"lm only": LossConfig(tile_size=128), "topk k=64": LossConfig(topk=TopkLoss(weight=1.0, k=64), tile_size=128)}
    variants = {"as trained": [], "xla attention": [xla_attention], "one-hot embedding": [onehot_embed],
                "xla attention + one-hot embedding": [xla_attention, onehot_embed]}
    cases = [("lm only", "as trained")] + [("topk k=64", v) for v in variants]
    if args.cases:
        cases = [c for c in cases if "/".join(c) in args.cases.split(",")]
    report = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "device": str(jax.devices()[0]), "jax": jax.__version__,
              "batch": args.batch, "seq_len": args.seq_len, "layers": args.layers, "results": []}
    for loss_name, variant in cases:
        row = {"loss": loss_name, "variant": variant}
        try:
            with contextlib.ExitStack() as stack:
                for patch in variants[variant]:
                    stack.enter_context(patch())
                run = gradients(model, batch, losses[loss_name])
                start = time.perf_counter()
                first = run()
                row["first_call_s"] = time.perf_counter() - start
                checks = [compare(first, run()) for _ in range(args.repeats)]
            row.update(arrays=checks[0]["arrays"], identical_calls=sum(c["bit_identical"] for c in checks),
                       calls=len(checks), bit_identical=all(c["bit_identical"] for c in checks),
                       arrays_differing=max(c["arrays_differing"] for c in checks),
                       max_abs_difference=max(c["max_abs_difference"] for c in checks),
                       fingerprint=fingerprint(first))  # compare across processes: autotuning may choose anew
        except Exception as error:  # noqa: BLE001 - a variant that fails to compile is a result
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        print(json.dumps(row), flush=True)
        report["results"].append(row)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

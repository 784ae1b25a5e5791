"""Where do the dense cached path and recomputing the prefix part on the GPU? Teacher-forced
float32 logits of both at each generated position of a random-weight SmolLM2 shape (bench generate's check)."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.attention import AttentionConfig
from condensa.eval.bench import generation as g

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 30
g.SHAPES["probe"] = {**g.SHAPES["smollm2-135m"], "num_hidden_layers": layers}
cfg = g.GenerateBenchConfig(shape="probe", dtype="float32", prompt_lens=[1024])
model = g.build_model(cfg, 2048)
tokens = jnp.asarray(np.random.default_rng(2).integers(0, 49152, (1, 1024 + 16)))
graphdef, state = nnx.split(model)
for precision in ("highest", "default"):
    with jax.default_matmul_precision(precision):
        out = {use: np.asarray(g._forced_logits(graphdef, state, tokens, None, prompt_len=1024, attention=AttentionConfig(),
                                                 use_cache=use)) for use in (True, False)}
    diff = np.abs(out[True] - out[False]).max(axis=(0, 2))
    print(precision, "max |logit diff| per step:", np.array2string(diff, precision=2), "logit std", out[True].std())

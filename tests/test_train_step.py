"""Gradient accumulation: two micro-batches of 4 make the same update as one batch of 8."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.train import parallel
from condensa.train.setup import build_model, build_optimizer
from condensa.train.step import FlatState, make_train_step
from tests.train_helpers import tiny_config


def test_accumulated_step_equals_one_big_batch(tmp_path):
    # The resume and data-parallel tests' settings and shardings: the accum = 1 step is shared.
    cfg = tiny_config(tmp_path / "unused", 30)
    mesh = parallel.make_mesh()
    batch = np.random.default_rng(0).integers(0, 256, (8, 33)).astype(np.int32)
    results = []
    for accum in (1, 2):
        model, _ = build_model(cfg, 256)
        graphdef, state = nnx.split((model, build_optimizer(model, cfg.optimizer, cfg.train.steps)))
        shardings = parallel.state_shardings(state, mesh)
        state = FlatState.of(jax.device_put(state, shardings))
        step = make_train_step(graphdef, cfg.loss, state_shardings=shardings)
        micro = parallel.put_batch(batch.reshape(accum, 8 // accum, 33), parallel.batch_sharding(mesh))
        for i in range(2):
            state, metrics = step(state, micro, jnp.int32(i))
        results.append((nnx.state(nnx.merge(graphdef, state.state)[0], nnx.Param), metrics))
    (p1, m1), (p2, m2) = results
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert float(m1["L_topk"]) > 0

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


def test_eval_without_attention_metrics_keeps_the_same_loss(tmp_path):
    """eval_attention_metrics=False (long contexts) gives the loss alone, through the fused attention,
    and that loss equals the one evaluated with the probabilities; one sequence at a time (as the
    loop evaluates) averages to the whole batch's loss."""
    from condensa.train.step import make_eval_step

    cfg = tiny_config(tmp_path / "unused", 30)
    model, _ = build_model(cfg, 256)
    graphdef, state = nnx.split((model, build_optimizer(model, cfg.optimizer, cfg.train.steps)))
    flat = FlatState.of(state)
    batch = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 33)), jnp.int32)
    full = make_eval_step(graphdef, cfg.loss, cfg.loss.topk.k, 32)(flat, batch)
    lean = make_eval_step(graphdef, cfg.loss, cfg.loss.topk.k, 32, attention_metrics=False)
    alone = lean(flat, batch)
    assert set(alone) == {"val_loss"} and "elements_95" in full
    np.testing.assert_allclose(float(alone["val_loss"]), float(full["val_loss"]), rtol=1e-5)
    per_sequence = np.mean([float(lean(flat, batch[i:i + 1])["val_loss"]) for i in range(4)])
    np.testing.assert_allclose(per_sequence, float(full["val_loss"]), rtol=1e-5)

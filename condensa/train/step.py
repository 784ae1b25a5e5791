"""Jitted train and eval steps over the flat `(graphdef, state)` of (model, optimizer).

A functional step (split outside, merge inside) keeps the jitted function free of Python objects,
so the state can be donated and sharded like any pytree; the `data` axis of the batch is what the
mesh splits (see `condensa.train.parallel`). The steps take and return a `FlatState`: rebuilding
an `nnx.State` from a jitted call's outputs costs milliseconds of Python per step, a sizeable share
of a small model's device step, and serialises with it (docs/benchmarks.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from condensa.sparsity import loss as conc
from condensa.train.config import LossConfig
from condensa.train.objective import objective


@jax.tree_util.register_pytree_node_class
class FlatState:
    """A state pytree kept as its leaves and treedef: flattening and rebuilding it are one list,
    not a walk over NNX's nested state. `.state` rebuilds the `nnx.State` (for checkpoints,
    evaluation and export, which run rarely)."""

    def __init__(self, leaves, treedef):
        self.leaves, self.treedef = list(leaves), treedef

    @classmethod
    def of(cls, tree) -> "FlatState":
        leaves, treedef = jax.tree.flatten(tree)
        return cls(leaves, treedef)

    @property
    def state(self):
        return jax.tree.unflatten(self.treedef, self.leaves)

    def tree_flatten(self):
        return self.leaves, self.treedef

    @classmethod
    def tree_unflatten(cls, treedef, leaves):
        return cls(leaves, treedef)


_norm = optax.tree.norm if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm


def _grads(model, batch, cfg: LossConfig, step):
    """(grads, metrics) of one micro-batch; the model's RNG counters advance in place.

    `nnx.value_and_grad` rather than `jax.value_and_grad`: the model's per-block `nnx.remat`
    updates RNG state, which NNX only allows under its own transforms.
    """
    loss_fn = lambda m: objective(m, batch, cfg, step)  # noqa: E731
    (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return grads, metrics


def make_train_step(graphdef, cfg: LossConfig, *, state_shardings=None):
    """The jitted train step `(FlatState, batches, step) -> (FlatState, metrics)`. Runs with the
    same model structure, loss config and shardings share one compiled function (runs started
    from one process: sweeps, resumes, tests)."""
    leaves, treedef = jax.tree.flatten(state_shardings) if state_shardings is not None else ((), None)
    return _train_step(graphdef, cfg, tuple(leaves), treedef)


@functools.lru_cache(maxsize=16)
def _train_step(graphdef, cfg: LossConfig, sharding_leaves: tuple, sharding_treedef):
    """`train_step(state, batches [accum, B, T+1], step) -> (state, metrics)`: one optimizer step
    over `accum` micro-batches whose gradients are averaged (accumulation by hand in a `scan`,
    so the optimizer and its schedule count real updates only)."""

    def train_step(flat: FlatState, batches, step):
        model, optimizer = nnx.merge(graphdef, flat.state)
        if batches.shape[0] == 1:
            grads, metrics = _grads(model, batches[0], cfg, step)
        else:
            model_def, params, rest = nnx.split(model, nnx.Param, ...)

            def micro(carry, batch):
                # The parameters ride in the carry unchanged: NNX refuses variables that hold
                # tracers of the enclosing trace, which a closure over `params` would be.
                grad_sum, rest, params = carry
                m = nnx.merge(model_def, params, rest)
                grads, metrics = _grads(m, batch, cfg, step)
                summed = jax.tree.map(jnp.add, grad_sum, grads)
                return (summed, nnx.split(m, nnx.Param, ...)[2], params), metrics

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grad_sum, rest, _), metrics = jax.lax.scan(micro, (zeros, rest, params), batches)
            nnx.update(model, rest)
            grads = jax.tree.map(lambda g: g / batches.shape[0], grad_sum)
            metrics = jax.tree.map(jnp.mean, metrics)
        optimizer.update(model, grads)
        metrics = {**metrics, "grad_norm": _norm(grads)}
        return FlatState.of(nnx.state((model, optimizer))), metrics

    state_shardings = None if sharding_treedef is None else FlatState(sharding_leaves, sharding_treedef)
    out_shardings = None if state_shardings is None else (state_shardings, None)
    return jax.jit(train_step, donate_argnums=0, out_shardings=out_shardings)


def make_eval_step(graphdef, cfg: LossConfig, k: int, seq_len: int, *, attention_metrics: bool = True):
    """`eval_step(FlatState, batch [B, T+1]) -> metrics`: validation loss and sparsity metrics of the
    dense model (dropout off). Tile metrics need seq_len to be a multiple of loss.tile_size.
    The metrics hold every layer's [B, H, T, T] probabilities; attention_metrics=False leaves them
    out (the loss alone, through the fused attention), for contexts where those do not fit.
    The loss weights do not matter here, so runs that differ only in them share one compile."""
    return _eval_step(graphdef, cfg.tile_size, cfg.tile.f, cfg.sink_tiles, k, seq_len % cfg.tile_size == 0,
                      attention_metrics)


@functools.lru_cache(maxsize=16)
def _eval_step(graphdef, tile_size: int, f: float, sink_tiles: int, k: int, with_tiles: bool, attention_metrics: bool):

    def eval_step(flat: FlatState, batch):
        model, _ = nnx.merge(graphdef, flat.state)
        model.eval()
        inputs, targets = batch[:, :-1], batch[:, 1:]
        out = model(inputs, return_attention=attention_metrics)
        metrics = {"val_loss": optax.softmax_cross_entropy_with_integer_labels(out.logits, targets).mean()}
        if not attention_metrics:
            return metrics
        probs = out.attentions

        def topk_mass(p):
            top, counted = conc.topk_row_mass(p, k)
            return top[..., counted].mean()

        metrics[f"top{k}_mass"] = conc.mean_over_layers(topk_mass, probs)
        metrics["elements_95"] = conc.mean_over_layers(lambda p: conc.elements_for_mass(p, 0.95).mean(), probs)
        if with_tiles:
            oracle = functools.partial(conc.oracle_tile_mass, block=tile_size, f=f, sink_tiles=sink_tiles)
            gate = functools.partial(conc.gate_captured_mass, block=tile_size, f=f, sink_tiles=sink_tiles)
            metrics["oracle_tile_mass"] = conc.mean_over_layers(lambda p: oracle(p).mean(), probs)
            metrics["gate_tile_mass"] = conc.mean_over_layers(lambda p: gate(p).mean(), probs)
        return metrics

    return jax.jit(eval_step)

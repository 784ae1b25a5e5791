"""The objects a run starts from: the model (hub weights or a preset from scratch) and the optimizer."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import optax
from flax import nnx

from condensa.errors import ConfigError
from condensa.model import GPT2, GPT2Config, load_pretrained
from condensa.model.registry import build_model as build_network
from condensa.model.registry import preset
from condensa.train.config import OptimizerConfig, TrainConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The config fields that hold dropout rates (GPT-2's three, LLaMA's attention dropout)
_DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout")


def build_model(cfg: TrainConfig, vocab_size: int) -> tuple[GPT2, GPT2Config]:
    """The model in training mode: float32 parameters, `train.dtype` compute, per-block remat."""
    dtype = _DTYPES[cfg.train.dtype]
    if cfg.init == "pretrained":
        if cfg.model_overrides:
            raise ConfigError("model_overrides only applies to init=scratch; a pretrained model keeps its shape.")
        model, config = load_pretrained(cfg.model, dtype=dtype, seed=cfg.train.seed, remat=cfg.train.remat)
    else:
        overrides = {"vocab_size": vocab_size, **cfg.model_overrides}
        config = preset(cfg.model_config, **overrides)
        model = build_network(config, dtype=dtype, remat=cfg.train.remat, rngs=nnx.Rngs(cfg.train.seed))
    if cfg.data.seq_len > config.n_positions:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is longer than the model's n_positions={config.n_positions}; "
            f"set --data.seq_len {config.n_positions} or less."
        )
    if vocab_size > config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but the model only {config.vocab_size}; "
            "use the tokenizer that belongs to the model."
        )
    if cfg.dropout is not None:
        modules = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
        for _, module in modules:
            if isinstance(module, nnx.Dropout):
                module.rate = cfg.dropout
        # the config says so too, so the exported config.json holds the rates the model trained with
        rates = {f.name: cfg.dropout for f in dataclasses.fields(config) if f.name in _DROPOUT_FIELDS}
        config = dataclasses.replace(config, **rates)
    model.train()
    return model, config


def learning_rate(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _decay_mask(params):
    """Weight decay on matrices only: LayerNorm scales and biases are not decayed (GPT-2 practice)."""
    import jax

    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(model: GPT2, cfg: OptimizerConfig, total_steps: int) -> nnx.Optimizer:
    return nnx.Optimizer(model, _transform(cfg, total_steps), wrt=nnx.Param)


@functools.lru_cache(maxsize=16)
def _transform(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """One optax object per setting: it is part of the optimizer's graphdef, so equal settings give
    equal graphdefs and runs in one process reuse the compiled step."""
    tx = optax.adamw(
        learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decay_mask
    )
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx

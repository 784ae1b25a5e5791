"""GPT-2 in Flax NNX.

Numerics follow Hugging Face's eager `GPT2LMHeadModel`: pre-LayerNorm blocks, tanh-GELU, tied
`lm_head`, float32 parameters with a configurable compute dtype, and attention probabilities
returned on request (the concentration losses and sparsity metrics need them). Attention itself
runs through `condensa.attention.attend`, so dense, sparse and kernel modes share this module.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.attention import AttentionConfig, attend
from condensa.attention.decode_state import DecodeState
from condensa.errors import ModelInputError
from condensa.model.config import GPT2Config
from condensa.model.kv_cache import KVCache, LayerKV

_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, vocab] float32
    attentions: tuple[jax.Array, ...] | None  # per layer [B, H, Tq, Tk] float32, when requested
    cache: KVCache | None  # the updated cache, when one was passed in


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


class Attention(nnx.Module):
    """Multi-head causal self-attention with HF's fused `c_attn` projection."""

    def __init__(self, config: GPT2Config, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        d = config.n_embd
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        scale = 1.0 / math.sqrt(config.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale
        proj_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2's scaled init of residual projections
        self.c_attn = nnx.Linear(d, 3 * d, dtype=dtype, kernel_init=_normal(0.02), rngs=rngs)
        self.c_proj = nnx.Linear(d, d, dtype=dtype, kernel_init=_normal(proj_std), rngs=rngs)
        self.attn_dropout = nnx.Dropout(config.attn_pdrop, rngs=rngs)
        self.resid_dropout = nnx.Dropout(config.resid_pdrop, rngs=rngs)

    def __call__(self, x, *, visible, attention: AttentionConfig, thresholds, kv=None, need_probs=True, causal=False):
        b, t, d = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (y.reshape(b, t, self.n_head, d // self.n_head) for y in (q, k, v))
        layer_kv, decode_state = kv(k, v) if kv is not None else (None, None)
        k_all, v_all = (layer_kv.k, layer_kv.v) if layer_kv is not None else (k, v)
        dropout = self.attn_dropout if self.attn_dropout.rate > 0 and not self.attn_dropout.deterministic else None
        out, probs = attend(
            q, k_all, v_all,
            visible=visible, scale=self.scale, layer_idx=self.layer_idx,
            config=attention, thresholds=thresholds, probs_dropout=dropout, need_probs=need_probs, causal=causal,
            decode_state=decode_state,
        )
        y = self.resid_dropout(self.c_proj(out.reshape(b, t, d)))
        return y, probs, layer_kv


class MLP(nnx.Module):
    def __init__(self, config: GPT2Config, *, dtype, rngs: nnx.Rngs):
        proj_std = 0.02 / math.sqrt(2 * config.n_layer)
        self.c_fc = nnx.Linear(config.n_embd, config.inner_dim, dtype=dtype, kernel_init=_normal(0.02), rngs=rngs)
        self.c_proj = nnx.Linear(config.inner_dim, config.n_embd, dtype=dtype, kernel_init=_normal(proj_std), rngs=rngs)
        self.act = _ACTIVATIONS[config.activation_function]
        self.dropout = nnx.Dropout(config.resid_pdrop, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        eps = config.layer_norm_epsilon
        self.ln_1 = nnx.LayerNorm(config.n_embd, epsilon=eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(config, layer_idx, dtype=dtype, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(config.n_embd, epsilon=eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, visible, attention, thresholds, kv=None, need_probs=True, causal=False):
        a, probs, new_kv = self.attn(
            self.ln_1(x), visible=visible, attention=attention, thresholds=thresholds, kv=kv,
            need_probs=need_probs, causal=causal,
        )
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, probs, new_kv


class GPT2(nnx.Module):
    """GPT-2 language model. Call it with token ids [B, T]; see `__call__`."""

    def __init__(
        self,
        config: GPT2Config,
        *,
        dtype=jnp.float32,
        attention: AttentionConfig | None = None,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.attention = attention or AttentionConfig()
        self.remat = remat
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, dtype=dtype, embedding_init=_normal(0.02), rngs=rngs)
        self.wpe = nnx.Embed(config.n_positions, config.n_embd, dtype=dtype, embedding_init=_normal(0.01), rngs=rngs)
        self.drop = nnx.Dropout(config.embd_pdrop, rngs=rngs)
        self.h = nnx.List([Block(config, i, dtype=dtype, rngs=rngs) for i in range(config.n_layer)])
        self.ln_f = nnx.LayerNorm(config.n_embd, epsilon=config.layer_norm_epsilon, dtype=dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int | None = None, *, tile_size: int | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` (default n_positions) tokens.
        `tile_size`: keep per-tile key sums for the decode tile gate (its `block_k`)."""
        max_len = max_len or self.config.n_positions
        if max_len > self.config.n_positions:
            raise ModelInputError(
                f"a cache of {max_len} tokens exceeds n_positions={self.config.n_positions}; "
                "generate fewer tokens or use a shorter prompt."
            )
        c = self.config
        return KVCache.empty(
            n_layer=c.n_layer, batch=batch, max_len=max_len, n_head=c.n_head, head_dim=c.head_dim, dtype=self.dtype,
            tile_size=tile_size,
        )

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        return_attention: bool = False,
        attention: AttentionConfig | None = None,
        thresholds=None,
    ) -> ModelOutput:
        """Logits for `input_ids` [B, T].

        attention_mask: [B, T], 1 for real tokens and 0 for padding (left or right). Position ids
        count real tokens only, as in HF. cache: a `KVCache`; the tokens are appended at its
        `index` and the updated cache is returned. attention / thresholds: override the model's
        attention rule for this call.
        """
        check_input_ids(input_ids, self.config, offset=0 if cache is None else cache.index)
        attention = attention or self.attention
        b, t = input_ids.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)

        plain_causal = cache is None and attention_mask is None  # lets fused kernels skip the mask
        if cache is None:
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
            causal = jnp.tril(jnp.ones((t, t), bool))
            visible = causal[None, None] & mask[:, None, None, :]
        else:
            positions = cache.next_position[:, None] + jnp.cumsum(mask, axis=1) - 1
            positions = jnp.maximum(positions, 0)
            key_valid = jax.lax.dynamic_update_slice(cache.key_valid, mask, (0, cache.index))
            slots = jnp.arange(cache.max_len)
            query_slots = cache.index + jnp.arange(t)
            visible = (slots[None, :] <= query_slots[:, None])[None, None] & key_valid[:, None, None, :]
            lengths = jnp.full((b,), cache.index + t, jnp.int32)
            starts = jnp.argmax(key_valid, axis=1).astype(jnp.int32)
            v_count = jnp.maximum(key_valid.sum(axis=1), 1).astype(jnp.float32)[:, None, None]
            tile_count = None if cache.k_tile_sum is None else jnp.maximum(cache.tile_counts(key_valid), 1.0)

            def cache_write(i, k, v):
                layer = cache.layer_update(i, k, v, mask)
                k_tile_mean = None if tile_count is None else layer.k_tile_sum / tile_count[..., None, None]
                return layer, DecodeState(lengths, starts, layer.v_sum / v_count, k_tile_mean)

        x = self.wte(input_ids) + self.wpe(positions)
        x = self.drop(x)
        all_probs, new_layers = [], []
        for i, block in enumerate(self.h):
            kv = None if cache is None else functools.partial(cache_write, i)

            def run_block(block, x, kv=kv):
                return block(x, visible=visible, attention=attention, thresholds=thresholds, kv=kv,
                             need_probs=return_attention, causal=plain_causal)

            # Rematerialise per block so training memory stays O(one block's activations).
            x, probs, layer_kv = (nnx.remat(run_block) if self.remat else run_block)(block, x)
            if return_attention:
                all_probs.append(probs)
            if cache is not None:
                new_layers.append(layer_kv)
        x = self.ln_f(x)
        logits = self.wte.attend(x).astype(jnp.float32)

        new_cache = None
        if cache is not None:
            stacked = LayerKV(*(None if x[0] is None else jnp.stack(x) for x in zip(*new_layers)))
            new_cache = cache.replace(
                k=stacked.k, v=stacked.v, v_sum=stacked.v_sum, k_tile_sum=stacked.k_tile_sum, key_valid=key_valid,
                index=cache.index + t, next_position=cache.next_position + mask.sum(axis=1).astype(jnp.int32),
            )
        return ModelOutput(logits, tuple(all_probs) if return_attention else None, new_cache)


def check_input_ids(input_ids, config: GPT2Config, *, offset=0) -> None:
    """Raises `ModelInputError` for sequences past n_positions and, when the ids are concrete, ids
    outside the vocabulary (under jit, values are unknown; the data pipeline guarantees them)."""
    if input_ids.ndim != 2:
        raise ModelInputError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}.")
    t = input_ids.shape[1]
    if not isinstance(offset, jax.core.Tracer):
        end = t + int(offset)
        if end > config.n_positions:
            raise ModelInputError(
                f"sequence of {end} tokens is longer than n_positions={config.n_positions}; "
                f"split the text into windows of at most {config.n_positions} tokens."
            )
    if not isinstance(input_ids, jax.core.Tracer):
        check_token_range(input_ids, config.vocab_size)


def check_token_range(ids, vocab_size: int) -> None:
    """Raises `ModelInputError` for ids outside [0, vocab_size): an embedding lookup would clamp them silently."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
        raise ModelInputError(
            f"token id {bad} is outside the vocabulary [0, {vocab_size}); use the tokenizer that matches this model."
        )

"""GPT-2 in Flax NNX.

Numerics follow Hugging Face's eager `GPT2LMHeadModel`: pre-LayerNorm blocks, tanh-GELU, tied
`lm_head`, float32 parameters with a configurable compute dtype, and attention probabilities
returned on request (the concentration losses and sparsity metrics need them). Attention itself
runs through `condensa.attention.attend`, so dense, sparse and kernel modes share this module.
The call signature, the KV cache and the layer loop are `CausalLM`'s, shared with the LLaMA family.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from condensa.attention import AttentionConfig

from condensa.model.causal_lm import CausalLM, self_attention
from condensa.model.gpt2.config import GPT2Config
from condensa.model.output_layer import vocab_logits

_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


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

    def projections(self, x):
        """q, k, v [B, T, H, D] from the fused `c_attn`."""
        b, t, d = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        return tuple(y.reshape(b, t, self.n_head, d // self.n_head) for y in (q, k, v))

    def __call__(self, x, *, visible, attention: AttentionConfig, thresholds, kv=None, need_probs=True, causal=False):
        b, t, d = x.shape
        q, k, v = self.projections(x)
        out, probs, layer_kv = self_attention(
            q, k, v, kv=kv, dropout=self.attn_dropout, visible=visible, scale=self.scale, layer_idx=self.layer_idx,
            attention=attention, thresholds=thresholds, need_probs=need_probs, causal=causal,
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

    def attention_projections(self, x):
        """(q, k, v, scale) of this block's attention for the block input x (`CausalLM.walk_layers`)."""
        return (*self.attn.projections(self.ln_1(x)), self.attn.scale)

    def __call__(self, x, *, visible, attention, thresholds, kv=None, need_probs=True, causal=False):
        a, probs, new_kv = self.attn(
            self.ln_1(x), visible=visible, attention=attention, thresholds=thresholds, kv=kv,
            need_probs=need_probs, causal=causal,
        )
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, probs, new_kv


class GPT2(CausalLM):
    """GPT-2 language model. Call it with token ids [B, T]; see `CausalLM.__call__`."""

    def __init__(
        self,
        config: GPT2Config,
        *,
        dtype=jnp.float32,
        attention: AttentionConfig | None = None,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        super().__init__(config, dtype=dtype, attention=attention, remat=remat)
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, dtype=dtype, embedding_init=_normal(0.02), rngs=rngs)
        self.wpe = nnx.Embed(config.n_positions, config.n_embd, dtype=dtype, embedding_init=_normal(0.01), rngs=rngs)
        self.drop = nnx.Dropout(config.embd_pdrop, rngs=rngs)
        self.h = nnx.List([Block(config, i, dtype=dtype, rngs=rngs) for i in range(config.n_layer)])
        self.ln_f = nnx.LayerNorm(config.n_embd, epsilon=config.layer_norm_epsilon, dtype=dtype, rngs=rngs)

    def _embed(self, input_ids, positions):
        return self.drop(self.wte(input_ids) + self.wpe(positions)), ()

    def _blocks(self):
        return self.h

    def _logits(self, x, keep_padding=False):
        # lm_head is tied to wte
        return vocab_logits(self.ln_f(x), self.wte.embedding[...], self.dtype, keep_padding=keep_padding)

"""The LLaMA family (LLaMA, Mistral, Qwen2) in Flax NNX.

Numerics follow Hugging Face's eager `LlamaForCausalLM`: pre-RMSNorm blocks (statistics in
float32), rotary position embeddings on q and k, grouped-query attention, a SwiGLU MLP, tied or
untied `lm_head`, float32 parameters with a configurable compute dtype. Module and parameter names
mirror HF's (`layers.{i}.self_attn.q_proj`, ...) so the weight map is a transpose per matrix.

Attention runs through `condensa.attention.attend` with K and V at their own head count (Hkv), so
every rule (dense, top-k, Top-θ, SDC/VMC, the tile gate) and the Pallas kernels work unchanged; the
kernels index the shared KV head, the reference ops broadcast it. The call signature, the KV cache
(`KVCache` with Hkv heads) and `condensa.generate` are the same as for `GPT2`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from condensa.attention import AttentionConfig
from condensa.model.causal_lm import CausalLM, self_attention
from condensa.model.llama.config import LlamaConfig
from condensa.model.output_layer import vocab_logits
from condensa.model.rope import apply_rope, inverse_frequencies, rope_angles


class RMSNorm(nnx.Module):
    """HF's LlamaRMSNorm: normalise in float32, cast back, then scale (weight starts at 1)."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


def _linear(n_in: int, n_out: int, *, bias: bool, config: LlamaConfig, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)


class LlamaAttention(nnx.Module):
    """Causal self-attention with rotary q/k and Hkv = n_head / G shared key/value heads."""

    def __init__(self, config: LlamaConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, hd
        self.layer_idx = layer_idx
        self.scale = hd**-0.5
        self.q_proj = _linear(d, self.n_head * hd, bias=config.qkv_bias, config=config, dtype=dtype, rngs=rngs)
        self.k_proj = _linear(d, self.n_kv_head * hd, bias=config.qkv_bias, config=config, dtype=dtype, rngs=rngs)
        self.v_proj = _linear(d, self.n_kv_head * hd, bias=config.qkv_bias, config=config, dtype=dtype, rngs=rngs)
        self.o_proj = _linear(self.n_head * hd, d, bias=config.o_bias, config=config, dtype=dtype, rngs=rngs)
        self.attn_dropout = nnx.Dropout(config.attention_dropout, rngs=rngs)

    def projections(self, x, cos, sin):
        """q [B, T, H, D] and k, v [B, T, Hkv, D], q and k rotated to their positions."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_head, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.n_kv_head, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(self, x, cos, sin, *, visible, attention: AttentionConfig, thresholds, kv=None, need_probs=True,
                 causal=False):
        b, t, _ = x.shape
        q, k, v = self.projections(x, cos, sin)
        out, probs, layer_kv = self_attention(
            q, k, v, kv=kv, dropout=self.attn_dropout, visible=visible, scale=self.scale, layer_idx=self.layer_idx,
            attention=attention, thresholds=thresholds, need_probs=need_probs, causal=causal,
        )
        return self.o_proj(out.reshape(b, t, self.n_head * self.head_dim)), probs, layer_kv


class LlamaMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        d, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(d, inner, bias=bias, config=config, dtype=dtype, rngs=rngs)
        self.up_proj = _linear(d, inner, bias=bias, config=config, dtype=dtype, rngs=rngs)
        self.down_proj = _linear(inner, d, bias=bias, config=config, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, layer_idx, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.mlp = LlamaMLP(config, dtype=dtype, rngs=rngs)

    def attention_projections(self, x, cos, sin):
        """(q [B, T, H, D], k and v [B, T, Hkv, D], scale) of this block's attention for the block input
        x, q and k rotated (`CausalLM.walk_layers`)."""
        return (*self.self_attn.projections(self.input_layernorm(x), cos, sin), self.self_attn.scale)

    def __call__(self, x, cos, sin, *, visible, attention, thresholds, kv=None, need_probs=True, causal=False):
        a, probs, new_kv = self.self_attn(
            self.input_layernorm(x), cos, sin, visible=visible, attention=attention, thresholds=thresholds, kv=kv,
            need_probs=need_probs, causal=causal,
        )
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, probs, new_kv


class Llama(CausalLM):
    """A LLaMA-family causal language model. Call it with token ids [B, T], exactly like `GPT2`
    (`CausalLM.__call__`); its KV cache holds the Hkv key/value heads."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype=jnp.float32,
        attention: AttentionConfig | None = None,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        super().__init__(config, dtype=dtype, attention=attention, remat=remat)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                      embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)
        # LLaMA has no embedding dropout (rate 0); the module carries the train/eval switch that
        # perplexity and the train loop read on every model (`model.drop.deterministic`).
        self.drop = nnx.Dropout(0.0, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(config, i, dtype=dtype, rngs=rngs) for i in range(config.n_layer)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.lm_head = None if config.tie_word_embeddings else _linear(
            config.hidden_size, config.vocab_size, bias=False, config=config, dtype=dtype, rngs=rngs)

    def _rope(self, positions):
        return rope_angles(positions, inverse_frequencies(self.config.head_dim, self.config.rope_parameters))

    def _embed(self, input_ids, positions):
        return self.drop(self.embed_tokens(input_ids)), self._rope(positions)  # every layer takes (cos, sin)

    def _blocks(self):
        return self.layers

    def _logits(self, x, keep_padding=False):
        x = self.norm(x)
        if self.lm_head is None:
            return vocab_logits(x, self.embed_tokens.embedding[...], self.dtype, keep_padding=keep_padding)
        return self.lm_head(x)  # untied: never padded

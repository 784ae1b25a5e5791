"""The decoder-only language model that GPT-2 and the LLaMA family both are.

Generation, perplexity, calibration and training call every family the same way: token ids
[B, T], an optional padding mask and KV cache, an attention rule for the call, and a
`ModelOutput` back. `CausalLM` holds that contract once (the constructor's common fields,
`init_cache`, and `__call__` with its layer loop and cache update), so a family writes only what
differs: how tokens become hidden states (`_embed`), its stack of blocks (`_blocks`) and how the
last hidden states become logits (`_logits`). `self_attention` is the part of every attention
layer after its projections, which is the same for both families too.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.attention import AttentionConfig, attend
from condensa.attention.gqa import repeat_kv
from condensa.attention.inputs import AttentionInputs
from condensa.errors import ModelInputError
from condensa.model.causal_inputs import causal_inputs, updated_cache
from condensa.model.kv_cache import KVCache


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, vocab] float32 (see `loss_logits` for the training form)
    # per layer [B, H, Tq, Tk] float32 with return_attention=True; `AttentionInputs` with "inputs"
    attentions: tuple | None
    cache: KVCache | None  # the updated cache, when one was passed in


class CausalLM(nnx.Module):
    """Base of `GPT2` and `Llama`. Subclasses build their modules after `super().__init__` and
    define `_embed`, `_blocks` and `_logits`; their blocks take
    `(x, *block_args, visible=, attention=, thresholds=, kv=, need_probs=, causal=)` and give their
    attention's inputs with `attention_projections(x, *block_args) -> (q, k, v, scale)`."""

    def __init__(self, config, *, dtype, attention: AttentionConfig | None, remat: bool):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.attention = attention or AttentionConfig()
        self.remat = remat

    def _embed(self, input_ids: jax.Array, positions: jax.Array) -> tuple[jax.Array, tuple]:
        """(hidden states [B, T, d] before the first block, extra positional arguments of every block)."""
        raise NotImplementedError

    def _blocks(self):
        """The blocks, in order."""
        raise NotImplementedError

    def _logits(self, x: jax.Array, keep_padding: bool = False) -> jax.Array:
        """Logits [B, T, vocab] from the last block's output (the final norm included); with
        `keep_padding`, over the padded vocabulary if the output layer pads it (see `__call__`)."""
        raise NotImplementedError

    def walk_layers(self, ids: jax.Array, attention: AttentionConfig, thresholds, per_layer) -> list:
        """Calibration's view of the network: for each layer, `per_layer(layer, q, k, v, scale)` on its
        attention projections before the layer runs with `attention`; returns the callbacks' results.
        ids [B, T] without padding. K and V are repeated to every query head (grouped-query
        attention), so per-head statistics need no GQA logic. The model returns probabilities, not
        the scaled logits that calibration needs, hence this second walk through the same blocks."""
        b, t = ids.shape
        visible = jnp.tril(jnp.ones((t, t), bool))[None, None]
        x, block_args = self._embed(ids, jnp.broadcast_to(jnp.arange(t)[None, :], (b, t)))
        results = []
        for layer, block in enumerate(self._blocks()):
            q, k, v, scale = block.attention_projections(x, *block_args)
            h = q.shape[2]
            results.append(per_layer(layer, q, repeat_kv(k, h), repeat_kv(v, h), scale))
            x, _, _ = block(x, *block_args, visible=visible, attention=attention, thresholds=thresholds,
                            need_probs=False, causal=True)
        return results

    def init_cache(self, batch: int, max_len: int | None = None, *, tile_size: int | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` (default n_positions) tokens,
        with the config's `n_kv_head` heads (fewer than n_head under GQA). `tile_size`: keep per-tile
        key sums for the decode tile gate (its `block_k`)."""
        c = self.config
        max_len = max_len or c.n_positions
        if max_len > c.n_positions:
            raise ModelInputError(
                f"a cache of {max_len} tokens exceeds n_positions={c.n_positions}; "
                "generate fewer tokens or use a shorter prompt."
            )
        return KVCache.empty(n_layer=c.n_layer, batch=batch, max_len=max_len, n_head=c.n_kv_head,
                             head_dim=c.head_dim, dtype=self.dtype, tile_size=tile_size)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        return_attention: bool | str = False,
        attention: AttentionConfig | None = None,
        thresholds=None,
        loss_logits: bool = False,
        prompt: bool = False,
        last_logits_only: bool = False,
        left_padded: bool = False,
    ) -> ModelOutput:
        """Logits for `input_ids` [B, T].

        attention_mask: [B, T], 1 for real tokens and 0 for padding (left or right). Position ids
        count real tokens only, as in HF. cache: a `KVCache`; the tokens are appended at its
        `index` and the updated cache is returned. return_attention: also return each layer's
        attention probabilities, per query head [B, H, Tq, Tk]; or, with "inputs", each layer's
        `AttentionInputs` (q and k), leaving attention itself on its fused path (for losses that
        recompute what they need in a kernel). attention / thresholds: override the model's
        attention rule for this call. loss_logits: logits shaped for a training loss, which saves
        two passes over the largest array of a training step: they may come over the vocabulary
        padded to a multiple of 128 (`condensa.model.output_layer`; the extra columns at −1e9),
        and stay in the compute dtype (`condensa.train.cross_entropy` upcasts as it reads them).
        prompt: `cache` is empty (a new prompt): attention reads only the new tokens, on the fused
        prefill paths, while they are written into the cache. last_logits_only: logits [B, 1, V] of
        the last position alone (what generation reads; [B, T, V] in float32 is the largest array of
        a long prompt, and XLA does not cut the output layer down to the slice taken from it).
        left_padded: with `prompt`, a promise that every zero of `attention_mask` leads its row; the
        fused prefill paths then run padded prompts too (`causal_inputs`). Rules with the tile gate
        keep the masked reference op: the gate's tiles would move with the tokens.
        """
        check_input_ids(input_ids, self.config, offset=0 if cache is None else cache.index)
        if prompt and (cache is None or (not isinstance(cache.index, jax.core.Tracer) and int(cache.index) != 0)):
            raise ModelInputError("prompt=True fills an empty KV cache; pass cache=model.init_cache(...) that "
                                  "holds no tokens yet, or leave prompt=False to append to a filled one.")
        if isinstance(return_attention, str) and return_attention != "inputs":
            raise ModelInputError(f"return_attention is True, False or 'inputs'; got {return_attention!r}.")
        attention = attention or self.attention
        front = left_padded and not attention.tile_gate
        inputs = causal_inputs(input_ids, attention_mask, cache, prompt=prompt, left_padded=front)
        x, block_args = self._embed(input_ids if inputs.to_front is None else inputs.to_front(input_ids),
                                    inputs.positions)
        all_probs, new_layers = [], []
        for i, block in enumerate(self._blocks()):
            kv = None if cache is None else functools.partial(inputs.cache_write, i)

            def run_block(block, x, kv=kv):
                return block(x, *block_args, visible=inputs.visible, attention=attention, thresholds=thresholds,
                             kv=kv, need_probs=return_attention, causal=inputs.plain_causal)

            # Rematerialise per block so training memory stays O(one block's activations).
            x, probs, layer_kv = (nnx.remat(run_block) if self.remat else run_block)(block, x)
            if return_attention:
                all_probs.append(probs)
            if cache is not None:
                new_layers.append(layer_kv)
        if inputs.to_back is not None:
            x = inputs.to_back(x)
        logits = self._logits(x[:, -1:] if last_logits_only else x, loss_logits)
        if not loss_logits:
            logits = logits.astype(jnp.float32)
        new_cache = None if cache is None else updated_cache(cache, new_layers, inputs)
        return ModelOutput(logits, tuple(all_probs) if return_attention else None, new_cache)


def self_attention(q, k, v, *, kv, dropout: nnx.Dropout, visible, scale: float, layer_idx: int,
                   attention: AttentionConfig, thresholds, need_probs: bool | str, causal: bool):
    """One layer's attention from its projections q [B, T, H, D] and k, v [B, T, Hkv, D].

    `need_probs`: True (return the probabilities), False (nothing), or "inputs" (return the layer's
    `AttentionInputs` and let attention run as if no probabilities were needed).
    `kv` is the layer's cache writer (`CausalInputs.cache_write` bound to the layer) or None without
    a cache: it stores k and v and returns the layer's cache, the `DecodeState` that decode kernels
    read, and the K/V attention reads (the whole cache, or only the new tokens' for a prompt). `dropout` reaches `attend` only when it would drop something (training, rate > 0),
    because any probability dropout rules out the fused kernels. Returns
    (out [B, T, H, D], probs or None, the layer's new `LayerKV` or None).
    """
    layer_kv, decode_state, (k_all, v_all) = kv(k, v) if kv is not None else (None, None, (k, v))
    probs_dropout = dropout if dropout.rate > 0 and not dropout.deterministic else None
    out, probs = attend(
        q, k_all, v_all,
        visible=visible, scale=scale, layer_idx=layer_idx,
        config=attention, thresholds=thresholds, probs_dropout=probs_dropout, need_probs=need_probs != "inputs" and bool(need_probs),
        causal=causal, decode_state=decode_state,
    )
    if need_probs == "inputs":
        return out, AttentionInputs(q, repeat_kv(k_all, q.shape[2]), scale), layer_kv
    return out, probs, layer_kv


def check_input_ids(input_ids, config, *, offset=0) -> None:
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

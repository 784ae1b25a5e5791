"""Greedy and sampled generation, compiled once per (batch, prompt length, new tokens).

The decode loop is a `lax.scan` over a fixed-size KV cache, so no step recompiles. A
full-recompute path (`use_cache=False`) re-runs the whole prefix each step; it exists to check
the cache, and for attention rules whose decode differs from prefill.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.attention.pallas_backend import decode_cache_alignment
from condensa.errors import ConfigError, ModelInputError
from condensa.model.causal_lm import check_input_ids
from condensa.model.gpt2.network import GPT2


def _filter_logits(logits: jax.Array, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    logits = logits / temperature
    neg = jnp.finfo(logits.dtype).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def _choose(logits, rng, sampling):
    do_sample, temperature, top_k, top_p = sampling
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, _filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


def _cache_length(total: int, attention, n_positions: int) -> int:
    """Slots of the KV cache: `total`, rounded up (within n_positions) to a whole number of the
    decode kernel's tiles under the Pallas backend, since the kernel pads, so copies, a cache of
    any other size at every step. The extra slots stay invalid."""
    if attention.backend != "pallas":
        return total
    align = decode_cache_alignment(attention)
    return min(-(-total // align) * align, n_positions)


def _prompt(call, cache, ids, mask, chunk: int, left_padded: bool):
    """The model's output after writing the prompt into the empty `cache`, `chunk` tokens per call.
    The first call reads only its own tokens, on the fused prefill paths (a left-padded one too);
    each later one attends to the cache so far, so memory grows with chunk × prompt length, not
    prompt length squared."""
    out = None
    for start in range(0, ids.shape[1], chunk):
        piece = slice(start, start + chunk)
        out = call(ids[:, piece], attention_mask=None if mask is None else mask[:, piece],
                   cache=cache if out is None else out.cache, prompt=out is None, last_logits_only=True,
                   left_padded=left_padded)
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "eos", "use_cache", "attention",
                                             "padded", "left_padded", "prefill_chunk"))
def _generate(graphdef, state, ids, mask, rng, thresholds, *, max_new_tokens, sampling, eos, use_cache, attention,
              padded, left_padded, prefill_chunk):
    model = nnx.merge(graphdef, state)
    model.eval()
    b, p = ids.shape
    total = p + max_new_tokens
    call = functools.partial(model, attention=attention, thresholds=thresholds)

    def finish(token, done):
        token = jnp.where(done, eos if eos is not None else token, token)
        return token, (done | (token == eos)) if eos is not None else done

    if use_cache:
        tile_size = attention.block_k if attention.tile_gate else None  # the decode gate scores tile-mean keys
        cache = model.init_cache(b, _cache_length(total, attention, model.config.n_positions), tile_size=tile_size)
        out = _prompt(call, cache, ids, mask if padded else None, prefill_chunk or p, left_padded)
        first = _choose(out.logits[:, -1], jax.random.fold_in(rng, 0), sampling)
        first, done = finish(first, jnp.zeros((b,), bool))

        def step(carry, i):
            token, cache, done = carry
            out = call(token[:, None], cache=cache)
            nxt, done = finish(_choose(out.logits[:, -1], jax.random.fold_in(rng, i), sampling), done)
            return (nxt, out.cache, done), token

        (last, _, _), tokens = jax.lax.scan(step, (first, out.cache, done), jnp.arange(1, max_new_tokens))
        new = jnp.concatenate([tokens.T, last[:, None]], axis=1)
        return jnp.concatenate([ids, new], axis=1)

    buffer = jnp.concatenate([ids, jnp.zeros((b, max_new_tokens), ids.dtype)], axis=1)
    buffer_mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), mask.dtype)], axis=1)

    def step(carry, i):
        buffer, buffer_mask, done = carry
        logits = call(buffer, attention_mask=buffer_mask).logits[:, p + i - 1]
        token, done = finish(_choose(logits, jax.random.fold_in(rng, i), sampling), done)
        buffer = jax.lax.dynamic_update_slice(buffer, token[:, None], (0, p + i))
        buffer_mask = jax.lax.dynamic_update_slice(buffer_mask, jnp.ones((b, 1), mask.dtype), (0, p + i))
        return (buffer, buffer_mask, done), None

    (buffer, _, _), _ = jax.lax.scan(step, (buffer, buffer_mask, jnp.zeros((b,), bool)), jnp.arange(max_new_tokens))
    return buffer


def generate(
    model: GPT2,
    input_ids,
    max_new_tokens: int,
    *,
    attention_mask=None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    attention=None,
    thresholds=None,
    prefill_chunk: int | None = None,
) -> np.ndarray:
    """Returns [B, P + max_new_tokens] token ids: the prompt followed by the generated tokens.

    Batched prompts of different lengths must be left-padded, with `attention_mask` marking the
    real tokens (as with HF). After a sequence emits `eos_token_id` it keeps emitting it.
    `prefill_chunk`: write the prompt into the cache this many tokens per call (default: all at once).
    """
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim == 1:
        ids = ids[None]
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1; got {max_new_tokens}.")
    if do_sample and temperature <= 0:
        raise ConfigError(f"temperature must be > 0 when sampling; got {temperature}. Use do_sample=False for greedy.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1]; got {top_p}.")
    check_input_ids(ids, model.config)
    total = ids.shape[1] + max_new_tokens
    if total > model.config.n_positions:
        raise ModelInputError(
            f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"n_positions={model.config.n_positions}; shorten the prompt or generate fewer tokens."
        )
    rule = attention or model.attention
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ConfigError(f"prefill_chunk must be at least 1 token; got {prefill_chunk}.")
    if prefill_chunk is not None and prefill_chunk < ids.shape[1] and rule.tile_gate:
        raise ConfigError("prefill_chunk with the tile gate is not supported yet: the prefill gate places a chunk's "
                          "queries from slot 0. Leave prefill_chunk unset (the whole prompt in one call).")
    host_mask = None if attention_mask is None or isinstance(attention_mask, jax.core.Tracer) else (
        np.asarray(attention_mask, np.int32).reshape(ids.shape))
    if host_mask is not None and bool(np.all(host_mask == 1)):
        attention_mask = None  # no padding: the prompt can take the fused paths
    # left padding (every row's zeros lead it) lets a padded prompt take the fused paths too
    left_padded = attention_mask is not None and host_mask is not None and bool(np.all(np.diff(host_mask, axis=1) >= 0))
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    graphdef, state = nnx.split(model)
    sampling = (bool(do_sample), float(temperature), top_k, top_p)
    out = _generate(
        graphdef, state, ids, mask, jax.random.key(seed), thresholds,
        max_new_tokens=int(max_new_tokens), sampling=sampling, eos=eos_token_id,
        use_cache=use_cache, attention=rule, padded=attention_mask is not None, left_padded=left_padded,
        prefill_chunk=None if prefill_chunk is None else int(prefill_chunk),
    )
    return np.asarray(out)

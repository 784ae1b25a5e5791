"""Greedy decoding that records what a sparse rule keeps at every step: the fraction of V rows
each step needs (`condensa.sparsity.metrics.v_rows_fraction`, the V traffic a decode kernel must
load), and how the tokens compare with dense greedy decoding."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.attention import AttentionConfig
from condensa.errors import ConfigError, ModelInputError
from condensa.sparsity.metrics import v_rows_fraction


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "attention"))
def _decode(graphdef, state, prompt, thresholds, *, steps, attention):
    """Greedy decoding that also returns each step's V-row fraction per layer and head.

    `condensa.model.generate` is the product path and returns only tokens; this loop is the same
    prefill + `lax.scan` over the cache, with `return_attention=True` on every step.
    """
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    call = functools.partial(model, attention=attention, thresholds=thresholds)
    out = call(prompt, cache=model.init_cache(b, p + steps), prompt=True, last_logits_only=True)
    first = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
    slots = jnp.arange(p + steps)

    def step(carry, _):
        token, cache = carry
        out = call(token[:, None], cache=cache, return_attention=True)
        visible = out.cache.key_valid[:, None, None, :] & (slots <= cache.index)[None, None, None, :]
        # [L, Hkv]: with GQA, a KV group needs the union of the rows its query heads keep
        v_rows = jnp.stack([v_rows_fraction(probs, visible, model.config.n_kv_head) for probs in out.attentions])
        nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
        return (nxt, out.cache), (token, v_rows)

    _, (tokens, v_rows) = jax.lax.scan(step, (first, out.cache), None, length=steps)
    return tokens.T, v_rows


def decode_trace(model, prompt, steps: int, attention: AttentionConfig, thresholds) -> dict[str, np.ndarray]:
    """Greedy decoding of `steps` tokens after `prompt` [B, P]: `tokens` [B, steps] and `v_rows`
    [steps, L, Hkv], the fraction of the visible V rows each step needs (row length P + step + 1;
    per KV head, so with grouped-query attention the union over each group's query heads)."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if steps < 1:
        raise ConfigError(f"the number of new tokens must be at least 1; got {steps}.")
    if prompt.shape[1] + steps > model.config.n_positions:
        raise ModelInputError(f"prompt ({prompt.shape[1]} tokens) + {steps} new tokens exceeds n_positions="
                              f"{model.config.n_positions}; shorten the prompt or generate fewer tokens.")
    model.eval()
    graphdef, state = nnx.split(model)
    tokens, v_rows = _decode(graphdef, state, prompt, thresholds, steps=int(steps), attention=attention)
    return {"tokens": np.asarray(tokens), "v_rows": np.asarray(v_rows, np.float64)}


def generation_report(dense: dict, sparse: dict, prompt_len: int) -> dict:
    """Per-step V-row fractions and the token agreement of the sparse run with dense greedy decoding."""
    v_rows = sparse["v_rows"]  # [steps, L, H]
    same = dense["tokens"] == sparse["tokens"]  # [B, steps]
    diverged = ~np.cumprod(same, axis=1).astype(bool)
    first = np.where(diverged.any(axis=1), diverged.argmax(axis=1), same.shape[1])
    return {
        "steps": [{"step": i, "row_length": prompt_len + i + 1, "v_rows_fraction": float(np.nanmean(v_rows[i])),
                   "per_layer": np.nanmean(v_rows[i], axis=-1).tolist()} for i in range(v_rows.shape[0])],
        "v_rows_fraction": float(np.nanmean(v_rows)),
        "token_agreement": float(same.mean()),
        "first_divergence": first.tolist(),  # per prompt: the first step whose token differs (steps if none)
        "prompt_tokens": int(prompt_len), "new_tokens": int(same.shape[1]), "prompts": int(same.shape[0]),
    }

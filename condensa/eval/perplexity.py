"""Strided sliding-window perplexity, the Hugging Face protocol (docs: "Perplexity of fixed-length models").

The text is tokenized once. Windows are at most `max_length` tokens long and start every `stride`
tokens; each window scores only the tokens that the previous window did not reach
(`end - prev_end`), so every token is scored once, with as much left context as the window allows.
Windows are padded on the right to one shape and run in batches under one compiled function.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.errors import ConfigError, DataError
from condensa.model.causal_lm import check_token_range


@dataclasses.dataclass(frozen=True)
class Window:
    begin: int  # first token of the window in the stream
    end: int  # one past its last token
    score_from: int  # first position inside the window whose token is scored (its target)


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The windows of the HF protocol. A position t inside a window is scored (predicted from t-1)
    when `t >= score_from`; position 0 has no context and is never scored."""
    if stride <= 0:
        raise ConfigError(f"--stride must be a positive number of tokens; got {stride}.")
    if stride > max_length:
        raise ConfigError(f"--stride {stride} is larger than the window ({max_length}); tokens would be skipped.")
    if n_tokens < 2:
        raise DataError(f"the text has {n_tokens} token(s); perplexity needs at least 2.")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        target_len = end - prev_end
        windows.append(Window(begin, end, max(1, (end - begin) - target_len)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def _window_nll(graphdef, state, ids, score_mask, thresholds, *, attention):
    """Summed negative log-likelihood of the scored targets of each window, and their count."""
    model = nnx.merge(graphdef, state)
    logits = model(ids, attention=attention, thresholds=thresholds).logits[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    mask = score_mask[:, 1:]
    return -jnp.sum(jnp.where(mask, target_logp, 0.0), axis=1), jnp.sum(mask, axis=1)


def perplexity(
    model,
    token_ids: np.ndarray,
    *,
    stride: int | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    attention=None,
    thresholds=None,
    progress=None,
) -> dict:
    """Perplexity of `token_ids` (1-D) under `model` with the HF sliding-window protocol.

    Returns `{"ppl", "nll", "tokens", "windows"}`; `nll` is the mean negative log-likelihood per
    scored token. `attention` / `thresholds` select the attention rule (dense by default).
    """
    max_length = max_length or model.config.n_positions
    if max_length > model.config.n_positions:
        raise ConfigError(f"max_length {max_length} exceeds the model's n_positions={model.config.n_positions}.")
    stride = max_length if stride is None else stride
    token_ids = np.asarray(token_ids, np.int32).reshape(-1)
    windows = sliding_windows(token_ids.size, max_length, stride)
    check_token_range(token_ids, model.config.vocab_size)
    length = max(w.end - w.begin for w in windows)

    was_training = not getattr(model.drop, "deterministic", True)
    model.eval()
    graphdef, state = nnx.split(model)
    attention = attention or model.attention
    total_nll, total_tokens = 0.0, 0
    bar = progress(total=len(windows), desc="perplexity", unit="window") if progress else None
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        ids = np.zeros((batch_size, length), np.int32)
        score = np.zeros((batch_size, length), bool)
        for row, w in enumerate(chunk):
            n = w.end - w.begin
            ids[row, :n] = token_ids[w.begin : w.end]
            score[row, w.score_from : n] = True
        nll, count = _window_nll(graphdef, state, jnp.asarray(ids), jnp.asarray(score), thresholds, attention=attention)
        total_nll += float(np.asarray(nll, np.float64).sum())
        total_tokens += int(np.asarray(count).sum())
        if bar is not None:
            bar.update(len(chunk))
            bar.set_postfix(ppl=f"{math.exp(total_nll / max(total_tokens, 1)):.3f}")
    if bar is not None:
        bar.close()
    if was_training:
        model.train()
    mean_nll = total_nll / total_tokens
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": total_tokens, "windows": len(windows)}

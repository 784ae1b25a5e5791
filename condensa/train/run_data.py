"""A training run's data: its tokenizer and its token stream packed into train and validation
blocks, with the data-source fallback of `DataConfig` (one config for a checkout beside
../shared/data and for a machine with the HF cache)."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path

import numpy as np

from condensa.data import compact_vocabulary, is_local_source, load_token_stream, load_tokenizer, pack_blocks, split_blocks
from condensa.train.config import TrainConfig


@dataclasses.dataclass
class Data:
    tokenizer: object
    train: np.ndarray  # [N, seq_len + 1]
    validation: np.ndarray
    vocab_size: int
    kept_ids: np.ndarray | None = None  # with data.vocab_limit: the tokenizer id of each model id


def _with_fallback(value: str, fallback: str | None, what: str) -> str:
    if fallback is None or not is_local_source(value) or Path(value).expanduser().exists():
        return value
    warnings.warn(f"{what} {value} does not exist; using data.fallback_{what} {fallback!r} instead.", stacklevel=3)
    return fallback


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str):
    """Loading a tokenizer takes seconds; runs started from one process (sweeps, tests) share it."""
    return load_tokenizer(name)


def load_run_tokenizer(cfg: TrainConfig):
    """The run's tokenizer (data.tokenizer, or data.fallback_tokenizer when that path is missing)."""
    return _tokenizer(_with_fallback(cfg.data.tokenizer, cfg.data.fallback_tokenizer, "tokenizer"))


def load_data(cfg: TrainConfig) -> Data:
    tokenizer = load_run_tokenizer(cfg)
    stream = load_token_stream(
        _with_fallback(cfg.data.source, cfg.data.fallback_source, "source"), tokenizer, cache_dir=cfg.data.cache_dir, split=cfg.data.split, text_field=cfg.data.text_field
    )
    kept, vocab_size = None, len(tokenizer)
    if cfg.data.vocab_limit is not None:
        stream, kept = compact_vocabulary(stream, cfg.data.vocab_limit, tokenizer.eos_token_id)
        vocab_size = cfg.data.vocab_limit
    train, validation = split_blocks(pack_blocks(stream, cfg.data.seq_len + 1), cfg.data.validation_fraction)
    return Data(tokenizer, train, validation, vocab_size, kept)

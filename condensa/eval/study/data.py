"""The study's text: corpus training blocks (calibration), held-out corpus text and WikiText-2 (evaluation).

Both held-out sets come from the pretraining run's own split, so no study stage ever trains or
calibrates on the text it is evaluated on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from condensa.errors import DataError
from condensa.eval.study.config import BASE, StudyConfig
from condensa.eval.text import read_eval_text
from condensa.train.run_data import load_data


_CACHE: dict[tuple, object] = {}


def _cached(key: tuple, compute):
    """Per-process memo: every stage and model reads the same text, and tokenizing it takes seconds."""
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


def _split(config: StudyConfig):
    """The pretraining run's data."""
    train_config = config.train_config(BASE)
    return _cached(("split", repr(train_config.data)), lambda: load_data(train_config))


def tokenizer(config: StudyConfig):
    return _split(config).tokenizer


def calibration_blocks(config: StudyConfig) -> np.ndarray:
    """`calibration.samples` training blocks [N, seq_len], a seeded choice (never held-out text)."""
    train = _split(config).train
    rng = np.random.default_rng(config.calibration.seed)
    pick = rng.choice(len(train), size=min(config.calibration.samples, len(train)), replace=False)
    return np.asarray(train[np.sort(pick), :-1], np.int32)


def held_out(config: StudyConfig) -> dict[str, np.ndarray]:
    """{"corpus": the validation split's tokens, "wikitext": WikiText-2 test}, each at most
    `evaluation.max_tokens` tokens (1-D)."""
    key = ("held_out", repr(config.train_config(BASE).data), config.evaluation.wikitext, config.evaluation.max_tokens)
    return _cached(key, lambda: _read_held_out(config))


def _read_held_out(config: StudyConfig) -> dict[str, np.ndarray]:
    limit = config.evaluation.max_tokens
    corpus = np.asarray(_split(config).validation, np.int32)[:, :-1].reshape(-1)[:limit]
    path = Path(config.evaluation.wikitext).expanduser()
    if not path.is_file():
        raise DataError(f"the WikiText-2 test file {path} does not exist; set evaluation.wikitext to "
                        "wiki.test.raw (../shared/data/wikitext-2-raw/wiki.test.raw in this project).")

    text = read_eval_text([str(path)], "test")
    ids = tokenizer(config)(text[: 8 * limit], verbose=False)["input_ids"][:limit]
    return {"corpus": corpus, "wikitext": np.asarray(ids, np.int32)}

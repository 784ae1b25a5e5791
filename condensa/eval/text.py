"""The evaluation text and the model's view of it: reading text sources, the model's tokenizer,
and `ModelText`, which maps text to the ids of a model trained with a reduced vocabulary."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from condensa.data import is_local_source, model_tokenizer, read_documents, read_hf_dataset
from condensa.errors import ConfigError, DataError


def read_eval_text(sources: list[str], split: str) -> str:
    """The evaluation text as one string; documents joined by blank lines, as HF's recipe does."""
    if not sources:
        raise ConfigError("no evaluation text given; pass --data FILE (or a folder, or an HF dataset name[:config]).")
    parts = []
    for source in sources:
        parts.extend(read_documents(source) if is_local_source(source) else read_hf_dataset(source, split=split))
    text = "\n\n".join(parts)
    if not text.strip():
        raise DataError(f"{', '.join(sources)} holds no text to evaluate.")
    return text


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str, explicit: str | None):
    """Loading a tokenizer takes seconds; commands run from one process (tests, notebooks) share it."""
    return model_tokenizer(model_dir, explicit)


@dataclasses.dataclass
class ModelText:
    """Text <-> the model's token ids. A model trained with `data.vocab_limit` uses its own ids
    (its `vocab_map.json` maps them to tokenizer ids); tokens it dropped become its shared id."""

    tokenizer: Any
    tokenizer_id_of: np.ndarray | None = None  # model id -> tokenizer id
    other_id: int | None = None

    @classmethod
    def for_model(cls, model_dir: str, tokenizer: str | None) -> "ModelText":
        vocab_map = Path(model_dir) / "vocab_map.json"
        if vocab_map.is_file():
            if not tokenizer:
                raise ConfigError(f"{model_dir} uses a reduced vocabulary (vocab_map.json) and holds no tokenizer; "
                                  "pass --tokenizer DIR, the one it was trained with (e.g. ../shared/data/gpt2-tokenizer).")
            spec = json.loads(vocab_map.read_text())
            return cls(_tokenizer(str(model_dir), tokenizer), np.asarray(spec["tokenizer_id_of_model_id"], np.int64),
                       int(spec["other_tokens_id"]))
        return cls(_tokenizer(str(model_dir), tokenizer))

    def to_model_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if self.tokenizer_id_of is None:
            return ids.astype(np.int32)
        lookup = np.full(max(len(self.tokenizer), int(ids.max(initial=0)) + 1), self.other_id, np.int32)
        lookup[self.tokenizer_id_of] = np.arange(self.tokenizer_id_of.size, dtype=np.int32)
        return lookup[ids]

    def encode(self, text: str, max_tokens: int | None = None) -> np.ndarray:
        """Model ids of `text`; with `max_tokens`, only as much text as those need is tokenized
        (quick runs on a slice of a long file should not pay for all of it)."""
        if max_tokens:
            chars = 8 * max_tokens
            while chars < len(text):
                ids = self.tokenizer(text[:chars], verbose=False)["input_ids"]
                if len(ids) > max_tokens + 1:  # the last token may be cut mid-word: drop it
                    return self.to_model_ids(ids[:max_tokens])
                chars *= 2
        ids = self.tokenizer(text, verbose=False)["input_ids"]
        return self.to_model_ids(ids[:max_tokens] if max_tokens else ids)

    def decode(self, model_ids) -> str:
        ids = np.asarray(model_ids, np.int64)
        if self.tokenizer_id_of is not None:
            known = ids < self.tokenizer_id_of.size
            ids = np.where(known, self.tokenizer_id_of[np.minimum(ids, self.tokenizer_id_of.size - 1)], -1)
            return "".join(self.tokenizer.decode([int(i)]) if i >= 0 else "\N{REPLACEMENT CHARACTER}" for i in ids)
        return self.tokenizer.decode([int(i) for i in ids])

"""Tokenizer loading and text -> token ids.

Text sources are files, folders of `.txt` files, or Hugging Face datasets; documents are joined
with EOS so the model sees document boundaries, then packed into fixed-length blocks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from condensa.errors import DataError, HubUnavailableError
from condensa.hub import is_probably_hub_id


def load_tokenizer(name_or_path: str | os.PathLike):
    """A fast (Rust) GPT-2 tokenizer from a directory with vocab.json + merges.txt (or
    tokenizer.json), or from a hub id when the network allows it."""
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(path), use_fast=True)
        except (OSError, ValueError) as err:
            raise DataError(
                f"could not load a tokenizer from {path} ({err}); the directory needs vocab.json and "
                "merges.txt, or tokenizer.json."
            ) from None
    if not is_probably_hub_id(str(name_or_path)):
        raise DataError(f"tokenizer directory {path} does not exist; pass an existing directory or a hub id.")
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), use_fast=True)
    except OSError as err:
        raise HubUnavailableError(
            f"could not fetch tokenizer {name_or_path!r} from the Hugging Face hub ({type(err).__name__}). "
            "Without network access, pass a local directory instead, e.g. ../shared/data/gpt2-tokenizer."
        ) from None


def text_files(source: str | os.PathLike) -> list[Path]:
    """The text files a source names: the file itself, or every `*.txt` under a folder, sorted."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"folder {path} holds no .txt files; point at a text file or a folder of them.")
        return files
    raise DataError(f"text source {path} does not exist; pass a text file or a folder of .txt files.")


def read_documents(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The non-empty documents (one per file) of one or several sources."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    docs = []
    for source in sources:
        for f in text_files(source):
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                docs.append(text)
    if not docs:
        raise DataError(f"no text found in {', '.join(map(str, sources))}: the files are empty.")
    return docs


def tokenize_documents(documents: Iterable[str], tokenizer) -> np.ndarray:
    """One int32 stream of token ids, documents separated by EOS."""
    eos = tokenizer.eos_token_id
    parts = []
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        parts.append(np.asarray(ids, np.int32))
        parts.append(np.asarray([eos], np.int32))
    stream = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    if stream.size <= 1:
        raise DataError("the text tokenized to nothing; give a source with real text.")
    return stream


def pack_blocks(stream: np.ndarray, block_len: int) -> np.ndarray:
    """Non-overlapping [N, block_len] blocks of the stream; the tail that does not fill a block is dropped."""
    n = stream.size // block_len
    if n == 0:
        raise DataError(
            f"the text has {stream.size} tokens, fewer than one block of {block_len}; "
            "use more text or a shorter sequence length."
        )
    return stream[: n * block_len].reshape(n, block_len)

"""Tokenizer loading and text -> token ids.

Text sources are files, folders of `.txt` files, or Hugging Face datasets; documents are joined
with EOS so the model sees document boundaries, then packed into fixed-length blocks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from condensa.errors import ConfigError, DataError, HubUnavailableError
from condensa.hub import is_probably_hub_id, require_hub
from condensa.model.gguf_file import open_gguf
from condensa.model.gguf_tokenizer import gguf_tokenizer
from condensa.model.sources import NAMED_MODELS, resolve_model


def load_tokenizer(name_or_path: str | os.PathLike):
    """A fast (Rust) tokenizer from a directory with tokenizer.json (or GPT-2's vocab.json +
    merges.txt), from a `.gguf` file or a named model such as `smollm2-135m` (rebuilt from the GGUF's
    metadata), or from a hub id when the network allows it."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    path = Path(name_or_path).expanduser()
    if str(name_or_path) in NAMED_MODELS or (path.is_file() and path.suffix.lower() == ".gguf") or (
            path.is_dir() and not _has_tokenizer_files(path) and any(path.glob("*.gguf"))):
        return _gguf_tokenizer(name_or_path)
    if path.is_dir():
        # A bare vocab.json + merges.txt (no tokenizer_config.json) does not say which class to use.
        loader = AutoTokenizer if (path / "tokenizer_config.json").is_file() else GPT2TokenizerFast
        try:
            return loader.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise DataError(
                f"could not load a tokenizer from {path} ({err}); the directory needs vocab.json and "
                "merges.txt, or tokenizer.json."
            ) from None
    if not is_probably_hub_id(str(name_or_path)):
        raise DataError(f"tokenizer {path} does not exist; pass an existing directory, a .gguf file or a hub id.")
    require_hub(str(name_or_path), "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), use_fast=True)
    except OSError as err:
        raise HubUnavailableError(
            f"could not fetch tokenizer {name_or_path!r} from the Hugging Face hub ({type(err).__name__}). "
            "Without network access, pass a local directory instead, e.g. ../shared/data/gpt2-tokenizer."
        ) from None


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / f).is_file() for f in _TOKENIZER_FILES)


def _gguf_tokenizer(name_or_path: str | os.PathLike):
    return _tokenizer_of(open_gguf(resolve_model(name_or_path, allow_patterns=[]).path))


@functools.lru_cache(maxsize=4)
def _tokenizer_of(gguf_file):
    """Rebuilding a real model's tokenizer takes seconds; one per (cached, unchanged) GGUF file."""
    return gguf_tokenizer(gguf_file)


def model_tokenizer(model: str | os.PathLike, explicit: str | os.PathLike | None = None):
    """The tokenizer for `--model` (`explicit`, the `--tokenizer` option, wins): the one a GGUF file
    carries, or the one saved in the model directory (or hub snapshot)."""
    if explicit:
        return load_tokenizer(explicit)
    source = resolve_model(model, allow_patterns=["*.json", "*.txt"])
    if source.is_gguf:
        return _gguf_tokenizer(source.path)
    if not _has_tokenizer_files(source.path):
        raise ConfigError(f"model directory {source.path} holds no tokenizer; pass --tokenizer DIR "
                          "(for GPT-2 vocabularies: ../shared/data/gpt2-tokenizer).")
    return load_tokenizer(source.path)


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


MAX_UNDECODABLE_FRACTION = 0.001  # a stray bad byte or two in a book is fine; binary data is not


def read_text_file(path: Path) -> str:
    """A UTF-8 text file, with the odd undecodable byte replaced; refused when more than a small
    fraction of it is not UTF-8 (a binary file, or another encoding), which would otherwise train
    or evaluate on noise without a word."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if raw and bad > MAX_UNDECODABLE_FRACTION * max(len(text), 1):
        raise DataError(f"{path} is not UTF-8 text ({bad} of its {len(text)} characters cannot be decoded); "
                        "convert it to UTF-8 (for example with iconv) or leave it out.")
    # universal newlines, as Path.read_text gives: every earlier measurement tokenised text read that way
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_documents(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The non-empty documents (one per file) of one or several sources."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    docs = []
    for source in sources:
        for f in text_files(source):
            text = read_text_file(f)
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
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
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


# ---- sources: local text or Hugging Face datasets --------------------------------------------------


def is_local_source(source: str) -> bool:
    """A source that names a file or folder on disk (as opposed to an HF dataset `name[:config]`)."""
    path = Path(source).expanduser()
    return path.exists() or "/" in source or source.startswith((".", "~")) or source.endswith(".txt")


def read_hf_dataset(source: str, *, split: str = "train", text_field: str = "text") -> list[str]:
    """The non-empty `text_field` values of an HF dataset `name[:config]`, from the local cache only.

    Offline first, because training runs usually start where there is no network; a dataset that
    is not cached yet is one `datasets.load_dataset(...)` away, which the error says.
    """
    name, _, config = source.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source!r} names a Hugging Face dataset, which needs `pip install datasets`.") from None
    # datasets and huggingface_hub read their offline switches at import time, so flip the parsed
    # flags (not the env vars); without both, a cache miss retries the network for ~30 s.
    import huggingface_hub.constants as hub

    previous = datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_DATASETS_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ... offline
        raise DataError(
            f"Hugging Face dataset {source!r} (split {split!r}) is not in the local cache ({type(err).__name__}). "
            f"Download it once with network access: python -c \"import datasets; "
            f"datasets.load_dataset({name!r}, {config or None!r})\", or pass a local text file or folder."
        ) from None
    finally:
        datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE = previous
    if text_field not in ds.column_names:
        raise DataError(
            f"dataset {source!r} has no column {text_field!r}; its columns are {', '.join(ds.column_names)}. "
            "Set data.text_field."
        )
    docs = [t for t in ds[text_field] if t and t.strip()]
    if not docs:
        raise DataError(f"dataset {source!r} (split {split!r}) holds no text.")
    # wikitext keeps one line per row; joining rows keeps paragraphs of one article together.
    return ["".join(docs)]


def _source_fingerprint(source: str, split: str, text_field: str) -> dict:
    if is_local_source(source):
        files = text_files(source)
        return {"files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}
    return {"dataset": source, "split": split, "field": text_field}


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


DEFAULT_CACHE = "~/.cache/condensa"  # the root of the configs' default cache folders
CACHE_ENV = "CONDENSA_CACHE_DIR"  # moves that root (the tests point it at a temporary folder)


def cache_path(cache_dir: str | os.PathLike) -> Path:
    """A cache folder as configured, with the default root replaced by $CONDENSA_CACHE_DIR when that
    is set. Only the default moves: a folder the user named is theirs, and stays where it is."""
    path = str(cache_dir)
    root = os.environ.get(CACHE_ENV)
    if root and (path == DEFAULT_CACHE or path.startswith(DEFAULT_CACHE + "/")):
        path = root + path[len(DEFAULT_CACHE):]
    return Path(path).expanduser()


def load_token_stream(
    source: str,
    tokenizer,
    *,
    cache_dir: str | os.PathLike | None = None,
    split: str = "train",
    text_field: str = "text",
) -> np.ndarray:
    """The EOS-separated token stream of a source, cached on disk.

    The cache key covers the source (file paths, sizes and mtimes, or the dataset name) and the
    tokenizer's full definition, so an edited file or another tokenizer never reuses stale ids.
    """
    key = {"source": _source_fingerprint(source, split, text_field), "tokenizer": _tokenizer_fingerprint(tokenizer)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    cached = cache_path(cache_dir) / f"tokens-{digest}.npy" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            return np.load(cached)
        except (OSError, ValueError):
            pass  # a broken cache file is rebuilt below
    docs = read_documents(source) if is_local_source(source) else read_hf_dataset(source, split=split, text_field=text_field)
    stream = tokenize_documents(docs, tokenizer)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, stream)
        tmp.replace(cached)  # atomic, so parallel runs never read a half-written cache
    return stream


def split_blocks(blocks: np.ndarray, validation_fraction: float, *, min_validation: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) blocks: validation is the last blocks of the stream.

    A contiguous tail rather than a random sample: neighbouring blocks share documents, so a
    random split would leak text from training into validation.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise DataError(f"data.validation_fraction must be between 0 and 1; got {validation_fraction}.")
    n_val = max(min_validation, int(round(len(blocks) * validation_fraction)))
    if n_val >= len(blocks):
        raise DataError(
            f"the data gives only {len(blocks)} blocks, too few for a train/validation split; "
            "use more text or a shorter data.seq_len."
        )
    return blocks[:-n_val], blocks[-n_val:]


class BatchIterator:
    """Deterministic, resumable batches of blocks: a fresh permutation per epoch from (seed, epoch).

    The whole position is two integers (epoch, index), so it goes into the checkpoint as JSON and a
    resumed run sees exactly the batches an uninterrupted run would have seen. Written by hand
    because grain / tf.data would add a dependency for what is a seeded permutation.
    """

    def __init__(self, blocks: np.ndarray, batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if batch_size > len(blocks):
            raise DataError(
                f"batch size {batch_size} is larger than the {len(blocks)} training blocks; "
                "use more text, a shorter data.seq_len or a smaller train.batch_size."
            )
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0  # next batch within the epoch

    @property
    def batches_per_epoch(self) -> int:
        return len(self.blocks) // self.batch_size  # the incomplete last batch of an epoch is dropped

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.blocks))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        rows = self._order(self.epoch)[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        return self.blocks[rows]

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_blocks": len(self.blocks)}

    def restore(self, state: dict) -> None:
        if state.get("n_blocks") != len(self.blocks) or state.get("seed") != self.seed:
            raise DataError(
                f"the checkpoint's data position was saved for {state.get('n_blocks')} blocks with seed "
                f"{state.get('seed')}, but the data now gives {len(self.blocks)} blocks with seed {self.seed}; "
                "resume with the same data, seq_len and seed, or start a new output folder."
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def compact_vocabulary(stream: np.ndarray, size: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Maps a stream onto its `size - 1` most frequent ids plus one shared id for all the rest.

    For small from-scratch models on a CPU, where the 50k-wide output layer would cost more than
    the whole network. Returns `(stream in new ids, kept [size - 1] old id of each new id)`; EOS is
    always kept, the last new id (size - 1) stands for every dropped token. Ties break by id, so
    the mapping is deterministic.
    """
    if size < 2:
        raise DataError(f"data.vocab_limit must be at least 2; got {size}.")
    counts = np.bincount(stream, minlength=int(stream.max()) + 1).astype(np.int64)
    counts[eos_id] = np.iinfo(np.int64).max  # always kept
    order = np.lexsort((np.arange(counts.size), -counts))  # by count descending, then id ascending
    kept = np.sort(order[: size - 1]).astype(np.int32)
    lookup = np.full(counts.size, size - 1, np.int32)
    lookup[kept] = np.arange(kept.size, dtype=np.int32)
    return lookup[stream], kept

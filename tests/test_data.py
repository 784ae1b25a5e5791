"""Data pipeline: token cache, HF dataset errors, train/validation split, resumable batch order."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from condensa import data
from condensa.errors import DataError
from tests.conftest import CORPUS_DIR, TOKENIZER_DIR, require_shared


@pytest.fixture()
def text_dir(tmp_path):
    src = require_shared(CORPUS_DIR / "misc" / "inaugural.txt").read_text()[:20000]
    (tmp_path / "a.txt").write_text(src[:10000])
    (tmp_path / "b.txt").write_text(src[10000:])
    return tmp_path


def test_token_stream_matches_tokenizers_library_and_is_cached(text_dir, tokenizer, tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(require_shared(TOKENIZER_DIR) / "tokenizer.json"))
    expected = []
    for name in ("a.txt", "b.txt"):
        expected += reference.encode((text_dir / name).read_text()).ids + [tokenizer.eos_token_id]
    cache = tmp_path / "cache"
    stream = data.load_token_stream(str(text_dir), tokenizer, cache_dir=cache)
    np.testing.assert_array_equal(stream, expected)
    assert len(list(cache.glob("tokens-*.npy"))) == 1

    # A second load must come from the cache: tokenizing now would fail.
    monkeypatch.setattr(data, "tokenize_documents", lambda *a, **k: pytest.fail("cache was not used"))
    np.testing.assert_array_equal(data.load_token_stream(str(text_dir), tokenizer, cache_dir=cache), expected)
    monkeypatch.undo()

    # Editing a file changes the key: a new cache entry, new tokens.
    (text_dir / "b.txt").write_text("A different ending.")
    changed = data.load_token_stream(str(text_dir), tokenizer, cache_dir=cache)
    assert len(changed) < len(stream)
    assert len(list(cache.glob("tokens-*.npy"))) == 2


def test_the_default_token_cache_stays_out_of_home_under_condensa_cache_dir(tmp_path, tokenizer, monkeypatch):
    import os

    from condensa.train.config import TrainConfig

    # conftest moves it for every test: nothing a test caches lands in ~/.cache/condensa
    assert os.environ[data.CACHE_ENV].startswith(str(tmp_path.parent))
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "text.txt").write_text("Some text to cache.")
    data.load_token_stream(str(tmp_path / "text.txt"), tokenizer, cache_dir=TrainConfig().data.cache_dir)
    assert len(list((tmp_path / "cache" / "tokens").glob("tokens-*.npy"))) == 1 and not (tmp_path / "home").exists()
    data.load_token_stream(str(tmp_path / "text.txt"), tokenizer, cache_dir="~/mine")  # a folder the user named
    assert len(list((tmp_path / "home" / "mine").glob("tokens-*.npy"))) == 1


def test_empty_file_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        data.load_token_stream(str(tmp_path / "empty.txt"), tokenizer)


def test_uncached_hf_dataset_says_how_to_get_it(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    assert not data.is_local_source("wikitext:wikitext-2-raw-v1")
    with pytest.raises(DataError, match="not in the local cache.*load_dataset"):
        data.load_token_stream("wikitext:wikitext-2-raw-v1", tokenizer)


def test_split_keeps_a_contiguous_tail():
    blocks = np.arange(100).reshape(50, 2)
    train, val = data.split_blocks(blocks, 0.1)
    np.testing.assert_array_equal(val, blocks[45:])
    np.testing.assert_array_equal(train, blocks[:45])
    with pytest.raises(DataError, match="too few"):
        data.split_blocks(blocks[:1], 0.5)
    with pytest.raises(DataError, match="between 0 and 1"):
        data.split_blocks(blocks, 1.5)


def test_batches_cover_each_epoch_once_and_resume_exactly():
    blocks = np.arange(40 * 3).reshape(40, 3)
    it = data.BatchIterator(blocks, 8, seed=3)
    epoch = np.concatenate([next(it) for _ in range(it.batches_per_epoch)])
    assert sorted(epoch[:, 0].tolist()) == sorted(blocks[:, 0].tolist())  # a permutation of all blocks

    straight = data.BatchIterator(blocks, 8, seed=3)
    expected = [next(straight) for _ in range(13)]  # crosses two epoch boundaries
    first = data.BatchIterator(blocks, 8, seed=3)
    got = [next(first) for _ in range(6)]
    saved = first.state()
    resumed = data.BatchIterator(blocks, 8, seed=3)
    resumed.restore(saved)
    got += [next(resumed) for _ in range(7)]
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(expected[0], expected[5])  # epochs are shuffled differently

    with pytest.raises(DataError, match="same data"):
        data.BatchIterator(blocks[:30], 8, seed=3).restore(saved)
    with pytest.raises(DataError, match="larger than"):
        data.BatchIterator(blocks[:4], 8)


def test_compact_vocabulary_keeps_the_most_frequent_ids():
    rng = np.random.default_rng(0)
    stream = rng.zipf(1.5, 5000).astype(np.int32) % 500
    stream[::50] = 7  # EOS
    mapped, kept = data.compact_vocabulary(stream, 20, eos_id=7)
    counts = collections.Counter(stream.tolist())
    top = [tok for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:19]]
    assert set(kept.tolist()) == set(top) and 7 in kept.tolist()
    for old, new in zip(stream[:500], mapped[:500]):
        assert (kept[new] == old) if old in top else new == 19


def test_binary_or_non_utf8_text_is_refused_but_a_stray_bad_byte_is_not(tmp_path):
    import numpy as np

    from condensa.data import read_documents
    from condensa.errors import DataError

    binary = tmp_path / "random.txt"
    binary.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="random.txt is not UTF-8 text"):
        read_documents(binary)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(("café au lait, déjà vu. " * 50).encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not UTF-8 text"):
        read_documents(latin1)
    book = tmp_path / "book.txt"
    book.write_bytes(b"A long and honest book. " * 200 + b"\xff" + b" The end.")
    [text] = read_documents(book)
    assert text.count("\ufffd") == 1


def test_windows_and_old_mac_line_ends_read_as_newlines(tmp_path):
    """As Path.read_text reads them (universal newlines), so perplexities match earlier runs."""
    from condensa.data import read_documents

    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"one line\r\ntwo lines\rthree\n")
    assert read_documents(crlf) == [crlf.read_text()] == ["one line\ntwo lines\nthree\n"]

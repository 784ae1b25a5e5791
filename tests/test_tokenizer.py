"""The GPT-2 tokenizer loads offline from a directory and encodes like OpenAI's."""

from __future__ import annotations

import pytest

from condensa.data import load_tokenizer
from condensa.errors import CondensaError
from tests.conftest import TOKENIZER_DIR, require_shared


def test_encodes_the_reference_sentence(tokenizer):
    assert tokenizer("Hello world, this is GPT-2.")["input_ids"] == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]
    assert tokenizer.is_fast
    assert tokenizer.eos_token_id == 50256


def test_vocab_and_merges_alone_are_enough(tmp_path):
    source = require_shared(TOKENIZER_DIR)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    tok = load_tokenizer(tmp_path)
    assert tok("Hello world")["input_ids"] == [15496, 995]


def test_missing_tokenizer_directory(tmp_path):
    with pytest.raises(CondensaError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")

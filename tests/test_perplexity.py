"""Sliding-window perplexity against transformers (PyTorch) under the same HF protocol."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import condensa
from condensa.errors import ConfigError
from condensa.eval.perplexity import perplexity, sliding_windows
from tests.conftest import WIKITEXT_TEST, make_hf_model, require_shared


def hf_reference_perplexity(hf, ids: np.ndarray, max_length: int, stride: int) -> float:
    """HF's recipe, written independently: labels -100 outside each window's new targets; the NLL
    of every window is weighted by the number of labels that survive the internal shift."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq = torch.tensor(ids)[None]
    for begin in range(0, seq.size(1), stride):
        end = min(begin + max_length, seq.size(1))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=labels).loss.item()
        counted = int((labels[:, 1:] != -100).sum())
        nll_sum += loss * counted
        n_tokens += counted
        prev_end = end
        if end == seq.size(1):
            break
    return math.exp(nll_sum / n_tokens)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = make_hf_model(seed=5, n_positions=32)
    path = tmp_path_factory.mktemp("ppl")
    hf.save_pretrained(path)
    return hf, condensa.load_pretrained(path)[0], path


@pytest.mark.parametrize("stride", [32, 16])
def test_matches_transformers(models, tokenizer, stride):
    hf, model, _ = models
    text = require_shared(WIKITEXT_TEST).read_text()[:3000]
    ids = np.asarray(tokenizer(text)["input_ids"][:301]) % 99  # 301: the last window is short
    ours = perplexity(model, ids, stride=stride, batch_size=4)
    theirs = hf_reference_perplexity(hf, ids, 32, stride)
    assert abs(ours["ppl"] - theirs) / theirs <= 1e-4
    # with stride < window every token but the first is scored; with stride == window the first
    # token of each window has no context inside its window and is skipped (as in HF's recipe)
    unscored = 1 if stride < 32 else math.ceil(len(ids) / 32)
    assert ours["tokens"] == len(ids) - unscored


def test_windows_score_each_token_at_most_once():
    for n, length, stride in [(100, 32, 32), (100, 32, 16), (33, 32, 7), (5, 32, 32)]:
        scored = []
        for w in sliding_windows(n, length, stride):
            assert w.end - w.begin <= length
            scored.extend(range(w.begin + w.score_from, w.end))
        window_starts = set(range(0, n, length)) if stride == length else {0}
        assert scored == [t for t in range(n) if t not in window_starts]


def test_bad_stride_and_empty_text(models):
    _, model, _ = models
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, np.arange(50) % 99, stride=0)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, np.arange(50) % 99, stride=64)
    with pytest.raises(condensa.CondensaError, match="at least 2"):
        perplexity(model, np.zeros((1,), np.int32))


def test_cli_writes_results_and_fails_cleanly(models, tmp_path, capsys):
    from condensa.cli import run_main
    from condensa.eval.__main__ import main

    _, _, model_dir = models
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 40)
    tok = str(require_shared(WIKITEXT_TEST).parents[1] / "gpt2-tokenizer")
    out = tmp_path / "out"
    cli = run_main(main)
    # the tiny model has a 99-token vocabulary: a real GPT-2 tokenizer gives ids it cannot take,
    # which must be a clean one-line error (exit 2), not a crash or a silent clamp
    assert cli(["ppl", "--model", str(model_dir), "--data", str(text), "--tokenizer", tok, "--out", str(out)]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert cli(["ppl", "--model", str(model_dir), "--data", str(tmp_path / "empty.txt"), "--tokenizer", tok]) == 2
    assert "empty" in capsys.readouterr().err
    assert cli(["ppl", "--model", str(model_dir), "--data", str(text), "--stride", "0", "--tokenizer", tok,
                "--max_tokens", "40", "--out", str(out)]) == 2
    assert "stride" in capsys.readouterr().err
    assert cli(["ppl", "--model", str(model_dir), "--strid", "3"]) == 2
    assert "Did you mean 'stride'" in capsys.readouterr().err


def test_cli_reports_perplexity_of_a_real_vocabulary_model(tmp_path, tokenizer, capsys):
    """End to end on WikiText-2 text with a model whose vocabulary fits the GPT-2 tokenizer."""
    from condensa.cli import run_main
    from condensa.eval.__main__ import main

    hf = make_hf_model(seed=6, vocab_size=50257, n_embd=32, n_positions=64, bos_token_id=50256, eos_token_id=50256)
    hf.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = str(require_shared(WIKITEXT_TEST))
    out = tmp_path / "out"
    assert run_main(main)(["ppl", "--model", str(tmp_path / "model"), "--data", data, "--max_tokens", "300",
                           "--stride", "32", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    ids = np.asarray(tokenizer(require_shared(WIKITEXT_TEST).read_text()[:20000])["input_ids"][:300])
    expected = hf_reference_perplexity(hf, ids, 64, 32)
    assert abs(result["ppl"] - expected) / expected <= 1e-4
    assert (out / "config.json").is_file()
    assert f"{result['windows']} windows," in capsys.readouterr().out and result["windows"] > 1
    # text that fits one window says so in the singular
    assert run_main(main)(["ppl", "--model", str(tmp_path / "model"), "--data", data, "--max_tokens", "60",
                           "--out", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "results.json").read_text())["windows"] == 1
    assert "tokens, 1 window, dense attention" in capsys.readouterr().out

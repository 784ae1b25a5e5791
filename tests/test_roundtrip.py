"""load_pretrained -> save_pretrained -> transformers.GPT2LMHeadModel.from_pretrained keeps the logits."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import torch
from transformers import GPT2LMHeadModel

import condensa


def test_saved_directory_loads_in_transformers_with_same_logits(tiny_hf_dir, tmp_path, tokenizer, caplog):
    model, config = condensa.load_pretrained(tiny_hf_dir)
    out_dir = condensa.save_pretrained(model, config, tmp_path / "export", tokenizer=tokenizer)

    with caplog.at_level(logging.WARNING):
        reloaded, info = GPT2LMHeadModel.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not [r for r in caplog.records if "newly initialized" in r.getMessage() or "not used" in r.getMessage()]

    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 20))
    with torch.no_grad():
        theirs = reloaded.eval()(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids)).logits)
    assert np.abs(ours - theirs).max() <= 1e-4
    # the tokenizer travels with the model
    assert (out_dir / "tokenizer.json").is_file() or (out_dir / "vocab.json").is_file()


def test_save_then_load_is_exact(tiny_hf_dir, tmp_path):
    model, config = condensa.load_pretrained(tiny_hf_dir)
    condensa.save_pretrained(model, config, tmp_path)
    again, again_config = condensa.load_pretrained(tmp_path)
    assert again_config == config
    ids = jnp.asarray(np.random.RandomState(1).randint(0, config.vocab_size, (1, 16)))
    np.testing.assert_array_equal(np.asarray(model(ids).logits), np.asarray(again(ids).logits))
    assert not list(tmp_path.glob(".*.tmp")), "atomic writes must not leave temporaries behind"

"""Each concentration loss does its job against a λ = 0 control, read from the runs' metrics.jsonl;
the final HF export loads in transformers with the trained logits.

A tiny GPT-2 (d = 32, 2 layers, T = 64, the 1,023 most frequent tokens) is trained from scratch
for 200 steps on a book-length text of ../shared/data/corpus, three times with the same seed and
data order: λ = 0, topk λ > 0, tile λ > 0.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from tests.conftest import CORPUS_DIR, require_shared

STEPS = 200


def _config(out, *extra):
    from condensa.cli import load_config
    from condensa.train.config import TrainConfig

    args = [
        "--out", str(out), "--init", "scratch", "--model_config", "tiny",
        "--model_overrides", "{n_embd: 32, n_positions: 64}", "--dropout", "0",
        "--data.source", str(require_shared(CORPUS_DIR / "misc" / "state-union.txt")), "--data.seq_len", "64",
        "--data.vocab_limit", "1024", "--data.cache_dir", str(out.parent / "token-cache"),
        "--optimizer.lr", "3e-3", "--optimizer.warmup_steps", "20",
        "--train.steps", str(STEPS), "--train.batch_size", "8", "--train.remat", "false",
        "--train.eval_every", str(STEPS), "--train.eval_batches", "4", "--train.log_every", "50",
        "--checkpoint.every", str(STEPS), "--loss.tile_size", "8", "--loss.tile.f", "0.125",
        *extra,
    ]
    return load_config(TrainConfig, None, args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    from condensa.train.loop import train

    root = tmp_path_factory.mktemp("acceptance")
    settings = {
        "control": [],
        "topk": ["--loss.topk.weight", "0.05", "--loss.topk.warmup_steps", "100", "--train.export", "false"],
        "tile": ["--loss.tile.weight", "0.1", "--loss.tile.warmup_steps", "100", "--train.export", "false"],
    }
    for name, extra in settings.items():
        train(_config(root / name, *extra))
    return root


def _final_eval(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["step"] == STEPS
    return evals[-1]


def test_topk_loss_raises_topk_mass_at_similar_perplexity(runs):
    control, topk = _final_eval(runs / "control"), _final_eval(runs / "topk")
    assert topk["top8_mass"] > control["top8_mass"] + 0.1, (control, topk)
    assert topk["val_ppl"] < 1.10 * control["val_ppl"], (control, topk)


def test_tile_loss_raises_oracle_tile_mass_at_similar_perplexity(runs):
    control, tile = _final_eval(runs / "control"), _final_eval(runs / "tile")
    assert tile["oracle_tile_mass"] > control["oracle_tile_mass"] + 0.05, (control, tile)
    assert tile["val_ppl"] < 1.10 * control["val_ppl"], (control, tile)


def test_training_logs_the_concentration_loss(runs):
    records = [json.loads(line) for line in (runs / "topk" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [50, 100, 150, 200]
    assert all(r["L_topk"] > 0 and r["L_conc"] > 0 and r["tokens_per_s"] > 0 for r in train)
    assert train[-1]["lm_loss"] < train[0]["lm_loss"]


def test_export_loads_in_transformers_with_the_same_logits(runs):
    import torch
    from flax import nnx
    from transformers import GPT2LMHeadModel

    from condensa.checkpoint import Checkpointer
    from condensa.model import GPT2Config

    run = runs / "control"
    hf = GPT2LMHeadModel.from_pretrained(run / "hf", attn_implementation="eager").eval()
    vocab_map = json.loads((run / "hf" / "vocab_map.json").read_text())
    assert len(vocab_map["tokenizer_id_of_model_id"]) == 1023

    # The trained parameters, straight from the final orbax checkpoint (not from the export).
    from condensa.train.setup import build_model, build_optimizer

    cfg = _config(run)
    model, config = build_model(cfg, 1024)
    optimizer = build_optimizer(model, cfg.optimizer, STEPS)
    graphdef, state = nnx.split((model, optimizer))
    step, state, _ = Checkpointer(run / "checkpoints").restore_latest(state)
    assert step == STEPS
    model, _ = nnx.merge(graphdef, state)
    model.eval()

    ids = np.random.default_rng(0).integers(0, 1024, (2, 64))
    ours = np.asarray(model(jax.numpy.asarray(ids)).logits)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    assert GPT2Config.from_json_file(run / "hf" / "config.json") == config

"""Issue 29: a thresholds file supplies its own settings to `eval ppl` and `eval generate` (mode, k,
the tile gate and its geometry); an explicit option that agrees is fine, one it cannot serve is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from condensa.cli import run_main
from tests.conftest import WIKITEXT_TEST, make_hf_model, require_shared

K, TILE, BUDGET = 8, 16, 0.25


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """A tiny model that reads GPT-2 tokens, and gated Top-θ thresholds calibrated for it."""
    import condensa
    from condensa.sparsity.calibration import GateSpec, calibrate

    root = tmp_path_factory.mktemp("thresholds-settings")
    hf = make_hf_model(seed=7, vocab_size=50257, n_positions=64, bos_token_id=50256, eos_token_id=50256)
    hf.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    model, _ = condensa.load_pretrained(root / "model")
    blocks = np.random.default_rng(0).integers(0, 50257, size=(4, 64)).astype(np.int32)
    path = calibrate(model, blocks, k=K, gate=GateSpec(TILE, TILE, BUDGET, 1)).save(root / "thresholds.safetensors")
    return root / "model", path


def eval_cli(*args) -> int:
    from condensa.eval.__main__ import main

    return run_main(main)(list(args))


def ppl_args(setup, out, *extra):
    model_dir, path = setup
    return ["ppl", "--model", str(model_dir), "--data", str(require_shared(WIKITEXT_TEST)), "--max_tokens", "200",
            "--thresholds", str(path), "--out", str(out), *extra]


def test_ppl_takes_the_rule_from_the_thresholds_file(setup, tmp_path, capsys):
    assert eval_cli(*ppl_args(setup, tmp_path / "bare")) == 0
    ran = json.loads((tmp_path / "bare" / "config.json").read_text())["attention"]
    assert (ran["mode"], ran["k"], ran["tile_gate"]) == ("toptheta", K, True)
    assert (ran["block_q"], ran["block_k"], ran["tile_budget"], ran["sink_tiles"]) == (TILE, TILE, BUDGET, 1)
    bare = json.loads((tmp_path / "bare" / "results.json").read_text())["ppl"]
    # the same rule spelled out in full, as before: the same perplexity
    full = ["--attention.mode", "toptheta", "--attention.k", str(K), "--attention.tile_gate", "true",
            "--attention.block_q", str(TILE), "--attention.block_k", str(TILE), "--attention.tile_budget", str(BUDGET)]
    assert eval_cli(*ppl_args(setup, tmp_path / "full", *full)) == 0
    assert json.loads((tmp_path / "full" / "results.json").read_text())["ppl"] == bare
    # an option the thresholds do not use is the user's to set: the gate off keeps the file's k
    assert eval_cli(*ppl_args(setup, tmp_path / "ungated", "--attention.tile_gate", "false")) == 0
    ran = json.loads((tmp_path / "ungated" / "config.json").read_text())["attention"]
    assert (ran["tile_gate"], ran["k"]) == (False, K)
    capsys.readouterr()


@pytest.mark.parametrize("option", [["--attention.k", "16"], ["--attention.tile_budget", "0.5"],
                                    ["--attention.block_q=32"]])
def test_ppl_refuses_an_option_the_file_cannot_serve(setup, tmp_path, capsys, option):
    out = tmp_path / "out"
    assert eval_cli(*ppl_args(setup, out, *option)) == 2
    err = capsys.readouterr().err
    key = option[0].split("=")[0]
    assert err.startswith("error: ") and f"{key}" in err and f"Leave {key} out" in err
    assert not out.exists()  # refused before any work


def test_generate_takes_the_rule_from_the_thresholds_file(setup, tmp_path):
    model_dir, path = setup
    assert eval_cli("generate", "--model", str(model_dir), "--data", str(require_shared(WIKITEXT_TEST)),
                    "--prompts", "1", "--prompt_tokens", "40", "--max_new_tokens", "2", "--thresholds", str(path),
                    "--out", str(tmp_path)) == 0
    attention = json.loads((tmp_path / "results.json").read_text())["attention"]
    assert (attention["mode"], attention["k"], attention["tile_gate"], attention["block_q"]) == ("toptheta", K, True, TILE)

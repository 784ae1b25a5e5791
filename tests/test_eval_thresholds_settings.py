"""Issue 29: a thresholds file supplies its own settings to `eval ppl` and `eval generate` (mode, k,
the tile gate and its geometry); an explicit option that agrees is fine, one it cannot serve is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from condensa.cli import run_main
from tests.conftest import WIKITEXT_TEST, make_hf_model, require_shared
from tests.metrics_doc import undocumented

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


def ppl_args(setup, out, *extra, measure=False):
    """`eval ppl` with the thresholds file; `measure=False` skips the kept fractions (point 3's own test)."""
    model_dir, path = setup
    skip = [] if measure else ["--metric_blocks", "0", "--decode_steps", "0"]
    return ["ppl", "--model", str(model_dir), "--data", str(require_shared(WIKITEXT_TEST)), "--max_tokens", "200",
            "--thresholds", str(path), "--out", str(out), *skip, *extra]


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


def test_generate_takes_the_rule_from_the_thresholds_file(setup, tmp_path, capsys):
    model_dir, path = setup
    assert eval_cli("generate", "--model", str(model_dir), "--data", str(require_shared(WIKITEXT_TEST)),
                    "--prompts", "1", "--prompt_tokens", "60", "--max_new_tokens", "2", "--thresholds", str(path),
                    "--out", str(tmp_path)) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    attention = result["attention"]
    assert (attention["mode"], attention["k"], attention["tile_gate"], attention["block_q"]) == ("toptheta", K, True, TILE)
    # point 3: the kept elements and tiles of the prompt's prefill, beside the decoding V rows
    assert 0 < result["kept_fraction"] < 1 and 0 < result["tile_kept_fraction"] < 1 and result["metric_blocks"] == 1
    assert f"elements {result['kept_fraction']:.3f}" in capsys.readouterr().out
    assert not undocumented(result), "add these keys to docs/metrics.md"  # point 4


# ---- issue 29, point 3: a sparse rule's results say how sparse it was ------------------------------


KEPT = ("kept_fraction", "tile_kept_fraction", "decode_v_rows_fraction")


def test_ppl_of_a_sparse_rule_reports_its_kept_fractions_as_the_sweep_measures_them(setup, tmp_path, capsys):
    import condensa
    from condensa.data import model_tokenizer
    from condensa.eval.sweep import SparsityProbe
    from condensa.sparsity import Thresholds

    model_dir, path = setup
    assert eval_cli(*ppl_args(setup, tmp_path / "sparse", "--decode_steps", "4", measure=True)) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "sparse" / "results.json").read_text())
    for key in KEPT:
        assert 0 < result[key] < 1, key  # k = 8 of up to 64 keys, a quarter of the tiles: sparse, not empty
    assert result["metric_blocks"] == 2 and result["decode"]["steps"] == 4
    assert len(result["layers"]) == 2
    assert not undocumented(result), "add these keys to docs/metrics.md"  # point 4
    line = next(l for l in printed.splitlines() if l.startswith("kept:"))
    assert f"elements {result['kept_fraction']:.3f}" in line and f"tiles {result['tile_kept_fraction']:.3f}" in line
    assert f"V rows when decoding {result['decode_v_rows_fraction']:.3f}" in line
    # the same numbers as the sweep's measurement on the same windows
    model, _ = condensa.load_pretrained(model_dir)
    thresholds = Thresholds.load(path)
    ids = np.asarray(model_tokenizer(str(model_dir), None)(
        require_shared(WIKITEXT_TEST).read_text()[:20000], verbose=False)["input_ids"][:200], np.int32)
    probe = SparsityProbe.build(model, ids, 64, tile=TILE, metric_blocks=2, decode_steps=4)
    expected = probe.measure(model, thresholds.attention(), thresholds)
    for key in KEPT:
        assert result[key] == pytest.approx(expected[key], abs=1e-9), key
    # a dense run has nothing to report
    assert eval_cli("ppl", "--model", str(model_dir), "--data", str(WIKITEXT_TEST), "--max_tokens", "200",
                    "--out", str(tmp_path / "dense")) == 0
    assert "kept_fraction" not in json.loads((tmp_path / "dense" / "results.json").read_text())
    assert "kept:" not in capsys.readouterr().out

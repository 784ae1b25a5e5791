"""`python -m condensa.eval sweep` on a tiny GPT-2 trained briefly on ../shared/data/corpus and
evaluated on WikiText-2 test: the acceptance criteria are asserted on the sweep's own JSON.

One trained model (session fixture, shared with test_eval_generate.py) and one full sweep run
(module fixture); the other tests re-use its compiled functions and cached thresholds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from condensa.cli import run_main
from tests.conftest import CORPUS_DIR, TOKENIZER_DIR, WIKITEXT_TEST, require_shared
from tests.metrics_doc import undocumented

KS = [16, 32]
BUDGET = 0.25
TILE = 16  # 8 tiles per 128-token row


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory):
    """A tiny GPT-2 (d = 32, 2 layers, n_positions 128, 1,023 + 1 tokens) trained for 80 steps."""
    from condensa.cli import load_config
    from condensa.train.config import TrainConfig
    from condensa.train.loop import train

    root = tmp_path_factory.mktemp("eval-model")
    args = [
        "--out", str(root / "run"), "--init", "scratch", "--model_config", "tiny",
        "--model_overrides", "{n_embd: 32, n_positions: 128}", "--dropout", "0",
        "--data.source", str(require_shared(CORPUS_DIR / "misc" / "inaugural.txt")),
        "--data.tokenizer", str(require_shared(TOKENIZER_DIR)), "--data.seq_len", "128",
        "--data.vocab_limit", "1024", "--data.cache_dir", str(root / "token-cache"),
        "--optimizer.lr", "3e-3", "--optimizer.warmup_steps", "20",
        "--train.steps", "80", "--train.batch_size", "8", "--train.remat", "false",
        "--train.eval_every", "80", "--train.eval_batches", "1", "--train.log_every", "40",
        "--checkpoint.every", "80", "--checkpoint.async_save", "false",
    ]
    train(load_config(TrainConfig, None, args))
    return root / "run" / "hf"


def sweep_args(model_dir, out, *extra):
    return [
        "--model", str(model_dir), "--tokenizer", str(TOKENIZER_DIR),
        "--data", str(require_shared(WIKITEXT_TEST)),
        "--calibration_data", str(CORPUS_DIR / "misc" / "inaugural.txt"),
        "--token_cache", str(model_dir.parent.parent / "token-cache"),
        "--calibration_samples", "16", "--max_tokens", "1536", "--tile", str(TILE),
        "--metric_blocks", "1", "--out", str(out), *extra,
    ]


def run_sweep_cli(args) -> int:
    from condensa.eval.__main__ import main

    return run_main(main)(["sweep", *args])


@pytest.fixture(scope="module")
def sweep(trained_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    code = run_sweep_cli(sweep_args(
        trained_model_dir, out, "--ks", ",".join(map(str, KS)), "--tile_budgets", f"off,{BUDGET}",
        "--compensations", "none,sdc+vmc", "--decode_steps", "0"))
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def _rows(results, **match):
    return [r for r in results["rows"] if all(r[key] == value for key, value in match.items())]


def test_kept_fraction_is_monotone_in_k(sweep):
    _, results = sweep
    for method in ("topk", "toptheta"):
        rows = sorted(_rows(results, method=method, tile_budget=None, compensation="none"), key=lambda r: r["k"])
        assert [r["k"] for r in rows] == KS
        kept = [r["kept_fraction"] for r in rows]
        assert all(a < b for a, b in zip(kept, kept[1:])), (method, kept)


def test_toptheta_keeps_within_20_percent_of_topk(sweep):
    _, results = sweep
    for k in KS:
        (topk,) = _rows(results, method="topk", k=k)
        (theta,) = _rows(results, method="toptheta", k=k, tile_budget=None, compensation="none")
        assert abs(theta["kept_fraction"] / topk["kept_fraction"] - 1) <= 0.20, (k, theta, topk)


def test_every_k_has_delta_ppl_with_and_without_compensation_and_gate(sweep):
    _, results = sweep
    dense = results["dense"]["ppl"]
    for k in KS:
        for f in (None, BUDGET):
            for comp in ("none", "sdc+vmc"):
                (row,) = _rows(results, method="toptheta", k=k, tile_budget=f, compensation=comp)
                assert np.isclose(row["delta_ppl"], row["ppl"] - dense)
                assert np.isfinite(row["ppl"]) and row["ppl"] > 1
                if f is not None:  # gated rules report the tiles they keep and the mass those hold
                    assert 0 < row["tile_kept_fraction"] < 1
                    assert 0 < row["gate_tile_mass"] <= 1 + 1e-6 and 0 < row["oracle_tile_mass"] <= 1 + 1e-6
    effect = {(e["k"], e["tile_budget"]) for e in results["compensation_effect"]}
    assert effect == {(k, f) for k in KS for f in (None, BUDGET)}
    # top-k is the exact oracle: the more it keeps, the closer to dense
    topk = sorted(_rows(results, method="topk"), key=lambda r: r["k"])
    assert topk[-1]["ppl"] < topk[0]["ppl"]


def test_every_key_of_the_results_is_in_docs_metrics_md(sweep):
    _, results = sweep
    assert not undocumented(results), "add these keys to docs/metrics.md"


def test_markdown_table_is_generated_from_the_json(sweep):
    from condensa.eval.sweep_cli import markdown_table

    out, results = sweep
    text = (out / "results.md").read_text()
    assert text == markdown_table(results)
    assert text.count("\n| ") >= len(results["rows"]) + 1
    assert json.loads((out / "config.json").read_text())["ks"] == KS


def test_results_json_is_strict_json(sweep):
    """Top-k rows have no gate, so their gate mass is NaN: written as null (bare NaN is not JSON),
    read back as NaN by `read_results`."""
    from condensa.eval.sweep import read_results

    out, _ = sweep
    strict = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert all(row["gate_tile_mass"] is None for row in _rows(strict, method="topk"))
    assert all(np.isnan(row["gate_tile_mass"]) for row in _rows(read_results(out / "results.json"), method="topk"))


@pytest.mark.parametrize("name", ["ppl_vs_kept", "thresholds", "heatmap"])
def test_plots_are_real_pngs(sweep, name):
    from PIL import Image

    out, results = sweep
    path = out / f"{name}.png"
    assert results["plots"][name] == str(path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("L"), np.float64)
    assert width >= 300 and height >= 200
    assert pixels.std() > 5  # not blank
    assert len(np.unique(pixels)) > 20


def test_rerun_reuses_cached_thresholds_and_measures_decoding(sweep, trained_model_dir, tmp_path):
    """A second sweep into the same folder loads the thresholds (no re-calibration) and, with
    decode_steps, reports the V rows a KV-cache decoding step needs."""
    import shutil

    out, _ = sweep
    again = tmp_path / "again"
    shutil.copytree(out / "thresholds", again / "thresholds")
    cached = again / "thresholds" / f"k{KS[0]}-f{BUDGET:g}.safetensors"
    stamp = cached.stat().st_mtime_ns
    code = run_sweep_cli(sweep_args(trained_model_dir, again, "--ks", str(KS[0]), "--tile_budgets", str(BUDGET),
                                    "--compensations", "none", "--decode_steps", "4", "--gate_alone", "true",
                                    "--decode_gate", "true"))
    assert code == 0
    assert cached.stat().st_mtime_ns == stamp
    results = json.loads((again / "results.json").read_text())
    for row in results["rows"]:
        assert 0 < row["decode_v_rows_fraction"] < 1
        assert 0 <= row["decode_token_agreement"] <= 1
    labels = {row["label"]: row for row in results["rows"]}
    alone, gated = labels[f"gate f={BUDGET:g} alone"], labels[f"gate f={BUDGET:g} + Top-θ"]
    decode_alone, decode_gated = labels[f"decode gate f={BUDGET:g} alone"], labels[f"decode gate f={BUDGET:g} + Top-θ"]
    # the gate alone keeps whole tiles: more per row than Top-θ inside the same tiles
    assert alone["kept_per_row"] > gated["kept_per_row"] and alone["tile_kept_fraction"] < 1
    # rows gated as decoding steps count the key tiles a step reads (1 x tile): some are dropped
    for row in (decode_alone, decode_gated):
        assert row["decode_gate"] and 0 < row["tile_kept_fraction"] < 1 and np.isfinite(row["ppl"])
    assert decode_alone["ppl"] != alone["ppl"]  # another rule, not the prefill gate again


def test_dense_layers_reach_every_rule(sweep, trained_model_dir, tmp_path):
    """`--dense_layers` listing every layer leaves every rule dense: each perplexity equals the
    dense one, and the rows record the layers."""
    import shutil

    out, _ = sweep
    again = tmp_path / "dense"
    shutil.copytree(out / "thresholds", again / "thresholds")  # the rules' own thresholds, not re-calibrated
    code = run_sweep_cli(sweep_args(trained_model_dir, again, "--ks", str(KS[0]), "--tile_budgets", f"off,{BUDGET}",
                                    "--compensations", "none", "--decode_steps", "0", "--dense_layers", "[0,1]"))
    assert code == 0
    results = json.loads((again / "results.json").read_text())
    assert {row["method"] for row in results["rows"]} == {"topk", "toptheta"} and len(results["rows"]) == 3
    for row in results["rows"]:
        assert row["dense_layers"] == [0, 1]
        assert row["ppl"] == pytest.approx(results["dense"]["ppl"], rel=1e-6), row["label"]


def test_bad_input(trained_model_dir, tmp_path, capsys):
    from condensa.sparsity import Thresholds

    model = trained_model_dir
    cases = {
        "stride 0": (sweep_args(model, tmp_path / "a", "--ks", "16", "--stride", "0"), "--stride"),
        "k above the context": (sweep_args(model, tmp_path / "b", "--ks", "16,128"), "k=128"),
        "empty text": ([*sweep_args(model, tmp_path / "c", "--ks", "16"), "--data", str(tmp_path / "empty.txt")],
                       "no text"),
        "no tokenizer for a reduced vocabulary": (
            ["--model", str(model), "--data", str(WIKITEXT_TEST), "--ks", "16", "--out", str(tmp_path / "d")],
            "--tokenizer"),
        "thresholds of another model": (sweep_args(model, tmp_path / "e", "--ks", "16"), "calibrated for a model with"),
        "bad tile budget": (sweep_args(model, tmp_path / "f", "--ks", "16", "--tile_budgets", "off,2"), "(0, 1]"),
        "heatmap k not swept": (sweep_args(model, tmp_path / "g", "--ks", "16", "--heatmap_k", "8"), "heatmap_k"),
        "dense layer outside the model": (sweep_args(model, tmp_path / "h", "--ks", "16", "--dense_layers", "[7]"),
                                          "dense_layers [7]"),
    }
    (tmp_path / "empty.txt").write_text("\n  \n")
    other = Thresholds(theta=np.zeros((3, 4, 64), np.float32), sdc_delta=np.zeros((3, 4, 64), np.float32), k=16,
                       model=(("n_layer", 3), ("n_head", 4), ("n_embd", 64), ("n_positions", 64), ("vocab_size", 99)))
    other.save(tmp_path / "e" / "thresholds" / "k16-foff.safetensors")
    for name, (args, needle) in cases.items():
        assert run_sweep_cli(args) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err, (name, err)
        assert "Traceback" not in err

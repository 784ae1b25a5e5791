"""The study driver at CPU size: every stage but timing runs, and results.md is generated from the
stages' JSON (change the JSON, regenerate, and the Markdown changes with it)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, require_shared

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    require_shared(SHARED_DATA)
    out = tmp_path_factory.mktemp("study")
    cmd = [sys.executable, "-m", "condensa.eval.study", str(REPO / "configs/study-tiny.yaml"), "--stages",
           "train,evaluate,report", "--out", str(out), "--calibration.ks", "[8]", "--calibration.gate_k", "8", "--timing.k", "8", "--pretrain.train.steps", "8", "--pretrain.train.batch_size", "4",
           "--pretrain.data.cache_dir", str(out / "tokens")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_stages_write_json_and_report(study):
    results = study / "results"
    train = json.loads((results / "train.json").read_text())
    assert set(train) == {"base", "tile"}
    assert train["tile"]["losses"]["tile"] == 2.0 and train["base"]["losses"]["tile"] == 0.0
    for name in ("base", "tile"):
        ev = json.loads((results / f"evaluate_{name}.json").read_text())
        assert set(ev) == {"corpus", "wikitext", "model_sha256"} and len(ev["model_sha256"]) == 64
        labels = {r["label"] for r in ev["corpus"]["rows"]}
        assert {"top-k", "Top-θ", "Top-θ + SDC+VMC", "gate f=0.25 + Top-θ", "gate f=0.25 alone",
                "decode gate f=0.25 alone", "decode gate f=0.25 + Top-θ"} <= labels
        assert not any(r["compensation"] != "none" for r in ev["wikitext"]["rows"])  # (b) needs no compensation
        assert not any(r["method"] == "dense" or r["decode_gate"] for r in ev["wikitext"]["rows"])
    md = (study / "report" / "results.md").read_text()
    assert "## Answers" in md and (study / "report" / "img" / "study" / "ppl_vs_kept_corpus.png").is_file()


def test_markdown_follows_the_json(study, tmp_path):
    from condensa.eval.study import report

    results = tmp_path / "results"
    shutil.copytree(study / "results", results)
    path = results / "evaluate_base.json"
    ev = json.loads(path.read_text())
    row = ev["corpus"]["rows"][0]
    old = f"| {row['k']} | {row['ppl']:.2f} |"
    before = report.write(results, tmp_path / "a").read_text()
    assert old in before
    row["ppl"] = 123456.789
    path.write_text(json.dumps(ev))
    after = report.write(results, tmp_path / "b").read_text()
    assert f"| {row['k']} | 123456.79 |" in after and old not in after
    # every percentage in the answers' kept-per-row table is recomputed from the JSON too
    ratio = report.answers(report.load_results(results))["b"]["base"][8]["ratio"]
    assert re.search(rf"\| base \| 8 \| [\d.]+ \| [\d.]+ \| {ratio:.2f} \|", after)


def _study_exit(capsys, *args) -> tuple[int, str]:
    """Runs the study's entry point in this process, as `python -m condensa.eval.study ARGS` would
    (the same wrapper turns a CondensaError into one stderr line and exit status 2)."""
    from condensa.eval.study.__main__ import main

    capsys.readouterr()
    code = main([str(REPO / "configs/study-tiny.yaml"), *args])
    return code, capsys.readouterr().err


def test_unknown_stage_and_model_are_clear_errors(tmp_path, capsys):
    for extra, message in ((["--stages", "trian"], "unknown stage"), (["--models", "nope"], "unknown study model"),
                           (["--calibration.gate_k", "999"], "must be one of calibration.ks"),
                           (["--timing.models", "[base,tlie]"], "unknown study model")):
        code, err = _study_exit(capsys, "--out", str(tmp_path), *extra)
        assert code == 2 and message in err, err


def _row(method, f, delta, compensation="none", decode=False, k=16):
    return {"method": method, "k": k, "tile_budget": f, "compensation": compensation, "decode_gate": decode,
            "delta_ppl_rel": delta, "kept_fraction": 0.1, "tile_kept_fraction": 0.2}


def test_timed_budget_is_the_smallest_within_the_limit():
    """by="rule": the gated Top-θ rule's own cost decides; by="gate": the gate alone's, timed with
    the better compensation at that budget; decode rows are chosen apart from prefill rows."""
    from condensa.errors import ConfigError
    from condensa.eval.study.timing import choose_budget

    rows = [_row("toptheta", None, 0.002),
            _row("toptheta", 0.25, 0.008), _row("toptheta", 0.25, 0.006, "sdc+vmc"),
            _row("toptheta", 0.125, 0.03), _row("toptheta", 0.125, 0.02, "sdc+vmc"),
            _row("dense", 0.25, 0.001), _row("dense", 0.125, 0.004), _row("dense", 0.0625, 0.02),
            _row("toptheta", 0.0625, 0.05), _row("toptheta", 0.0625, 0.04, "sdc+vmc"),
            _row("dense", 0.25, 0.03, decode=True), _row("dense", 0.125, 0.05, decode=True),
            _row("toptheta", 0.25, 0.04, decode=True), _row("toptheta", 0.125, 0.06, decode=True)]
    evaluation = {"corpus": {"rows": rows}}
    by_rule = choose_budget(evaluation, 16, 0.01)
    assert (by_rule["tile_budget"], by_rule["compensation"], by_rule["within_limit"]) == (0.25, "sdc+vmc", True)
    by_gate = choose_budget(evaluation, 16, 0.01, by="gate")
    assert (by_gate["tile_budget"], by_gate["compensation"], by_gate["gate_delta_ppl_rel"]) == (0.125, "sdc+vmc", 0.004)
    assert by_gate["within_limit"] and by_gate["method"] == "toptheta"
    # nothing within 1% while decoding: the cheapest decode-gate budget, marked
    decode = choose_budget(evaluation, 16, 0.01, by="gate", decode=True)
    assert (decode["tile_budget"], decode["within_limit"], decode["decode_gate"]) == (0.25, False, True)
    assert choose_budget(evaluation, 16, 0.05, by="gate", decode=True)["tile_budget"] == 0.125
    with pytest.raises(ConfigError, match="gate_alone"):
        choose_budget({"corpus": {"rows": [r for r in rows if r["method"] != "dense"]}}, 16, 0.01, by="gate")


def test_budget_by_gate_needs_the_gate_alone_rules(tmp_path, capsys):
    code, err = _study_exit(capsys, "--out", str(tmp_path), "--timing.budget_by", "gate", "--evaluation.gate_alone", "false")
    assert code == 2 and "evaluation.gate_alone: true" in err, err


def test_timing_details_show_the_budgets_and_the_prefill_grid():
    """The report states how each budget was chosen and what it costs, and renders the grid of
    calibrated rules from the timing JSON."""
    from condensa.eval.study.report import _timing_md

    grid = [{"label": "gate f=0.125 + Top-θ", "k": 64, "delta_ppl_rel": 0.0234, "tile_fraction": 0.21,
             "kernel_s": 0.004, "speedup_vs_cudnn": 1.87, "max_rel_error": 0.0021}]
    timing = {"base": {
        "batch": 16, "seq_len": 8192, "heads": 6, "head_dim": 64, "k": 64,
        "chosen": {"tile_budget": 0.125, "compensation": "none", "delta_ppl_rel": 0.0234, "gate_delta_ppl_rel": 0.004,
                   "within_limit": True},
        "chosen_decode": {"tile_budget": 0.25, "compensation": "sdc+vmc", "delta_ppl_rel": 0.05,
                          "gate_delta_ppl_rel": 0.03, "within_limit": False},
        "prefill_model": {"dense_cudnn": {"median_s": 0.01}},
        "prefill_attention": {"cudnn_s": 0.0075, "rules": {}, "grid": grid},
        "decode_attention": {"dense_s": {}, "best_dense_s": None, "rules": {}},
    }}
    text = _timing_md(timing)
    assert "dense in every rule" not in text
    assert "layer(s) 0 dense in every rule" in _timing_md({"base": {**timing["base"], "dense_layers": [0]}})
    assert "gate budget f = 0.125 (Δppl of the timed rule 2.34%, compensation none; the gate alone 0.40%)" in text
    assert "decode gate budget f = 0.25" in text and "no budget was within the limit" in text
    assert "| gate f=0.125 + Top-θ | 64 | 2.34% | 21.0% | 4.00 | 1.87× | 0.0021 |" in text


def test_timing_refuses_rules_evaluated_with_other_dense_layers():
    """The timed rules are the evaluated ones: a config whose dense_layers changed since the
    evaluate stage is a clear error, not a silent mismatch."""
    from condensa.cli import load_config
    from condensa.errors import ConfigError
    from condensa.eval.study.config import StudyConfig
    from condensa.eval.study.timing import evaluated_dense_layers

    evaluation = {"corpus": {"rows": [{"label": "Top-θ", "dense_layers": [0]}, {"label": "top-k", "dense_layers": [0]}]}}
    config = load_config(StudyConfig, REPO / "configs/study-tiny.yaml", ["--evaluation.dense_layers", "[0]"])
    assert evaluated_dense_layers(config, "base", evaluation) == (0,)
    plain = load_config(StudyConfig, REPO / "configs/study-tiny.yaml", [])
    with pytest.raises(ConfigError, match="run the evaluate stage again"):
        evaluated_dense_layers(plain, "base", evaluation)
    assert evaluated_dense_layers(plain, "base", {"corpus": {"rows": [{"label": "Top-θ"}]}}) == ()  # older results


def test_the_real_model_section_leads_the_page_above_the_stand_in_study(study, tmp_path):
    from condensa.eval.study import report

    (tmp_path / "results_real_model.md").write_text("# Results\n\n## The real model: marker 7351\n")
    md = report.write(study / "results", tmp_path).read_text()
    assert md.startswith("# Results\n\n## The real model: marker 7351\n")
    assert md.index("marker 7351") < md.index("# Stand-in study") < md.index("## Answers")


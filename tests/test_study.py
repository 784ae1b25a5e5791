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
           "train,evaluate,report", "--out", str(out), "--calibration.ks", "[8]", "--calibration.gate_k", "8", "--timing.k", "8", "--pretrain.train.steps", "20",
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
        assert {"top-k", "Top-θ", "Top-θ + SDC+VMC", "gate f=0.25 + Top-θ"} <= labels
        assert not any(r["compensation"] != "none" for r in ev["wikitext"]["rows"])  # (b) needs no compensation
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


def test_unknown_stage_and_model_are_clear_errors(tmp_path):
    for extra, message in ((["--stages", "trian"], "unknown stage"), (["--models", "nope"], "unknown study model"),
                           (["--calibration.gate_k", "999"], "must be one of calibration.ks"),
                           (["--timing.models", "[base,tlie]"], "unknown study model")):
        done = subprocess.run([sys.executable, "-m", "condensa.eval.study", str(REPO / "configs/study-tiny.yaml"),
                               "--out", str(tmp_path), *extra], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr

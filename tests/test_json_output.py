"""Every JSON file condensa writes is strict JSON: a NaN metric is null, and readers read it back as NaN."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from condensa import jsonio


def strict(text: str):
    """Parses `text` as JSON proper: a bare NaN or Infinity (Python's extension) fails the test."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def test_write_json_spells_non_finite_numbers_as_null(tmp_path):
    from condensa.cli import write_json

    result = {"rows": [{"tile_budget": None, "ppl": float("nan"), "kept_fraction": np.float32("nan"),
                        "layers": [{"topk_mass": float("inf")}]}],
              "per_head": np.array([1.0, -np.inf]), "dense": {"ppl": np.float64(2.5)}}
    write_json(tmp_path / "results.json", result)
    text = (tmp_path / "results.json").read_text()
    assert strict(text) == {"rows": [{"tile_budget": None, "ppl": None, "kept_fraction": None,
                                      "layers": [{"topk_mass": None}]}],
                            "per_head": [1.0, None], "dense": {"ppl": 2.5}}
    # read back: NaN where a number is expected, None where null means none (no gate)
    back = jsonio.loads(text, numbers={"ppl", "kept_fraction", "topk_mass", "per_head"})
    row = back["rows"][0]
    assert row["tile_budget"] is None and math.isnan(row["ppl"]) and math.isnan(row["kept_fraction"])
    assert math.isnan(row["layers"][0]["topk_mass"]) and back["per_head"][0] == 1.0 and math.isnan(back["per_head"][1])


def test_metrics_log_writes_null_and_reads_nan(tmp_path):
    from condensa.train.metrics_log import MetricsLog, read_metrics

    log = MetricsLog(tmp_path)
    log.write({"kind": "eval", "step": 2, "val_loss": float("nan"), "val_ppl": 3.0})
    log.close()
    assert strict((tmp_path / "metrics.jsonl").read_text()) == {"kind": "eval", "step": 2, "val_loss": None,
                                                                  "val_ppl": 3.0}
    (record,) = read_metrics(tmp_path / "metrics.jsonl")
    assert record["kind"] == "eval" and math.isnan(record["val_loss"]) and record["val_ppl"] == 3.0


def test_sweep_results_read_back_nan_only_under_numbers(tmp_path):
    from condensa.cli import write_json
    from condensa.eval.sweep import read_results

    write_json(tmp_path / "r.json", {"rows": [{"method": "topk", "tile_budget": None, "gate_tile_mass": float("nan")}]})
    (row,) = read_results(tmp_path / "r.json")["rows"]
    assert row["tile_budget"] is None and math.isnan(row["gate_tile_mass"])

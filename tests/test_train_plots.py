"""A training run ends with its loss and sparsity curves as PNG files in the run folder, and says where."""

from __future__ import annotations

import numpy as np
from PIL import Image

from condensa.cli import append_jsonl
from condensa.train.plots import report_training_plots


def _png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"), np.float64)
    assert pixels.std() > 5 and len(np.unique(pixels)) > 20  # not blank


def _log(out, records):
    for record in records:
        append_jsonl(out / "metrics.jsonl", record)


def test_loss_and_sparsity_curves_are_drawn_from_the_metrics_and_said(tmp_path, capsys):
    _log(tmp_path, [{"kind": "train", "step": s, "loss": 5.0 / s, "lm_loss": 4.5 / s, "L_conc": 0.5 / s,
                     "L_topk": 0.4 / s, "L_tile": float("nan") if s == 3 else 0.3 / s} for s in range(1, 9)])
    _log(tmp_path, [{"kind": "eval", "step": s, "val_loss": 4.0 / s, "top8_mass": 0.5 + s / 20, "elements_95": 9 - s,
                     "oracle_tile_mass": 0.9, "gate_tile_mass": 0.8} for s in (4, 8)])
    written = report_training_plots(tmp_path)
    assert written == [tmp_path / "loss.png", tmp_path / "sparsity.png"]
    for path in written:
        _png(path)
    assert capsys.readouterr().out == f"plots: {tmp_path / 'loss.png'}, {tmp_path / 'sparsity.png'}\n"


def test_a_run_that_measured_no_concentration_gets_the_loss_curve_only(tmp_path, capsys):
    _log(tmp_path, [{"kind": "train", "step": s, "loss": 3.0 - s / 10, "lm_loss": 3.0 - s / 10, "L_conc": 0.0}
                    for s in range(1, 6)])
    assert report_training_plots(tmp_path) == [tmp_path / "loss.png"]
    assert not (tmp_path / "sparsity.png").exists()
    assert report_training_plots(tmp_path / "no-run") == [] and "no-run" not in capsys.readouterr().out.split(":")[-1]


def test_drawing_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    """A notebook's inline backend must survive a training run and the sweep's figures: switching to
    Agg once stopped every later figure of the quickstart notebook from showing."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # any backend that is not Agg; a notebook's would be the inline one
    try:
        _log(tmp_path, [{"kind": "train", "step": s, "loss": 1.0 / s, "L_topk": 0.1 / s} for s in (1, 2, 3)])
        assert len(report_training_plots(tmp_path)) == 2
        import condensa.eval.plots  # noqa: F401  (switched the backend at import, once)

        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)

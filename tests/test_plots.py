"""Figures say what their numbers count."""

from __future__ import annotations

import numpy as np

import condensa
from condensa import AttentionConfig


def test_heatmap_titles_count_causal_elements_for_sparse_panels_only(tiny_hf_dir, tmp_path, monkeypatch):
    """The dense panel carries no kept fraction (dense keeps every causal element; counting p > 0
    there counts only float32 underflow); a sparse panel names what its fraction is of."""
    from condensa.eval import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    model, _ = condensa.load_pretrained(tiny_hf_dir)
    blocks = np.arange(32, dtype=np.int32)[None] % 90
    panels = {"dense": None, "top-k, k=4": (AttentionConfig(mode="topk", k=4), None)}
    plots.plot_attention_heatmaps(model, blocks, panels, layer=0, head=0, path=tmp_path / "maps.png")

    dense, topk = (ax.get_title() for ax in figures[0].axes[:2])
    assert dense == "dense"
    title, kept = topk.split("\n")
    assert title == "top-k, k=4" and kept.startswith("kept ") and kept.endswith("% of the causal elements")
    assert 0 < float(kept.split()[1].rstrip("%")) < 100

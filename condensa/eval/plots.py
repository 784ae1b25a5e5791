"""The sweep's figures, drawn straight to files (condensa.figures: no display, no pyplot).

- perplexity vs kept fraction of attention elements, one line per rule (points are the ks);
- thresholds θ vs row length, one panel per layer (the mean over heads, one line per k);
- attention heatmaps of one layer and head: dense next to the sparse rules;
- kept V rows per decoding step (`generate`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from condensa.attention import AttentionConfig
from condensa.eval.sweep import layer_probs
from condensa.figures import new_figure, save_figure


def plot_ppl_vs_kept(results: dict, path: Path) -> Path:
    """One line per rule label through its (kept fraction, perplexity) points, dense as a level."""
    fig, ax = new_figure(figsize=(7, 4.5))
    lines: dict[str, list[dict]] = {}
    for row in results["rows"]:
        lines.setdefault(row["label"], []).append(row)
    for label, rows in lines.items():
        rows = sorted(rows, key=lambda r: r["kept_fraction"])
        x = [r["kept_fraction"] for r in rows]
        ax.plot(x, [r["ppl"] for r in rows], marker="o", label=label)
        for r in rows:
            ax.annotate(f"k={r['k']}", (r["kept_fraction"], r["ppl"]), fontsize=6, alpha=0.6,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(results["dense"]["ppl"], color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("kept fraction of attention elements")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity vs kept attention")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_thresholds(thresholds_by_k: dict, path: Path) -> Path:
    """θ[l, ·, n] against the row length n (mean over heads, with the head range shaded), for n > k."""
    any_th = next(iter(thresholds_by_k.values()))
    n_layer = any_th.n_layer
    cols = min(n_layer, 4)
    rows = math.ceil(n_layer / cols)
    fig, axes = new_figure(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for layer in range(n_layer):
        ax = axes[layer // cols][layer % cols]
        for k, th in sorted(thresholds_by_k.items()):
            theta = np.asarray(th.theta[layer], np.float64)  # [H, N]
            n = np.arange(1, theta.shape[-1] + 1)
            sparse = n > th.k_for(layer)
            if not sparse.any():
                continue
            line = ax.plot(n[sparse], theta.mean(axis=0)[sparse], label=f"k={k}")[0]
            ax.fill_between(n[sparse], theta.min(axis=0)[sparse], theta.max(axis=0)[sparse],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("row length n")
        ax.set_ylabel("θ (scaled logit)" if any_th.placement == "pre" else "θ (probability)")
        ax.grid(True, alpha=0.3)
    for extra in range(n_layer, rows * cols):
        axes[extra // cols][extra % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("calibrated thresholds (mean over heads; band: head range)", y=1.03)
    return save_figure(fig, path)


def plot_attention_heatmaps(model, blocks, panels: dict, *, layer: int, head: int, path: Path) -> Path:
    """Attention probabilities of one layer and head on the first block, one panel per rule.

    panels: title -> (AttentionConfig, Thresholds) or None for dense. Colours are log10(p), so
    dropped elements (p = 0) show as the background. A sparse panel's title gives the share of the
    causal elements it keeps; the dense panel's gives none, since dense keeps them all and a count
    of p > 0 there would only count the probabilities too small for float32.
    """
    fig, axes = new_figure(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    floor = -6.0
    for ax, (title, spec) in zip(axes[0], panels.items()):
        attention, thresholds = spec if spec is not None else (AttentionConfig(), None)
        probs = layer_probs(model, blocks, attention, thresholds)
        p = np.asarray(probs[layer][0, head], np.float64)
        shown = np.where(p > 0, np.log10(np.maximum(p, 10**floor)), np.nan)
        image = ax.imshow(shown, cmap="viridis", vmin=floor, vmax=0, interpolation="nearest")
        if spec is None or attention.for_layer(layer).is_dense:
            ax.set_title(title, fontsize=8)
        else:
            kept = float((p > 0).sum() / np.tril(np.ones_like(p)).sum())
            ax.set_title(f"{title}\nkept {kept:.1%} of the causal elements", fontsize=8)
        ax.set_facecolor("white")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="log10 p")
    fig.suptitle(f"layer {layer}, head {head}", fontsize=9)
    return save_figure(fig, path)


def plot_decode_v_rows(result: dict, path: Path) -> Path:
    """Kept fraction of V rows at each decoding step (mean over layers and heads, and per layer)."""
    steps = result["steps"]
    lengths = [s["row_length"] for s in steps]
    fig, ax = new_figure(figsize=(6, 3.8))
    per_layer = np.asarray([s["per_layer"] for s in steps])  # [steps, L]
    for layer in range(per_layer.shape[1]):
        ax.plot(lengths, per_layer[:, layer], linewidth=1, alpha=0.6, label=f"layer {layer}")
    ax.plot(lengths, [s["v_rows_fraction"] for s in steps], color="black", linewidth=2, label="mean")
    ax.set_xlabel("cached keys (row length)")
    ax.set_ylabel("kept fraction of V rows")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"decoding: token agreement with dense greedy {result['token_agreement']:.2f}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)

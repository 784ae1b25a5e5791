"""The curves of a training run, drawn from its metrics.jsonl at the end of the run.

- `loss.png`: the optimised loss, the language-model loss and the weighted concentration loss of
  the training batches, and the validation loss at each evaluation;
- `sparsity.png`: how concentrated attention became, one panel per metric: the evaluations'
  top-k mass, elements to 95% of a row's mass and tile masses (dense model, validation text), and
  each concentration loss on the training batches (unweighted).

Drawn from the file rather than from the loop's memory, so a resumed run plots its whole history.
matplotlib is imported when a plot is drawn (condensa.figures: files only, the global backend left
alone), so importing the training loop stays fast.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from condensa.figures import new_figure, save_figure
from condensa.train.metrics_log import read_metrics

LOSS_KEYS = ("loss", "lm_loss", "L_conc")  # the training records' losses on loss.png
CONCENTRATION_LOSSES = ("L_topk", "L_tile", "L_gate", "L_select")  # unweighted, on sparsity.png
EVAL_SPARSITY = re.compile(r"top\d+_mass|elements_95|oracle_tile_mass|gate_tile_mass")


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
    points = [(s, v) for s, v in points if isinstance(v, (int, float)) and math.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def write_training_plots(out: str | Path) -> list[Path]:
    """Writes OUT/loss.png and, when the run measured any concentration, OUT/sparsity.png from
    OUT/metrics.jsonl; returns the files written (none without training records)."""
    out = Path(out)
    path = out / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    if not any(r.get("kind") == "train" for r in records):
        return []
    written = []
    fig, ax = new_figure(figsize=(6.4, 4))
    for key in LOSS_KEYS:
        steps, values = _series(records, "train", key)
        if steps:
            ax.plot(steps, values, label=key, linewidth=1.2)
    steps, values = _series(records, "eval", "val_loss")
    if steps:
        ax.plot(steps, values, "o-", label="val_loss", color="black")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (lm_loss in nats per token)")
    ax.set_title("training loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    written.append(save_figure(fig, out / "loss.png"))

    panels = []
    eval_keys = sorted({k for r in records if r.get("kind") == "eval" for k in r if EVAL_SPARSITY.fullmatch(k)})
    for key in eval_keys:
        panels.append((key, "validation, dense model", *_series(records, "eval", key)))
    for key in CONCENTRATION_LOSSES:
        panels.append((key, "training batches, unweighted", *_series(records, "train", key)))
    panels = [p for p in panels if p[2]]
    if panels:
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = new_figure(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        for ax, (key, where, steps, values) in zip(axes.flat, panels):
            ax.plot(steps, values, "o-" if len(steps) < 20 else "-", linewidth=1.2, markersize=3)
            ax.set_title(f"{key}\n({where})", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        fig.suptitle("attention concentration", fontsize=10)
        fig.tight_layout()
        written.append(save_figure(fig, out / "sparsity.png"))
    return written


def report_training_plots(out: str | Path) -> list[Path]:
    """`write_training_plots`, and a line that says where they went."""
    written = write_training_plots(out)
    if written:
        print(f"plots: {', '.join(str(p) for p in written)}", flush=True)
    return written

"""Stages 1 and 2: pretrain the stand-in, then fine-tune copies of it with the concentration losses.

`ensure_model` is what every later stage calls: it returns a model's HF export, training it
first when the output folder lacks one. Training is seeded and its data order is fixed, so a
stage started on a fresh machine retrains the same model (`condensa.train` also resumes a run
that was cut off).
"""

from __future__ import annotations

import time
from pathlib import Path

from condensa.eval.perplexity import perplexity
from condensa.eval.study.config import BASE, StudyConfig
from condensa.eval.study.data import held_out
from condensa.model import load_pretrained
from condensa.train.loop import train
from condensa.train.metrics_log import read_metrics


def export_dir(config: StudyConfig, name: str) -> Path:
    return Path(config.out) / "models" / name / "hf"


def ensure_model(config: StudyConfig, name: str) -> Path:
    """The HF directory of model `name`, trained (and its base first) if it is not there yet."""
    hf = export_dir(config, name)
    if (hf / "model.safetensors").is_file():
        return hf
    if name != BASE:
        ensure_model(config, BASE)

    cfg = config.train_config(name)
    start = time.perf_counter()
    train(cfg)
    (Path(cfg.out) / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return hf


def training_summary(config: StudyConfig, name: str) -> dict:
    """What the run's metrics.jsonl says at its end: validation loss and ppl, the concentration
    metrics of the last evaluation, and throughput."""
    run = Path(config.out) / "models" / name
    records = read_metrics(run / "metrics.jsonl")
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind") == "train"]
    cfg = config.train_config(name)
    seconds = run / "train_seconds.txt"
    return {
        "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
        "tokens": cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len * cfg.optimizer.grad_accum,
        "losses": {loss: getattr(cfg.loss, loss).weight for loss in ("topk", "tile", "gate")},
        "tile_f": cfg.loss.tile.f, "topk_k": cfg.loss.topk.k,
        "final_eval": evals[-1] if evals else {},
        "first_eval": evals[0] if evals else {},
        "tokens_per_s": trains[-1]["tokens_per_s"] if trains else None,
        "train_seconds": float(seconds.read_text()) if seconds.is_file() else None,
    }


def run(config: StudyConfig, names: list[str], progress=None) -> dict:
    """Trains (or finds) each model and measures its dense perplexity on both held-out sets."""
    sets = held_out(config)
    out = {}
    for name in names:
        hf = ensure_model(config, name)
        model, _ = load_pretrained(hf)
        entry = training_summary(config, name)
        entry["dense_ppl"] = {
            split: perplexity(model, ids, batch_size=config.evaluation.batch_size)["ppl"] for split, ids in sets.items()
        }
        out[name] = entry
        if progress:
            progress(f"{name}: corpus ppl {entry['dense_ppl']['corpus']:.2f}, wikitext ppl {entry['dense_ppl']['wikitext']:.2f}")
    return out

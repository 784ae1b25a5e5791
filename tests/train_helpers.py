"""Small shared pieces of the training tests: a tiny, fast run config on real corpus text."""

from __future__ import annotations

from tests.conftest import CORPUS_DIR, TOKENIZER_DIR, require_shared


def tiny_args(out, steps: int, *extra: str) -> list[str]:
    """Overrides for a tiny from-scratch run (d = 32, T = 32, 255 + 1 tokens, topk loss on).

    The resume and data-parallel tests use the same settings so that they share compiled steps."""
    return [
        "--out", str(out), "--init", "scratch", "--model_config", "tiny",
        "--model_overrides", "{n_embd: 32, n_positions: 32}",
        "--data.source", str(require_shared(CORPUS_DIR / "misc" / "inaugural.txt")),
        "--data.tokenizer", str(require_shared(TOKENIZER_DIR)),
        "--data.seq_len", "32", "--data.vocab_limit", "256", "--data.cache_dir", str(out.parent / "token-cache"),
        "--optimizer.lr", "3e-3", "--optimizer.warmup_steps", "5",
        "--train.steps", str(steps), "--train.batch_size", "8", "--train.log_every", "1",
        "--train.eval_every", str(steps), "--train.eval_batches", "2", "--loss.tile_size", "8",
        # No dropout, no remat: each costs seconds of XLA compile time on a CPU, and each test
        # here compiles once per config (runs with equal configs in one process share the step).
        "--dropout", "0", "--train.remat", "false", "--loss.topk.weight", "0.1", "--checkpoint.every", "15",
        *extra,
    ]


def tiny_config(out, steps: int, *extra: str):
    from condensa.cli import load_config
    from condensa.train.config import TrainConfig

    return load_config(TrainConfig, None, tiny_args(out, steps, *extra))


def read_jsonl(path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""Does an exported directory mean the same network in transformers? Logits side by side.

`save_pretrained` promises a directory that transformers (`GPT2LMHeadModel`) loads with nothing
missing; this checks the numbers as well, on real tokens, with PyTorch on the CPU in float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from condensa.errors import CondensaError

SAMPLE_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity."
)


def sample_ids(tokenizer, n_positions: int, kept_ids: np.ndarray | None = None, other_id: int | None = None,
               max_tokens: int = 32) -> np.ndarray:
    """A few real tokens [1, T] in the model's ids (through the vocab map of a vocab-limited model)."""
    ids = np.asarray(tokenizer(SAMPLE_TEXT)["input_ids"][: min(max_tokens, n_positions)], np.int64)
    if kept_ids is not None:
        lookup = {int(t): i for i, t in enumerate(np.asarray(kept_ids))}
        ids = np.asarray([lookup.get(int(t), other_id) for t in ids], np.int64)
    return ids[None]


def transformers_logits(directory: str | Path, ids: np.ndarray) -> np.ndarray:
    """Logits [B, T, vocab] of `AutoModelForCausalLM.from_pretrained(directory)` (torch, CPU, float32):
    `GPT2LMHeadModel` for a GPT-2 directory."""
    try:
        import torch
    except ImportError:
        raise CondensaError(
            "--verify reloads the export in transformers, which needs PyTorch: `pip install torch` (the CPU "
            "wheel is enough), or export without --verify."
        ) from None
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # a bar per reload would clutter the CLI's output
    hf = AutoModelForCausalLM.from_pretrained(str(directory)).float().eval()
    with torch.no_grad():
        return hf(torch.as_tensor(ids)).logits.numpy()


def max_logit_difference(model, directory: str | Path, ids: np.ndarray) -> float:
    """max |condensa logits - transformers logits| over `ids` [B, T]; `model` runs dense attention."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    # Full float32 matmuls: on GPUs JAX's default precision (TF32) alone moves logits by ~1e-3.
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(nnx.jit(lambda m, x: m(x).logits)(model, jnp.asarray(ids, jnp.int32)), np.float64)
    theirs = transformers_logits(directory, ids).astype(np.float64)
    if ours.shape != theirs.shape:
        raise CondensaError(f"transformers gives logits of shape {theirs.shape} for {directory}, condensa "
                            f"{ours.shape}; the export is not the same network.")
    return float(np.abs(ours - theirs).max())

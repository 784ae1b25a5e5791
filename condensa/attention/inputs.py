"""`AttentionInputs`: one layer's q and k, which a model returns instead of its probabilities when
a loss computes what it needs from them with a fused kernel (`condensa.sparsity.loss_from_qk`)."""

from __future__ import annotations

from typing import NamedTuple

import jax


class AttentionInputs(NamedTuple):
    """q and k [B, T, H, D] (k repeated to q's heads under GQA, rotated under RoPE) and the
    score scale: the layer's logits are `scale · q kᵀ`."""

    q: jax.Array
    k: jax.Array
    scale: float

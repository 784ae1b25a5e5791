"""The output layer's logits, with the vocabulary padded to a multiple of 128 for the matmul.

GPT-2's 50,257 tokens give the output matmul an odd N dimension, for which cuBLAS picks much
slower kernels. Padding the weight with zero rows for the product and slicing the logits back gives
the same numbers and leaves the parameters, checkpoints and exports as they are (the step time it
saves is in docs/benchmarks.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAD_MULTIPLE = 128
PAD_LOGIT = -1e9  # the padding columns' logit with keep_padding: exp(-1e9 - max) is exactly 0


def vocab_logits(hidden: jax.Array, weight: jax.Array, dtype, *, keep_padding: bool = False) -> jax.Array:
    """`hidden [..., d] @ weight[vocab, d]ᵀ` in `dtype`, computed over a padded vocabulary.

    keep_padding: return the padded logits, the padding columns pushed to -1e9 (a softmax gives
    them 0). A training loss takes these: slicing them off costs a pad of the [tokens, vocab]
    gradient in the backward pass, and masking them with a select a pass over the logits; a
    constant bias row instead is added in the matmul's epilogue.
    """
    vocab = weight.shape[0]
    pad = (-vocab) % PAD_MULTIPLE
    w = jnp.pad(weight, ((0, pad), (0, 0))) if pad else weight
    logits = jnp.einsum("...d,vd->...v", hidden.astype(dtype), w.astype(dtype))
    if not pad:
        return logits
    if keep_padding:
        return logits + jnp.where(jnp.arange(vocab + pad) < vocab, 0.0, PAD_LOGIT).astype(logits.dtype)
    return logits[..., :vocab]

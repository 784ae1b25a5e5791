"""Rotary position embeddings (RoPE) as Hugging Face's LLaMA computes them.

The inverse frequencies depend only on the config, so they are a NumPy constant (folded into the
compiled program); the angles `position * inv_freq` and their cos / sin are computed in float32
per call, since positions are data (left padding, the KV cache offset). Rotation uses HF's
"rotate half" layout (dimension i pairs with i + D/2), not the interleaved one of the original
Meta code: HF checkpoints permute q_proj / k_proj for it, so their weights need no change here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, rope: dict) -> np.ndarray:
    """inv_freq [head_dim / 2] float32 for `rope` = `config.rope_parameters` (default, linear, llama3)."""
    base = float(rope["rope_theta"])
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)  # float32 like torch's
    rope_type = rope["rope_type"]
    if rope_type == "linear":  # position interpolation: the same as dividing positions by the factor
        return (inv_freq / np.float32(rope["factor"])).astype(np.float32)
    if rope_type == "llama3":  # Llama 3.1: stretch the low frequencies, keep the high ones, blend between
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_context = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        return np.where(medium, blended, scaled).astype(np.float32)
    return inv_freq


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin float32 [B, T, D] for integer positions [B, T] (each frequency used twice, as in HF)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, H, D] by the angles of its positions; computed in float32, returned in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)

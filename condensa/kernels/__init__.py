"""Pallas kernels, and below them the tile geometry they share with the reference ops
(`condensa.kernels.tiling`). Nothing here imports from condensa but `condensa.errors`
(tests/test_architecture.py); each kernel has a plain jax.numpy twin that defines its contract and
serves as its backward pass."""

from condensa.kernels.backend import resolve_backend
from condensa.kernels.tile_gate_prepass import compact_tile_lists, gate_scores, offdiagonal_keep
from condensa.kernels.toptheta_prefill import PrefillStats, toptheta_prefill
from condensa.kernels.toptheta_reference import toptheta_prefill_reference, visible_v_mean

__all__ = ["PrefillStats", "compact_tile_lists", "gate_scores", "offdiagonal_keep", "resolve_backend",
           "toptheta_prefill", "toptheta_prefill_reference", "visible_v_mean"]

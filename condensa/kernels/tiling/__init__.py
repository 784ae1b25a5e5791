"""Tiles: the geometry of a tiled causal attention matrix, the budget rule, and the tile selectors.

It depends on nothing in condensa but `condensa.errors`, and sits at the bottom with the kernels, so
the reference ops (`condensa.attention`) and the kernels share one definition of which tiles a rule
keeps. The kernels' own tile choice (the Pallas pre-pass, `selector_prepass.py`) is a separate
implementation, tested against `selectors.select_tiles`.
"""

from condensa.kernels.tiling.budget import cap_at_budget
from condensa.kernels.tiling.geometry import (
    diagonal_tiles, mandatory_tiles, optional_tiles, tile_budget, tile_budgets, tile_count, visible_tiles,
)

__all__ = ["cap_at_budget", "diagonal_tiles", "mandatory_tiles", "optional_tiles", "tile_budget", "tile_budgets",
           "tile_count", "visible_tiles"]

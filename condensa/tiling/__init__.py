"""Tiles: the geometry of a tiled causal attention matrix, the budget rule, and the tile selectors.

This package depends on nothing else in condensa, so the reference ops (`condensa.attention`) and
the kernels (`condensa.kernels`) share one definition of which tiles a rule keeps.
"""

from condensa.tiling.budget import cap_at_budget
from condensa.tiling.geometry import (
    diagonal_tiles, mandatory_tiles, optional_tiles, tile_budget, tile_budgets, tile_count, visible_tiles,
)

__all__ = ["cap_at_budget", "diagonal_tiles", "mandatory_tiles", "optional_tiles", "tile_budget", "tile_budgets",
           "tile_count", "visible_tiles"]

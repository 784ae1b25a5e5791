"""The `select` concentration loss: the attention mass outside the tiles a budgeted selector keeps.

The `tile` loss rewards mass inside the *oracle's* tiles, which no kernel can find without the
whole attention. This loss is aligned with the selector the kernels run (`rowmean`, one budget
shared by the heads of a query tile, by default): the selector picks the tiles from q and the key
tiles' means, and the loss is the mass the model puts elsewhere, so training moves attention to
where the selector looks. The choice itself carries no gradient (it is piecewise constant); the
gradient flows through the tile masses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from condensa.attention.inputs import AttentionInputs
from condensa.sparsity.loss import _check_tiles
from condensa.kernels.tiling.selectors import select_tiles


def selected_tiles(x: AttentionInputs, *, block: int, f: float, sink_tiles: int, selector: str,
                   shared_heads: bool, sub_block: int | None = None) -> jax.Array:
    """bool [B, H, n, n]: the tiles the selector keeps at budget f (no gradient)."""
    q, k = jax.lax.stop_gradient(x.q), jax.lax.stop_gradient(x.k)
    return select_tiles(q, k, scale=x.scale, block_q=block, block_k=block, tile_budget=f, sink_tiles=sink_tiles,
                        selector=selector, sub_block=sub_block, shared_heads=shared_heads)


def selector_loss_of_masses(x: AttentionInputs, masses: jax.Array, *, block: int, f: float, sink_tiles: int = 1,
                            selector: str = "rowmean", shared_heads: bool = True,
                            sub_block: int | None = None) -> jax.Array:
    """Mean over heads and query tiles of (1 − mass inside the selector's tiles); `masses` are the
    tile masses M_bt [B, H, n, n] of the same layer (from the probabilities or the mass kernel)."""
    _check_tiles(x.q.shape[1], block)
    kept = selected_tiles(x, block=block, f=f, sink_tiles=sink_tiles, selector=selector, shared_heads=shared_heads,
                          sub_block=sub_block)
    return jnp.mean(1.0 - jnp.where(kept, masses, 0.0).sum(axis=-1))

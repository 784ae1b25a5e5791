"""The fused Pallas pre-pass (`kernels/selector_prepass.py`, interpret mode) against the XLA pre-pass
(`prepass_keep` then `compact_tile_lists`), which the selector tests check against the reference
selectors: the same visit table, entry for entry, including partial last tiles and grouped-query
attention."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from condensa.kernels.selector_prepass import fused_prepass_supported, fused_prepass_table
from condensa.kernels.tile_gate_prepass import compact_tile_lists, prepass_keep

CASES = [  # (length, block_q, block_k, heads, kv heads, selector, shared budget, f)
    (300, 32, 16, 4, 2, "rowmean", True, 0.25),
    (300, 32, 32, 3, 1, "rowmean", False, 0.4),
    (250, 32, 16, 2, 2, "window", False, 0.125),
    (200, 16, 16, 3, 3, "rowmean", True, 0.5),
    (60, 16, 16, 2, 1, "window", False, 0.5),  # fewer key tiles than a list chunk: the table is narrower
    (600, 16, 16, 2, 1, "rowmean", True, 0.25),  # 64 padded key tiles: early query tiles score half of them
]


LAYOUTS = [  # (split_heads, lists_per_head, scatter_lists, radix_bits)
    (True, False, True, 1), (False, False, True, 1), (True, True, True, 1), (True, False, False, 1),
    (True, True, False, 1), (True, False, True, 2), (True, False, True, 4), (False, True, True, 3)]


@pytest.mark.parametrize("split_heads,lists_per_head,scatter_lists,radix_bits", LAYOUTS)
@pytest.mark.parametrize("length,block_q,block_k,heads,kv_heads,selector,shared,f", CASES)
def test_fused_table_equals_the_xla_prepass(length, block_q, block_k, heads, kv_heads, selector, shared, f, split_heads,
                                            lists_per_head, scatter_lists, radix_bits):
    rng = np.random.default_rng(length + heads)
    padded = -(-length // block_q) * block_q

    def padded_input(h):  # zeros past the real length, as the kernel receives its inputs
        x = rng.standard_normal((2, length, h, 16)).astype(np.float32)
        return jnp.pad(jnp.asarray(x), [(0, 0), (0, padded - length), (0, 0), (0, 0)])

    q, k = padded_input(heads) * 1.5, padded_input(kv_heads)
    common = dict(scale=0.25, block_q=block_q, block_k=block_k, length=length, sink_tiles=1, tile_budget=f)
    want = compact_tile_lists(prepass_keep(q, k, None, tile_cap=False, selector=selector, shared_heads=shared, **common))
    got = fused_prepass_table(q, k, selector=selector, shared_heads=shared, backend="interpret",
                              split_heads=split_heads, lists_per_head=lists_per_head, scatter_lists=scatter_lists,
                              radix_bits=radix_bits, register_elements=64, **common)  # several row chunks
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fused_prepass_supports_whole_tiles_on_its_backends_only():
    assert fused_prepass_supported("rowmean", None, 128, "triton")
    assert fused_prepass_supported("window", 128, 128, "interpret")
    assert not fused_prepass_supported("rowmean", 32, 128, "triton")  # sub-blocks: the XLA pre-pass
    assert not fused_prepass_supported("moment", None, 128, "triton")
    assert not fused_prepass_supported("rowmean", None, 128, "mosaic_tpu")


def test_layouts_are_named_on_the_command_line_and_bad_names_are_refused():
    from condensa.kernels.selector_prepass import layout_from_text

    assert layout_from_text("split+lists:1024:cw1:sw8:rb4:chunked") == {
        "split_heads": True, "lists_per_head": True, "register_elements": 1024, "scatter_lists": False,
        "cut_warps": 1, "score_warps": 8, "radix_bits": 4}
    assert layout_from_text("one")["split_heads"] is False
    for bad in ("split:many", "diagonal:2048", "split:2048:cw", "split:2048:fast"):
        with pytest.raises(ValueError, match="pre-pass layout"):
            layout_from_text(bad)
    with pytest.raises(TypeError, match="unknown layout options"):
        fused_prepass_table(jnp.zeros((1, 32, 1, 16)), jnp.zeros((1, 32, 1, 16)), scale=0.25, block_q=16, block_k=16,
                            length=32, sink_tiles=1, tile_budget=0.5, selector="window", shared_heads=False,
                            backend="interpret", warps=4)

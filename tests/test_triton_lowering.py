"""The Triton kernels lower for CUDA on a machine without a GPU.

CI has no GPU, and interpret mode runs a kernel as plain JAX ops, so a primitive that Pallas's
Triton lowering lacks (a slice, say) passes every interpret test and fails only on a lent GPU.
`jax.export` for platform "cuda" runs the Triton lowering here; only the final Triton compile
(register and shared-memory limits) is left to the GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import condensa.kernels.backend as kernel_backend
from condensa.kernels import toptheta_prefill
from condensa.kernels.selector_prepass import fused_prepass_table
from condensa.kernels.toptheta_decode import toptheta_decode

B, T, S, H, HKV, D = 2, 1024, 1024, 4, 2, 64
TRITON_CALL = "__gpu$xla.gpu.triton"


class _GpuPlatform:
    """Stands in for `jax` inside `resolve_backend`, so that backend="triton" is accepted here."""

    @staticmethod
    def default_backend():
        return "gpu"


@pytest.fixture(autouse=True)
def _pretend_gpu(monkeypatch):
    monkeypatch.setattr(kernel_backend, "jax", _GpuPlatform)


def lower_for_cuda(fn, *shapes) -> str:
    """The StableHLO text of `fn` lowered for CUDA; raises what the Triton lowering raises."""
    exported = export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*shapes)
    return exported.mlir_module()


def _spec(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


SELECTIONS = [("rowmean", True), ("rowmean", False), ("window", False)]


@pytest.mark.parametrize("split_heads,lists_per_head,scatter_lists,radix_bits",
                         [(True, False, True, 1), (False, False, True, 1), (True, True, True, 1), (True, False, False, 1),
                          (True, False, True, 4), (True, True, True, 2)])
@pytest.mark.parametrize("selector,shared", SELECTIONS)
def test_fused_prepass_lowers(selector, shared, split_heads, lists_per_head, scatter_lists, radix_bits):
    text = lower_for_cuda(
        lambda q, k: fused_prepass_table(q, k, scale=0.125, block_q=128, block_k=128, length=T, sink_tiles=1,
                                         tile_budget=0.4, selector=selector, shared_heads=shared, backend="triton",
                                         split_heads=split_heads, lists_per_head=lists_per_head,
                                         scatter_lists=scatter_lists, cut_warps=1, radix_bits=radix_bits),
        _spec(B, T, H, D), _spec(B, T, HKV, D))
    assert "tile_selector_prepass" in text and TRITON_CALL in text


@pytest.mark.parametrize("selector,shared", SELECTIONS + [("gate", False)])
def test_gated_prefill_lowers(selector, shared):
    gate = {"tile_theta": jnp.zeros((H, T // 128))} if selector == "gate" else {}
    text = lower_for_cuda(
        lambda q, k, v: toptheta_prefill(q, k, v, scale=0.125, backend="triton", tile_selector=selector,
                                         shared_heads=shared, tile_budget=0.4, block_q=128, block_k=128,
                                         theta=jnp.zeros((H, T)), **gate)[0],
        _spec(B, T, H, D), _spec(B, T, HKV, D), _spec(B, T, HKV, D))
    assert text.count(TRITON_CALL) >= 1


@pytest.mark.parametrize("selector,shared", SELECTIONS)
def test_selector_decode_lowers(selector, shared):
    lengths = np.array([S, S // 2], np.int32)
    text = lower_for_cuda(
        lambda q, k, v, means: toptheta_decode(q, k, v, jnp.asarray(lengths), scale=0.125, k_tile_mean=means,
                                               tile_selector=selector, shared_heads=shared, tile_budget=0.4,
                                               block_k=128, backend="triton")[0],
        _spec(B, 1, H, D), _spec(B, S, HKV, D), _spec(B, S, HKV, D), _spec(B, S // 128, HKV, D, dtype=jnp.float32))
    assert TRITON_CALL in text


# post-softmax Top-θ (two Q·Kᵀ walks) without and behind a budgeted selector; exact SDC without a gate
VARIANTS = {
    "post": dict(placement="post"),
    "post_skip_empty": dict(placement="post", skip_empty=True),
    "post_rowmean_shared": dict(placement="post", tile_selector="rowmean", shared_heads=True, tile_budget=0.4),
    "exact_sdc": dict(sdc_exact=True),
    "exact_sdc_skip_empty": dict(sdc_exact=True, skip_empty=True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_variants_lower(name):
    text = lower_for_cuda(
        lambda q, k, v: toptheta_prefill(q, k, v, scale=0.125, backend="triton", block_q=128, block_k=128,
                                         theta=jnp.full((H, T), 0.01), vmc=True, **VARIANTS[name])[0],
        _spec(B, T, H, D), _spec(B, T, HKV, D), _spec(B, T, HKV, D))
    assert "toptheta_prefill" in text and TRITON_CALL in text

"""AttentionConfig(backend="pallas"): the model runs the Pallas prefill kernel (interpret mode on CPU)
and gives the reference op's numbers, for dense and for calibrated Top-θ with SDC, VMC and the gate,
post-softmax Top-θ (with and without a gate or selector) and exact SDC without a gate."""

from __future__ import annotations

import numpy as np
import pytest

import condensa
from condensa.attention import AttentionConfig
from condensa.eval.perplexity import perplexity
from condensa.sparsity.calibration import GateSpec, calibrate
from tests.conftest import make_hf_model

T = 48  # not a multiple of the 16-wide tiles: the kernel wrapper pads


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("pallas")
    make_hf_model(seed=9, n_positions=T, n_embd=128, n_head=2).save_pretrained(path)  # head_dim 64: the kernel's
    model, _ = condensa.load_pretrained(path)
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 98, size=(8, T))
    thresholds = calibrate(model, blocks, k=6, gate=GateSpec(16, 16, 0.34, 1), batch_size=8, sigma_add=0.0)
    text = rng.integers(0, 98, size=200)
    return model, thresholds, text


CONFIGS = {
    "dense": AttentionConfig(),
    "toptheta": AttentionConfig(mode="toptheta", k=6),
    "toptheta+sdc+vmc+gate": AttentionConfig(mode="toptheta", k=6, sdc="calibrated", vmc=True, tile_gate=True,
                                             block_q=16, block_k=16, tile_budget=0.34),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_perplexity_with_the_kernel_equals_the_reference(setup, name):
    model, thresholds, text = setup
    reference = CONFIGS[name]
    kernel = reference.replace(backend="pallas")
    ref = perplexity(model, text, stride=T // 2, batch_size=4, attention=reference, thresholds=thresholds)
    ker = perplexity(model, text, stride=T // 2, batch_size=4, attention=kernel, thresholds=thresholds)
    assert abs(ker["ppl"] - ref["ppl"]) / ref["ppl"] <= 1e-3
    if name != "dense":  # the rule must really prune, or the comparison proves nothing
        import jax.numpy as jnp

        ids = jnp.asarray(text[:T].reshape(1, T))
        pruned = model(ids, attention=reference, thresholds=thresholds).logits
        assert float(jnp.abs(pruned - model(ids).logits).max()) > 1e-2


def test_logits_match_and_probabilities_fall_back_to_the_reference(setup):
    import jax.numpy as jnp

    model, thresholds, text = setup
    ids = jnp.asarray(text[:T].reshape(1, T))
    config = CONFIGS["toptheta+sdc+vmc+gate"]
    ref = model(ids, attention=config, thresholds=thresholds)
    ker = model(ids, attention=config.replace(backend="pallas"), thresholds=thresholds)
    np.testing.assert_allclose(np.asarray(ker.logits), np.asarray(ref.logits), rtol=1e-5, atol=1e-5)
    # asking for the probabilities runs the reference op, which returns them
    with_probs = model(ids, attention=config.replace(backend="pallas"), thresholds=thresholds, return_attention=True)
    assert len(with_probs.attentions) == model.config.n_layer
    np.testing.assert_allclose(np.asarray(with_probs.logits), np.asarray(ref.logits), rtol=1e-5, atol=1e-5)


def test_a_layer_left_dense_runs_the_fused_dense_path(setup, monkeypatch):
    """`dense_layers` under the Pallas backend: the prefill kernel runs in the other layers only
    (the dense layer takes the fused dense path, cuDNN on a GPU), and the logits stay the reference's."""
    import jax.numpy as jnp

    import condensa.kernels as kernels

    model, thresholds, text = setup
    calls = []
    original = kernels.toptheta_prefill
    monkeypatch.setattr(kernels, "toptheta_prefill", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    config = CONFIGS["toptheta+sdc+vmc+gate"].replace(dense_layers=(0,))
    ids = jnp.asarray(text[:T].reshape(1, T))
    ref = model(ids, attention=config, thresholds=thresholds).logits
    ker = model(ids, attention=config.replace(backend="pallas"), thresholds=thresholds).logits
    np.testing.assert_allclose(np.asarray(ker), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert len(calls) == model.config.n_layer - 1 and all(kw["tile_theta"] is not None for kw in calls)


VARIANTS = {  # the rules the prefill kernel runs beyond calibrated pre-softmax Top-θ
    "post+vmc": AttentionConfig(mode="toptheta", k=6, placement="post", vmc=True),
    "post": AttentionConfig(mode="toptheta", k=6, placement="post"),
    "post+vmc+gate": AttentionConfig(mode="toptheta", k=6, placement="post", vmc=True, tile_gate=True, block_q=16,
                                     block_k=16, tile_budget=0.34),
    "post+rowmean+shared": AttentionConfig(mode="toptheta", k=6, placement="post", tile_gate=True, block_q=16,
                                           block_k=16, tile_budget=0.34, tile_selector="rowmean", sub_block=8,
                                           shared_heads=True),
    "exact+vmc": AttentionConfig(mode="toptheta", k=6, sdc="exact", vmc=True),
    "exact": AttentionConfig(mode="toptheta", k=6, sdc="exact"),
}


@pytest.fixture(scope="module")
def post_thresholds(setup):
    """θ calibrated as probabilities (post-softmax placement), with the gate, on the setup's model."""
    model = setup[0]
    blocks = np.random.default_rng(0).integers(0, 98, size=(8, T))
    return calibrate(model, blocks, k=6, placement="post", gate=GateSpec(16, 16, 0.34, 1), batch_size=8,
                     sigma_add=0.0)


def _count_prefill_calls(monkeypatch) -> list:
    import condensa.kernels as kernels

    calls = []
    original = kernels.toptheta_prefill
    monkeypatch.setattr(kernels, "toptheta_prefill", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    return calls


@pytest.mark.parametrize("name", list(VARIANTS))
def test_post_placement_and_exact_sdc_run_the_kernel(setup, post_thresholds, name, monkeypatch):
    """The Pallas backend runs these rules on the prefill kernel in every layer (no fallback to the
    reference op) and gives the reference backend's logits; the rule really prunes."""
    import jax.numpy as jnp

    from condensa.attention.pallas_backend import kernel_applies

    model, pre_thresholds, text = setup
    config = VARIANTS[name]
    thresholds = post_thresholds if config.placement == "post" else pre_thresholds
    assert kernel_applies(config, 0, causal=True, need_probs=False, dropout=None)
    ids = jnp.asarray(text[:T].reshape(1, T))
    ref = model(ids, attention=config, thresholds=thresholds).logits
    calls = _count_prefill_calls(monkeypatch)
    ker = model(ids, attention=config.replace(backend="pallas"), thresholds=thresholds).logits
    assert len(calls) == model.config.n_layer
    assert all(kw.get("placement", "pre") == config.placement and kw.get("sdc_exact", False) == (config.sdc == "exact")
               for kw in calls)
    np.testing.assert_allclose(np.asarray(ker), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(ref - model(ids).logits).max()) > 1e-2


def test_exact_sdc_behind_a_gate_and_the_tpu_twin_fall_back_to_the_reference(setup, monkeypatch):
    """Exact SDC behind a gate needs the mass of tiles the kernel never reads, and the TPU kernel
    has neither variant: those calls run the reference op, with its logits."""
    import jax.numpy as jnp

    from condensa.attention.pallas_backend import kernel_applies

    model, thresholds, text = setup
    gated = VARIANTS["exact+vmc"].replace(tile_gate=True, block_q=16, block_k=16, tile_budget=0.34)
    assert not kernel_applies(gated, 0, causal=True, need_probs=False, dropout=None)
    ids = jnp.asarray(text[:T].reshape(1, T))
    calls = _count_prefill_calls(monkeypatch)
    ker = model(ids, attention=gated.replace(backend="pallas"), thresholds=thresholds).logits
    assert not calls
    np.testing.assert_allclose(np.asarray(ker), np.asarray(model(ids, attention=gated, thresholds=thresholds).logits),
                               rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("CONDENSA_KERNEL_BACKEND", "tpu_interpret")
    for name in ("post+vmc", "exact+vmc"):
        assert not kernel_applies(VARIANTS[name], 0, causal=True, need_probs=False, dropout=None)
    assert kernel_applies(CONFIGS["toptheta+sdc+vmc+gate"], 0, causal=True, need_probs=False, dropout=None)


@pytest.fixture(scope="module")
def decode_setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("pallas_decode")
    make_hf_model(seed=10, n_positions=96, n_embd=128, n_head=2).save_pretrained(path)
    model, _ = condensa.load_pretrained(path)
    blocks = np.random.default_rng(1).integers(0, 98, size=(8, 96))
    thresholds = calibrate(model, blocks, k=6, gate=GateSpec(16, 16, 0.34, 1), batch_size=8, sigma_add=0.0)
    return model, thresholds


@pytest.mark.parametrize("gate,dense_layers", [(False, ()), (True, ()), (False, (0,))])
def test_generation_with_the_decode_kernel_gives_the_reference_tokens(decode_setup, gate, dense_layers, monkeypatch):
    """Greedy, 64 tokens: every decoding step runs the Pallas decode kernel (interpret mode) on the
    KV cache and its running sums, against the reference op that recomputes them from K and V. A
    layer left dense runs the kernel's dense mode (its tensor-core walk, tiles of 64)."""
    import condensa.kernels.toptheta_decode as decode_module

    traced = []
    original = decode_module.toptheta_decode
    slots = []
    monkeypatch.setattr(decode_module, "toptheta_decode",
                        lambda *a, **kw: traced.append(kw) or slots.append(a[1].shape[1]) or original(*a, **kw))
    model, thresholds = decode_setup
    config = AttentionConfig(mode="toptheta", k=6, sdc="calibrated", vmc=True, tile_gate=gate,
                             block_q=16, block_k=16, tile_budget=0.34, dense_layers=dense_layers)
    prompt = np.random.default_rng(2).integers(0, 98, size=(2, 16))
    reference = condensa.generate(model, prompt, 64, attention=config, thresholds=thresholds)
    kernel = condensa.generate(model, prompt, 64, attention=config.replace(backend="pallas"), thresholds=thresholds)
    np.testing.assert_array_equal(kernel, reference)
    assert len(traced) == model.config.n_layer  # traced once per layer inside the compiled decode loop
    assert all((kw["tile_theta_decode"] is not None) == (gate and i not in dense_layers)
               and (kw["theta"] is None) == (i in dense_layers) for i, kw in enumerate(traced))
    # 16 + 64 = 80 tokens; the cache is rounded up to whole kernel tiles (128), within n_positions = 96
    assert set(slots) == {96}


def test_the_tpu_kernels_run_the_model(setup, monkeypatch):
    """With the TPU backend (here its interpret mode), prefill runs the Mosaic TPU prefill kernel
    with the reference op's perplexity, and greedy decoding runs the TPU decode kernel with the
    reference op's tokens."""
    import condensa.kernels.toptheta_decode_tpu as decode_module
    import condensa.kernels.toptheta_prefill_tpu as tpu_module

    launched, decoded = [], []
    original = tpu_module.launch_tpu
    monkeypatch.setattr(tpu_module, "launch_tpu", lambda *a, **kw: launched.append(1) or original(*a, **kw))
    original_decode = decode_module.launch_decode_tpu
    monkeypatch.setattr(decode_module, "launch_decode_tpu",
                        lambda *a, **kw: decoded.append(1) or original_decode(*a, **kw))
    monkeypatch.setenv("CONDENSA_KERNEL_BACKEND", "tpu_interpret")
    model, thresholds, text = setup
    # a budget no other test uses, so no function compiled for the other backend is reused
    reference = CONFIGS["toptheta+sdc+vmc+gate"].replace(tile_budget=0.3)
    ref = perplexity(model, text, stride=T // 2, batch_size=4, attention=reference, thresholds=thresholds)
    ker = perplexity(model, text, stride=T // 2, batch_size=4, attention=reference.replace(backend="pallas"),
                     thresholds=thresholds)
    assert launched and abs(ker["ppl"] - ref["ppl"]) / ref["ppl"] <= 1e-3
    prompt = np.random.default_rng(3).integers(0, 98, size=(1, 16))
    tokens = condensa.generate(model, prompt, 8, attention=reference.replace(backend="pallas"), thresholds=thresholds)
    np.testing.assert_array_equal(tokens, condensa.generate(model, prompt, 8, attention=reference, thresholds=thresholds))
    assert decoded  # traced inside the compiled decode loop

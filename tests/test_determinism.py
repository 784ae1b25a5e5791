"""train.deterministic: XLA's deterministic-op switch goes into XLA_FLAGS before JAX starts its
backend, or the run is refused with what to do; under the switch, dense attention leaves cuDNN."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest
from jax._src import xla_bridge

from condensa import determinism
from condensa.attention import fused_dense_attention
from condensa.errors import ConfigError

SWITCH = "--xla_gpu_exclude_nondeterministic_ops=true"


def test_the_switch_is_added_to_xla_flags_before_the_backend_starts(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    determinism.require_deterministic_ops()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_backend_optimization_level=0", SWITCH]
    assert determinism.deterministic_ops()


def test_a_started_backend_without_the_switch_is_refused_with_the_command(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    with pytest.raises(ConfigError, match=f"XLA_FLAGS='{SWITCH}' python -m condensa.train"):
        determinism.require_deterministic_ops()


@pytest.mark.parametrize("flags", [SWITCH, "--xla_gpu_deterministic_ops=true"])
def test_a_started_backend_with_either_switch_goes_ahead(flags, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    determinism.require_deterministic_ops()
    assert os.environ["XLA_FLAGS"] == flags


@pytest.mark.parametrize("dtype,flags,implementation", [
    (jnp.bfloat16, "", "cudnn"), (jnp.float16, "", "cudnn"), (jnp.bfloat16, SWITCH, "xla"),
    (jnp.bfloat16, "--xla_gpu_deterministic_ops=true", "xla"), (jnp.float32, "", None)])
def test_dense_attention_leaves_cudnn_under_the_switch_and_in_float32(dtype, flags, implementation, monkeypatch):
    """On a GPU, cuDNN's flash attention for 16-bit inputs; XLA under the switch (cuDNN's kernel
    does not compile there) and for float32 (cuDNN refuses it; asked for 16 bits only, float32
    never depends on that refusal)."""
    asked = []

    def record(q, k, v, implementation=None, **kwargs):
        asked.append(implementation)
        return q

    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    q = jnp.zeros((1, 8, 2, 16), dtype)
    fused_dense_attention(q, q, q, visible=None, scale=0.25, causal=True)
    assert asked == [implementation]


def test_a_deterministic_run_in_a_started_process_without_the_switch_is_refused_before_any_work(tmp_path, monkeypatch):
    from condensa.train.loop import train
    from tests.train_helpers import tiny_config

    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)  # as in any process that computed
    keep = tmp_path / "run" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("mine")
    with pytest.raises(ConfigError, match="train.deterministic"):
        train(tiny_config(tmp_path / "run", 2, "--train.deterministic", "true"))
    assert sorted(p.name for p in keep.parent.iterdir()) == ["notes.txt"] and keep.read_text() == "mine"

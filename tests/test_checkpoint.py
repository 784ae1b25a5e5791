"""Orbax checkpoints: round trip (PRNG keys included), keep-N, and falling back past a corrupt one."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensa.checkpoint import CORRUPT_DIR, Checkpointer, CorruptCheckpointWarning


def _state(scale: float):
    return {
        "params": {"w": jnp.arange(600, dtype=jnp.float32).reshape(20, 30) * scale, "b": jnp.ones(30) * scale},
        "rng": {"key": jax.random.key(int(scale)), "count": jnp.uint32(scale)},
        "layers": [{"x": jnp.full((4,), scale)}, {"x": jnp.full((4,), -scale)}],
    }


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture()
def saved(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3, async_save=True)
    for step in (1, 2, 3, 4):
        ckpt.save(step, _state(step), {"data": {"epoch": 0, "index": step}})
    ckpt.close()
    return tmp_path


def test_round_trip_keeps_the_newest_n(saved):
    ckpt = Checkpointer(saved / "checkpoints", keep=3)
    assert ckpt.steps() == [2, 3, 4]
    step, state, record = ckpt.restore_latest(_state(0))
    assert step == 4 and record["data"] == {"epoch": 0, "index": 4}
    _assert_equal(state, _state(4))
    assert jax.dtypes.issubdtype(state["rng"]["key"].dtype, jax.dtypes.prng_key)


def test_empty_folder_restores_nothing(tmp_path):
    assert Checkpointer(tmp_path / "none").restore_latest(_state(0)) is None


@pytest.mark.parametrize("damage", ["truncate", "garble-metadata"])
def test_corrupt_latest_falls_back_with_a_warning_and_deletes_nothing(saved, damage):
    latest = saved / "checkpoints" / "4"
    files = sorted(p for p in latest.rglob("*") if p.is_file())
    if damage == "truncate":
        for p in files:
            if "/d/" in str(p):  # the array data files
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:
        (latest / "state" / "_METADATA").write_text("{not json")
    before = {p.relative_to(latest) for p in files}

    ckpt = Checkpointer(saved / "checkpoints", keep=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, state, record = ckpt.restore_latest(_state(0))
    assert step == 3 and record["data"]["index"] == 3
    _assert_equal(state, _state(3))
    messages = [str(w.message) for w in caught if issubclass(w.category, CorruptCheckpointWarning)]
    assert len(messages) == 1 and "step 4" in messages[0]

    moved = list((saved / CORRUPT_DIR).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("4-")
    assert {p.relative_to(moved[0]) for p in moved[0].rglob("*") if p.is_file()} == before  # kept whole
    assert ckpt.steps() == [2, 3]
    # Training goes on: the next save of step 4 works and the older checkpoints are untouched.
    ckpt.save(4, _state(4.5), {"data": {}})
    ckpt.close()
    assert Checkpointer(saved / "checkpoints").steps() == [2, 3, 4]

"""Orbax checkpoints: round trip (PRNG keys included), keep-N, and falling back past a corrupt one."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensa.checkpoint import CORRUPT_DIR, Checkpointer, CorruptCheckpointWarning, _fingerprints_match, fingerprint


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


def _cancelling(n: int = 1 << 20) -> np.ndarray:
    """Like an Adam first moment: many elements whose sum nearly cancels."""
    x = np.random.default_rng(0).normal(size=n).astype(np.float32)
    return x - x.mean(dtype=np.float64).astype(np.float32)


def test_the_fingerprint_is_the_same_whatever_order_the_array_is_added_in():
    # On a GPU the same array can be added in another order after a restart (it happened on an H100
    # in a new process): a float sum of a cancelling array then moves by far more than its own size.
    x = _cancelling()
    shuffled = x[np.random.default_rng(1).permutation(x.size)]
    assert np.sum(x, dtype=np.float32) != np.sum(shuffled, dtype=np.float32)  # the order shows in a float sum...
    assert fingerprint({"mu": jnp.asarray(x)}) == fingerprint({"mu": jnp.asarray(shuffled)})  # ...not in the checksum
    assert _fingerprints_match(fingerprint({"mu": jnp.asarray(x)}), {"mu": jnp.asarray(shuffled)})


@pytest.mark.parametrize("damage", ["zero tail", "one element scaled", "one bit flipped", "nan"])
def test_the_fingerprint_rejects_damaged_arrays(damage):
    x = _cancelling()
    y = x.copy()
    if damage == "zero tail":  # a truncated data file read back as zeros
        y[-x.size // 10:] = 0
    elif damage == "one element scaled":  # garbled bytes: one exponent changed
        y[12345] = 1e4
    elif damage == "one bit flipped":  # the lowest mantissa bit of one element
        y.view(np.uint32)[777] ^= 1
    else:
        y[7] = np.nan
    assert not _fingerprints_match(fingerprint({"mu": jnp.asarray(x)}), {"mu": jnp.asarray(y)})


def test_a_fingerprint_saved_as_one_float_sum_per_array_is_still_checked():
    # the format before the checksums, within rounding of the sum of magnitudes
    assert _fingerprints_match({"w": 45.0}, {"w": jnp.arange(10.0)})
    assert not _fingerprints_match({"w": 46.0}, {"w": jnp.arange(10.0)})


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


def test_a_full_disk_while_saving_is_one_error_naming_the_checkpoint_that_is_kept(saved, monkeypatch):
    """What orbax raises when the disk fills (tensorstore's ENOSPC as a ValueError) becomes one
    CheckpointError; the partial save is removed, the complete checkpoints stay, and the reports
    orbax logs from its save threads are dropped (the error says it once)."""
    import logging

    from condensa.checkpoint import PARTIAL
    from condensa.errors import CheckpointError

    full = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x/_sharding\": Failed to write 3922 bytes to "
                      "file 4: No space left on device [os_error_code='28']")
    ckpt = Checkpointer(saved / "checkpoints", keep=3, async_save=True)
    partial = saved / "checkpoints" / f"5.{PARTIAL}"
    (partial / "state").mkdir(parents=True)

    def fail(*args, **kwargs):
        raise full

    monkeypatch.setattr(ckpt._manager, "save", fail)
    with pytest.raises(CheckpointError) as caught:
        ckpt.save(5, _state(5), {"data": {}})
    message = str(caught.value)
    assert message.startswith(f"no space left on the device of {saved / 'checkpoints'} while saving checkpoint step 5")
    assert "the last complete checkpoint, step 4, is kept" in message and "run the same command again" in message
    assert not partial.exists()
    ckpt.close()  # quiet after the reported failure
    assert Checkpointer(saved / "checkpoints").steps() == [2, 3, 4]

    record = logging.LogRecord("absl", logging.ERROR, __file__, 1, "Save Finalize thread failed.", None,
                               (ValueError, full, None))
    other = logging.LogRecord("absl", logging.ERROR, __file__, 1, "something else broke", None, None)
    assert [bool(logging.getLogger("absl").filter(r)) for r in (record, other)] == [False, True]


def test_other_save_failures_keep_their_reason(saved, monkeypatch):
    from condensa.errors import CheckpointError

    ckpt = Checkpointer(saved / "checkpoints", keep=3)
    monkeypatch.setattr(ckpt._manager, "save", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(CheckpointError, match=r"saving checkpoint step 5 to .* failed \(\[Errno 13\] denied\); the last "
                                              r"complete checkpoint, step 4, is kept"):
        ckpt.save(5, _state(5), {"data": {}})
    ckpt.close()


def test_the_reads_a_failed_restore_abandons_are_not_reported_but_other_errors_are(monkeypatch):
    """The two ways tensorstore's abandoned reads surface (an `Event loop is closed` through
    sys.unraisablehook, an unretrieved task error of orbax's through the asyncio logger) are
    dropped; the same kinds of report from anywhere else still go through."""
    import logging
    import sys
    import types

    from condensa.checkpoint import quiet_abandoned_io

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [])
    quiet_abandoned_io()
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    sys.unraisablehook(closed)
    sys.unraisablehook(other)
    assert seen == [other]

    def raised_in(filename: str) -> BaseException:
        namespace = {}
        exec(compile("def read():\n    raise ValueError('OUT_OF_RANGE')\n", filename, "exec"), namespace)
        try:
            namespace["read"]()
        except ValueError as err:
            return err

    def record(err):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Task exception was never retrieved", None,
                                 (type(err), err, err.__traceback__))

    log = logging.getLogger("asyncio")
    orbax_read = raised_in("/site-packages/orbax/checkpoint/_src/serialization/serialization.py")
    assert not log.filter(record(orbax_read))
    assert log.filter(record(raised_in("/home/user/my_code.py")))
    # tensorstore's own futures, with no Python traceback, known by their message
    store_error = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "run/4/": '
                             "No space left on device [os_error_code='28']")
    assert not log.filter(record(store_error))

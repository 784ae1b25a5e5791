"""Training checkpoints through orbax's `CheckpointManager`: keep N, save asynchronously, resume the
latest good one.

A checkpoint holds the train state (parameters, optimizer state, RNG counters) and a small JSON
record (step, data position, a fingerprint of every array). On resume the newest checkpoint is
restored and checked against its fingerprint; one that fails to read or to match is reported by
step, moved aside (never deleted) and the previous one is tried.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from condensa.errors import CheckpointError
from condensa.faults import kill_point

CORRUPT_DIR = "corrupt"  # beside the checkpoints folder; bad checkpoints are moved here, not deleted
PARTIAL = "orbax-checkpoint-tmp"  # in the name of a save orbax has not finished (it renames it when done)
# How a full disk shows through orbax: tensorstore reports ENOSPC as RESOURCE_EXHAUSTED in a ValueError
_DISK_FULL_SIGNS = ("No space left on device", "RESOURCE_EXHAUSTED", "Disk quota exceeded")


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint could not be restored and was skipped."""


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return ".".join(parts)


def flatten(tree) -> tuple[dict[str, Any], Any]:
    """A flat {dotted name: array} dict of a pytree (typed PRNG keys as their uint32 data, since
    orbax stores plain arrays), and the treedef to rebuild it."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {_name(p): (jax.random.key_data(x) if _is_key(x) else x) for p, x in leaves}
    if len(flat) != len(leaves):
        raise ValueError("two leaves of the train state flatten to the same checkpoint name")
    return flat, treedef


def unflatten(flat: dict[str, Any], template) -> Any:
    """The inverse of `flatten`, with the structure (and key types) of `template`."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for p, t in leaves:
        x = flat[_name(p)]
        out.append(jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x)
    return jax.tree_util.tree_unflatten(treedef, out)


@jax.jit
def _digests(flat: dict[str, Any]) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
    def digest(v):
        v = jnp.asarray(v)
        if jnp.issubdtype(v.dtype, jnp.floating):
            bits = jax.lax.bitcast_convert_type(v.astype(jnp.float32), jnp.uint32)
        elif v.dtype.itemsize == 4:  # int32 / uint32 (PRNG key data): their own bits
            bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
        else:
            bits = v.astype(jnp.uint32)
        v = v.astype(jnp.float32)
        return jnp.sum(bits, dtype=jnp.uint32), jnp.sum(v), jnp.sum(jnp.abs(v))
    return {k: digest(v) for k, v in flat.items()}


def _digest(flat: dict[str, Any]) -> dict[str, tuple[int, float, float]]:
    return {k: (int(c), float(t), float(m)) for k, (c, t, m) in jax.device_get(_digests(flat)).items()}


def fingerprint(flat: dict[str, Any]) -> dict[str, int]:
    """A checksum per array: the sum, modulo 2^32, of its elements' float32 bit patterns (one jitted
    call on device). It catches a checkpoint that reads back wrong, which a garbled-but-parseable
    file otherwise would not, down to one flipped bit; and since integer addition is exact, any
    order of adding gives the same checksum (a GPU may add in another order after a restart)."""
    return {k: checksum for k, (checksum, _, _) in _digest(flat).items()}


def _fingerprints_match(saved: dict[str, Any], flat: dict[str, Any]) -> bool:
    """Whether the restored arrays `flat` have the checksums saved with them. A fingerprint written
    before the checksums (a float sum per array) is checked against the float sum, within rounding
    of the sum of magnitudes: the sum alone moves with the order of adding."""
    restored = _digest(flat)
    if saved.keys() != restored.keys():
        return False
    for key, value in saved.items():
        checksum, total, magnitude = restored[key]
        if isinstance(value, float):  # the old format
            if not (np.isfinite(total) and abs(value - total) <= 1e-4 * magnitude + 1e-6):
                return False
        elif value != checksum:
            return False
    return True


def _reason(err: Exception) -> str:
    """The first line of an error message (orbax's can run to pages), or its type."""
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def disk_full(err: BaseException | None) -> bool:
    """Whether an error, or one it was raised from, says the disk (or the quota) is full."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(sign in str(err) for sign in _DISK_FULL_SIGNS):
            return True
        err = err.__cause__ or err.__context__
    return False


class _DropDiskFullReports(logging.Filter):
    """orbax logs a full disk from each of its background save threads, with a traceback each
    (about 450 lines for one save); `Checkpointer` raises it once, as one clear error, instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (disk_full(error) or any(sign in record.getMessage() for sign in _DISK_FULL_SIGNS))


def _is_abandoned_io(unraisable) -> bool:
    exc = unraisable.exc_value
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _from_orbax(error: BaseException | None) -> bool:
    tb = error.__traceback__ if error is not None else None
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _DropAbandonedIO(logging.Filter):
    """asyncio's "Task exception was never retrieved", for the I/O of a failed restore or save."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        # tensorstore's own futures carry no Python traceback: known by their message instead
        return not (error is not None and (_from_orbax(error) or disk_full(error) or "OCDBT database" in str(error)))


def quiet_abandoned_io() -> None:
    """A restore or a save that fails leaves tensorstore reads or writes in flight. Each ends later,
    either by calling back into an asyncio loop that orbax has closed (Python prints `RuntimeError:
    Event loop is closed` through `sys.unraisablehook`) or as a task whose error nobody retrieves
    (asyncio logs it with a traceback): hundreds of lines for one truncated checkpoint or full
    disk, on top of the one message that matters; orbax also logs a full disk from each of its save
    threads. Their results are unwanted, since the operation already failed and the Checkpointer
    raises it once, so exactly those reports are dropped; every other one goes on as before."""
    for logger, report_filter in (("asyncio", _DropAbandonedIO), ("absl", _DropDiskFullReports)):
        log = logging.getLogger(logger)
        if not any(isinstance(f, report_filter) for f in log.filters):
            log.addFilter(report_filter())
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_io", False):
        return

    def hook(unraisable):
        if not _is_abandoned_io(unraisable):
            previous(unraisable)

    hook.drops_abandoned_io = True
    sys.unraisablehook = hook


class Checkpointer:
    """Save / resume for one run's `checkpoints/` folder."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.async_save = async_save
        self._failed = False  # a save failed and was reported: closing stays quiet
        quiet_abandoned_io()  # a background save can fail before this object hears of it
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, enable_async_checkpointing=self.async_save)
        return ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, record: dict[str, Any]) -> None:
        """Starts saving (in the background when async); `record` must be JSON-serialisable."""
        flat, _ = flatten(state)
        record = {**record, "step": int(step), "fingerprint": fingerprint(flat)}
        with self._saving(step):  # an earlier async save that failed surfaces here too
            self._manager.save(
                int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(flat), record=ocp.args.JsonSave(record))
            )
        kill_point("checkpoint-save", step)  # for the fault-injection tests: the save is in flight here

    @contextlib.contextmanager
    def _saving(self, step: int | None):
        """Turns a failed save (a full disk, a folder gone read-only) into one `CheckpointError`
        that names the last complete checkpoint, which stays; the partial save is removed."""
        try:
            yield
        except Exception as err:
            self._failed = True
            partial = sorted(self.directory.glob(f"*{PARTIAL}*"))
            steps = [int(p.name.split(".")[0]) for p in partial if p.name.split(".")[0].isdigit()]
            failed = f"checkpoint step {steps[0]}" if steps else "a checkpoint" if step is None else f"checkpoint step {step}"
            for p in partial:
                shutil.rmtree(p, ignore_errors=True)
            complete = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()] if self.directory.is_dir() else []
            kept = (f"the last complete checkpoint, step {max(complete)}, is kept" if complete
                    else "no checkpoint of this run was complete yet")
            if disk_full(err):
                raise CheckpointError(
                    f"no space left on the device of {self.directory} while saving {failed}; {kept} "
                    "and the partial save was removed. Free some space (or choose an --out on a larger disk) and run "
                    "the same command again: it resumes from the last complete checkpoint.") from None
            raise CheckpointError(
                f"saving {failed} to {self.directory} failed ({_reason(err)}); {kept}. Fix the "
                "folder and run the same command again: it resumes from the last complete checkpoint.") from err

    def restore(self, step: int, template) -> tuple[Any, dict[str, Any]]:
        """(state, record) of checkpoint `step`, read-only: a checkpoint that fails to read or to
        match its fingerprint raises `CheckpointError` and stays where it is.

        `template` is a pytree of arrays (or ShapeDtypeStructs) with the target shapes, dtypes and
        shardings.
        """
        flat_template, _ = flatten(template)
        abstract = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
            for k, v in flat_template.items()
        }
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore())
            )
            flat, record = dict(restored["state"]), dict(restored["record"])
            if not _fingerprints_match(record.get("fingerprint", {}), flat):
                raise CheckpointError("its arrays do not match the fingerprint saved with them")
        except Exception as err:  # orbax / tensorstore raise many types for truncated or garbled files
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is truncated or corrupt ({_reason(err)})."
            ) from err
        return unflatten(flat, template), record

    def restore_latest(self, template) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, record) of the newest checkpoint that reads back intact, or None if none.

        Bad checkpoints are moved to `<checkpoints>/../corrupt/` with a warning (see `restore`).
        """
        for step in reversed(self.steps()):
            try:
                state, record = self.restore(step, template)
            except CheckpointError as err:
                self._set_aside(step, err.__cause__ or err)
                continue
            return step, state, record
        return None

    def _set_aside(self, step: int, err: Exception) -> None:
        target = self.directory.parent / CORRUPT_DIR / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        self._manager.close()
        shutil.move(str(self.directory / str(step)), str(target))
        self._manager = self._open()  # re-scan, so the manager forgets the moved step
        warnings.warn(
            f"checkpoint step {step} in {self.directory} is truncated or corrupt ({_reason(err)}); it was moved to "
            f"{target} and the previous checkpoint is used instead.",
            CorruptCheckpointWarning,
            stacklevel=3,
        )

    def wait(self) -> None:
        """Blocks until background saves are on disk: call before exit, or a save may be lost."""
        with self._saving(None):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for background saves, then lets go of the folder. After a save failure that was
        already raised, the rest of the same failure is not raised again."""
        if self._failed:
            with contextlib.suppress(Exception):
                self._manager.close()
            return
        with self._saving(None):
            self._manager.wait_until_finished()
        self._manager.close()

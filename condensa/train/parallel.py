"""Data parallelism through `jax.sharding`: a `Mesh` with one `data` axis.

The batch is split over the `data` axis; parameters and optimizer state are replicated, or with
`mesh.fsdp` sharded along their largest divisible dimension (XLA inserts the all-gathers and
reduce-scatters, so there is no hand-written collective).

Several hosts (a TPU pod, several GPU nodes): start the same command on every host after
`jax.distributed.initialize()` (coordinator address, process count and id come from the
environment on TPU and SLURM, or as arguments). `jax.devices()` then lists every host's devices,
the mesh spans them all, and each process feeds its own slice of the global batch through
`jax.make_array_from_process_local_data`. Set `CONDENSA_DISTRIBUTED=1` to make
`python -m condensa.train` call `jax.distributed.initialize()` before anything else.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from condensa.errors import ConfigError


def make_mesh(n_data: int = 0) -> Mesh:
    devices = jax.devices()
    n = n_data or len(devices)
    if n > len(devices):
        raise ConfigError(f"mesh.data={n} asks for more devices than the {len(devices)} available; lower it.")
    return Mesh(np.asarray(devices[:n]), ("data",))


def check_batch(mesh: Mesh, batch_size: int) -> None:
    n = mesh.shape["data"]
    if batch_size % n:
        raise ConfigError(
            f"train.batch_size={batch_size} does not split over {n} devices; use a multiple of {n}."
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[accum, batch, T+1] micro-batches: the batch dimension goes over `data`."""
    return NamedSharding(mesh, P(None, "data"))


def state_shardings(state, mesh: Mesh, fsdp: bool = False):
    """Replicated shardings for every leaf, or FSDP: the largest dimension divisible by the axis size."""
    n = mesh.shape["data"]

    def spec(x):
        shape = getattr(x, "shape", ())
        if fsdp and n > 1:
            dims = [d for d in np.argsort(shape)[::-1] if shape[d] % n == 0 and shape[d] >= n]
            if dims:
                parts = [None] * len(shape)
                parts[dims[0]] = "data"
                return NamedSharding(mesh, P(*parts))
        return NamedSharding(mesh, P())

    return jax.tree.map(spec, state)


def put_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host batch as a global array. With several processes each passes its own rows."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    rows = batch.shape[1] // jax.process_count()
    local = batch[:, jax.process_index() * rows : (jax.process_index() + 1) * rows]
    return jax.make_array_from_process_local_data(sharding, local, batch.shape)

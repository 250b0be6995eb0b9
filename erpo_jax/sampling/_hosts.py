"""Rows across processes: the multi-host side of a row-sharded batch.

With ``jax.distributed`` every process feeds only its own rows. A batch is a
global ``jax.Array`` whose row axis is sharded over the mesh's ``(data,
fsdp)`` axes, and the devices of process ``i`` hold rows
``[i * B_local, (i + 1) * B_local)``: global arrays are assembled from the
local rows with ``jax.make_array_from_process_local_data`` and read back
shard by shard, so no process ever gathers another's rows (no ``np.asarray``
of a global array).

The helpers are exact no-ops on one process.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

__all__ = [
    "check_row_hosts",
    "global_max",
    "global_rows",
    "local_rows",
    "multihost",
    "row_axes",
    "row_shards",
]

_ROW_AXES = ("data", "fsdp")


def multihost(mesh: Any) -> bool:
    """Whether batches on ``mesh`` are fed per process (a mesh and several processes)."""
    return mesh is not None and jax.process_count() > 1


def row_axes(mesh: Any) -> tuple[str, ...]:
    """The mesh axes batch rows are sharded over: ``(data, fsdp)``, those present."""
    return tuple(a for a in _ROW_AXES if a in mesh.axis_names)


def row_shards(mesh: Any) -> int:
    """How many blocks the rows are split into (the product of :func:`row_axes`)."""
    return math.prod(mesh.shape[a] for a in row_axes(mesh))


def _row_spec(mesh: Any, ndim: int) -> PartitionSpec:
    return PartitionSpec(row_axes(mesh) or None, *([None] * (ndim - 1)))


def check_row_hosts(mesh: Any, *, who: str) -> None:
    """Raises ``ValueError`` unless each process owns a distinct block of the row shards.

    A process's rows live on its own devices only when the row axes
    ``(data, fsdp)`` are split across the processes; a mesh that spreads a
    process's devices over ``tensor`` alone would need every process to feed
    the same rows.
    """
    if not multihost(mesh):
        return
    procs = jax.process_count()
    shards = row_shards(mesh)
    if shards % procs:
        raise ValueError(
            f"{who}: with {procs} processes the mesh's row axes (data x fsdp = {shards}) must be "
            f"a multiple of the process count, so that each process feeds its own rows; put "
            f"the devices of different hosts on mesh.data or mesh.fsdp, not mesh.tensor"
        )


def global_rows(mesh: Any, local: Any) -> jax.Array:
    """The global array whose rows are every process's ``local`` rows, in process order.

    Its rows are sharded over ``(data, fsdp)``; ``local`` must have the same
    shape on every process. Typed PRNG key arrays are assembled from their
    raw key data.
    """
    if isinstance(local, jax.Array) and jax.dtypes.issubdtype(local.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(local)
        data = global_rows(mesh, np.asarray(jax.random.key_data(local)))
        return jax.random.wrap_key_data(data, impl=impl)
    local = np.asarray(local)
    sharding = NamedSharding(mesh, _row_spec(mesh, local.ndim))
    return jax.make_array_from_process_local_data(sharding, local)


def local_rows(x: Any) -> np.ndarray:
    """This process's rows of a row-sharded array, as NumPy (the whole array on one process).

    Reads only the addressable shards: replicas of a block (over ``tensor``)
    are taken once, blocks are ordered by their first row.
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    blocks: dict[int, Any] = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start if x.ndim else 0
        blocks.setdefault(start or 0, shard.data)
    return np.concatenate([np.asarray(blocks[s]) for s in sorted(blocks)], axis=0)


def global_max(value: int) -> int:
    """The largest ``value`` over all processes (``value`` itself on one process)."""
    if jax.process_count() == 1:
        return int(value)
    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))

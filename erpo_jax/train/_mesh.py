"""The device mesh (data, fsdp, tensor) and the sharding rules, defined once.

Parameters (and with them the optimizer state, which ``tx.init`` builds
with the parameters' shardings) follow ``erpo_jax.models.param_partition_spec``:
matmul weights shard their input side over ``fsdp`` and their output side
over ``tensor``; norms, biases and LoRA adapters are replicated. Batches
shard their row axis over ``(data, fsdp)``. Multi-host inputs are assembled
with ``jax.make_array_from_process_local_data`` from each process's rows.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from erpo_jax.models import param_partition_spec
from erpo_jax.train._config import ConfigError, MeshConfig

__all__ = [
    "AXES",
    "batch_sharding",
    "global_batch",
    "make_mesh",
    "place_params",
    "place_state",
    "residual_sharding",
]

AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")


def make_mesh(cfg: MeshConfig, devices: list[Any] | None = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices).

    Raises:
      ConfigError: the axes do not fit the device count (names the keys).
    """
    devices = list(jax.devices()) if devices is None else list(devices)
    shape = cfg.shape(len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


def _names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """Parameter names along a pytree path (``nnx.State`` adds a trailing ``.value``)."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def param_sharding(tree: Any, mesh: Mesh, *, head_dim: int | None = None) -> Any:
    """A ``NamedSharding`` per leaf of a parameter pytree (nnx.State or dict).

    ``head_dim`` (the model's) keeps tensor-parallel splits of the attention
    projections to whole heads (see ``param_partition_spec``).
    """

    def one(path, leaf):
        spec = param_partition_spec(_names(path), np.shape(leaf), mesh, head_dim=head_dim)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same value on every process) placed with ``sharding``.

    On one process a ``device_put``. With several processes, each builds only
    the shards its own devices hold, from its host copy of ``x``.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_params(tree: Any, mesh: Mesh, *, head_dim: int | None = None) -> Any:
    """``tree`` placed on ``mesh`` by the parameter rules (whole heads with ``head_dim``).

    Multi-host: every process passes the same values (e.g. loaded from the
    same checkpoint) and keeps only its devices' shards.
    """
    return jax.tree.map(_put, tree, param_sharding(tree, mesh, head_dim=head_dim))


def place_state(state: Any, mesh: Mesh) -> Any:
    """A train state on ``mesh``: placed leaves kept, the rest (step and
    optimizer counters) replicated, so every update call sees the same input
    shardings and the step compiles once."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: (
            x if isinstance(getattr(x, "sharding", None), NamedSharding) else _put(x, replicated)
        ),
        state,
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over ``(data, fsdp)``, other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def residual_sharding(mesh: Mesh, *, sequence_parallel: bool = True) -> NamedSharding | None:
    """The training forward's residual-stream sharding, for ``Decoder(residual_sharding=...)``.

    Rows over ``(data, fsdp)``, and with ``sequence_parallel`` and a tensor
    axis > 1, the sequence over ``tensor`` (sequence parallelism). None on a
    mesh with neither (one device, or tensor parallelism alone without it).

    Pinning the rows matters on an ``fsdp`` mesh even without sequence
    parallelism: the weights' input side is split over ``fsdp`` too, and
    left to itself XLA's sharding propagation met that split halfway, running
    a micro-batch's matmuls with its rows whole on every device and the
    contraction split, then all-reducing ``[B, S, 6144]`` activations
    (Qwen3-1.7B on fsdp=8: 52.7 GiB of update temporaries a device). Pinned,
    each device keeps its own rows and gathers the weights, as FSDP means
    (21.0 GiB).
    """
    seq = "tensor" if sequence_parallel and mesh.shape["tensor"] > 1 else None
    if seq is None and mesh.shape["data"] * mesh.shape["fsdp"] == 1:
        return None
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), seq, None))


def global_batch(local: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of each entry (no host gather anywhere).

    Raises:
      ConfigError: an entry's rows do not divide over the ``data * fsdp`` devices.
    """
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        rows = value.shape[0] * jax.process_count()
        if rows % shards:
            raise ConfigError(
                f"batch entry {key!r} has {rows} rows, which do not divide over "
                f"mesh.data*mesh.fsdp={shards} devices; choose rollout.prompts_per_step "
                "(and the micro-batch split) to be a multiple of it"
            )
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out

"""Device mesh, shardings and host batch -> global `jax.Array` (data parallelism only).

One code path for 1 device, N devices and N processes: the state is replicated (`jax.P()`), the
batch is split along its leading axis over the mesh axis 'data' (`jax.P('data')`), and `jax.jit`
inserts the gradient all-reduce; BatchNorm statistics are over the global batch.
"""

from collections.abc import Mapping

import jax
import numpy as np

DATA_AXIS = "data"


def make_mesh() -> jax.sharding.Mesh:
    """Returns a 1-D mesh over all devices of all processes, axis name 'data'.

    The axis is `Auto` (not JAX 0.10's default `Explicit`): the compiler propagates the batch
    sharding through the network and inserts the collectives, so model code needs no sharding
    annotations (Flax's dropout masks, for one, are created unsharded).
    """
    return jax.make_mesh(
        (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def replicated_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Sharding that keeps a full copy on every device (model and optimizer state)."""
    return jax.sharding.NamedSharding(mesh, jax.P())


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Sharding that splits the leading (batch) axis over the mesh's 'data' axis."""
    return jax.sharding.NamedSharding(mesh, jax.P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh, what: str = "batch") -> int:
    """Checks that a global batch splits evenly over devices and processes.

    Args:
        global_batch_size: the batch size summed over all devices and processes.
        mesh: the data mesh.
        what: name used in the error message (e.g. 'config.train.batch_size').

    Returns:
        The per-process batch size.

    Raises:
        ValueError: if the batch is not divisible by the device count.
    """
    num_devices = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % num_devices:
        raise ValueError(
            f"{what}={global_batch_size} must be a positive multiple of the device count "
            f"({num_devices} devices over {jax.process_count()} processes)."
        )
    return global_batch_size // jax.process_count()


def shard_batch(host_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
    """Turns this process's part of a batch into global arrays sharded over 'data'.

    Non-numeric entries (e.g. `id`, bytes) stay on the host and are dropped.

    Args:
        host_batch: numpy arrays with leading axis = per-process batch size [b, ...].
        mesh: the data mesh.

    Returns:
        dict of `jax.Array` with leading axis = global batch size [b * process_count, ...].

    Raises:
        ValueError: if the global batch is not divisible by the device count.
    """
    sharding = data_sharding(mesh)
    out = {}
    for name, value in host_batch.items():
        value = np.asarray(value)
        if value.dtype.kind not in "biuf":
            continue
        check_batch_size(value.shape[0] * jax.process_count(), mesh, f"batch['{name}'] size")
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out

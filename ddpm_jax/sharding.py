"""The 1-D device mesh (axis ``'data'``) and the batch shardings: a process's slice of the global
batch placed as one global ``jax.Array`` (:func:`shard_batch`), or reshaped for ``jax.pmap``
(:func:`shard_for_pmap`)."""

from __future__ import annotations

import operator
from typing import Optional, Sequence

import numpy as np

__all__ = ["DATA_AXIS", "make_mesh", "batch_sharding", "shard_batch", "shard_for_pmap"]

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence] = None):
    """A 1-D ``jax.sharding.Mesh`` with axis name ``'data'``.

    Args:
      devices: the devices (default: all devices of all processes, ordered by process index then
        device id, so each process's devices form a contiguous block in process order and the
        global array built by :func:`shard_batch` equals the global batch of
        :func:`batch_indices`).
    """
    import jax  # noqa: PLC0415

    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices = np.asarray(list(devices), dtype=object)
    if devices.size == 0:
        raise ValueError("make_mesh needs at least one device")
    return jax.sharding.Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(batch_size: int):
    """``NamedSharding`` splitting axis 0 of a ``(batch_size, ...)`` array over this process's
    devices, or None (no split) with one device, several processes, or a batch size they do not
    divide. For outputs a single process computes whole, e.g. a batch of samples."""
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

    devices = jax.local_devices()
    if len(devices) == 1 or jax.process_count() > 1 or batch_size % len(devices):
        return None
    return NamedSharding(make_mesh(devices), P(DATA_AXIS))


def shard_batch(local_batch, mesh):
    """Places this process's batch on the mesh as one global, batch-sharded ``jax.Array``.

    Args:
      local_batch: (local_batch, ...) NumPy array (or a pytree of them) from this process: its
        contiguous slice of the global batch (:class:`BatchIterator`).
      mesh: a mesh with axis ``'data'`` (:func:`make_mesh`).

    Returns:
      ``jax.Array`` of shape (global_batch, ...) = (local_batch × process_count, ...), sharded along
      axis 0 over ``'data'`` (``NamedSharding(mesh, P('data'))``). Works unchanged on one host or
      many (``jax.make_array_from_process_local_data``).

    Raises:
      ValueError: the local batch is not divisible by this process's devices in the mesh.
    """
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

    n_local = len(mesh.local_devices)
    for leaf in jax.tree_util.tree_leaves(local_batch):
        b = np.shape(leaf)[0]
        if b % n_local:
            raise ValueError(
                f"local batch of {b} examples is not divisible by this process's {n_local} "
                f"devices (train_step.Parallel.put_batch pads a batch to a multiple of them)"
            )
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return jax.make_array_from_process_local_data(sharding, local_batch)


def shard_for_pmap(local_batch, num_local_devices: int):
    """Reshapes (local_batch, ...) → (num_local_devices, local_batch // num_local_devices, ...).

    Accepts a NumPy array or a pytree (tuple/list/dict) of them.

    Raises:
      ValueError: the local batch is not divisible by ``num_local_devices``.
    """
    import jax  # noqa: PLC0415

    if isinstance(num_local_devices, bool) or operator.index(num_local_devices) < 1:
        raise ValueError(f"num_local_devices must be an integer >= 1, got {num_local_devices!r}")
    n = operator.index(num_local_devices)

    def reshape(a):
        a = np.asarray(a)
        if a.shape[0] % n:
            raise ValueError(
                f"local batch of {a.shape[0]} examples is not divisible by the {n} local devices"
            )
        return a.reshape((n, a.shape[0] // n) + a.shape[1:])

    return jax.tree_util.tree_map(reshape, local_batch)

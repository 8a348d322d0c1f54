"""Data parallelism on a device mesh: runs split across devices, then each run's batch.

An experiment trains many independent runs (regime x seed) stacked on one axis. The
mesh has two axes: ``runs`` splits that stacked axis (no communication at all), and
``batch`` splits each run's batch, with parameters replicated along it (XLA adds one
all-reduce of the gradients per step). Runs take as many devices as divide their
number; the batch axis takes what divides the rest and the batch size. One device
gives a 1 x 1 mesh and the same program as without one.

Multi-host: call :func:`initialize_distributed` (``jax.distributed.initialize``)
before anything else touches JAX; ``jax.devices()`` then lists every host's devices,
and :func:`fetch` gathers sharded results onto every host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

RUNS, BATCH = "runs", "batch"


def make_mesh(num_runs: int, batch_size: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(runs, batch)`` mesh over as many of ``devices`` (default: all) as divide the work.

  Example:
    >>> mesh = make_mesh(15, 128)
    >>> mesh.axis_names, mesh.size <= len(jax.devices())
    (('runs', 'batch'), True)
  """
  devices = list(jax.devices() if devices is None else devices)
  runs = math.gcd(num_runs, len(devices))
  batch = math.gcd(len(devices) // runs, batch_size)
  return Mesh(np.array(devices[: runs * batch]).reshape(runs, batch), (RUNS, BATCH))


def run_sharding(mesh: Mesh) -> NamedSharding:
  """Arrays whose leading axis is the stacked runs."""
  return NamedSharding(mesh, PartitionSpec(RUNS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """One run's batch (inside ``vmap`` over runs with ``spmd_axis_name=RUNS``)."""
  return NamedSharding(mesh, PartitionSpec(BATCH))


def steps_sharding(mesh: Mesh) -> NamedSharding:
  """Per-step statistics of every run, ``[steps, runs]``."""
  return NamedSharding(mesh, PartitionSpec(None, RUNS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def put(tree, sharding: NamedSharding):
  """``jax.device_put`` onto a mesh; across hosts, each host gives its copy's pieces.

  With several processes every process holds the same values (they are computed
  from the same seeds), so each one supplies the shards on its own devices.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x  # already global
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(one, tree)


def fetch(tree):
  """``jax.device_get``, gathering across hosts when there are several."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """``jax.distributed.initialize``: one process per host, all running the same command.

  On Cloud TPU, SLURM, Open MPI and Kubernetes JAX reads all three arguments from the
  cluster's environment; elsewhere pass them (the coordinator is process 0's
  ``host:port``).
  """
  jax.distributed.initialize(coordinator_address, num_processes, process_id)

"""Every pmap, replicate, shard and unreplicate call in jaxrlhf lives here.

Keeping the collectives in one module means a later move from `pmap` to `jit` with
named sharding touches this file only. Nowhere else spells the axis name.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import config_lib

# The one axis every train step reduces over.
BATCH_AXIS = "batch"


def local_device_count() -> int:
  return jax.local_device_count()


def check_batch_size(global_batch_size: int, name: str = "batch_size") -> int:
  """Returns the per-device batch size, or raises a readable error at start-up."""
  devices = jax.device_count()
  processes = jax.process_count()
  if global_batch_size <= 0:
    raise config_lib.ConfigError(f"config.{name}={global_batch_size} must be positive.")
  if global_batch_size % devices:
    raise config_lib.ConfigError(
        f"config.{name}={global_batch_size} is not divisible by the {devices} devices "
        f"({processes} process(es) x {jax.local_device_count()} local); pick a multiple "
        f"of {devices}.")
  return global_batch_size // devices


def pmap_step(step_fn: Callable, *, donate_state: bool = True,
              static_broadcasted_argnums: Sequence[int] = (),
              devices: Sequence[Any] | None = None) -> Callable:
  """Wraps a pure `step(state, batch, ...)` once for all (or the given) devices."""
  return jax.pmap(
      _traced_in_current_order(step_fn),
      axis_name=BATCH_AXIS,
      donate_argnums=(0,) if donate_state else (),
      static_broadcasted_argnums=tuple(static_broadcasted_argnums),
      devices=devices)


def pmap_fn(fn: Callable, **kwargs) -> Callable:
  """pmaps a pure function that donates nothing (evaluation, scoring, sampling)."""
  return jax.pmap(_traced_in_current_order(fn), axis_name=BATCH_AXIS, **kwargs)


def _leading_axis_sharding(devices: Sequence[Any] | None):
  devices = list(devices or jax.local_devices())
  mesh = jax.sharding.Mesh(np.asarray(devices), (BATCH_AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXIS)), len(devices)


def replicate(tree: Any, devices: Sequence[Any] | None = None) -> Any:
  """Copies a host pytree onto every local device (leading axis = local devices)."""
  sharding, n = _leading_axis_sharding(devices)
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x)),
                               sharding), jax.device_get(tree))


def unreplicate(tree: Any) -> Any:
  """Takes device 0's copy of a replicated pytree, as numpy-backed host arrays."""
  return jax.tree_util.tree_map(lambda x: jax.device_get(x[0]), tree)


def shard(tree: Any, num_devices: int | None = None) -> Any:
  """Reshapes host arrays [local_batch, ...] to [local_devices, per_device, ...]."""
  n = num_devices or jax.local_device_count()

  def _reshape(x):
    x = np.asarray(x)
    if x.shape[0] % n:
      raise ValueError(
          f"a host batch of {x.shape[0]} rows cannot be split over {n} local devices.")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return jax.tree_util.tree_map(_reshape, tree)


def unshard(tree: Any) -> Any:
  """Inverse of `shard`: [devices, per_device, ...] -> [devices * per_device, ...]."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x).reshape((-1,) + tuple(x.shape[2:])), tree)


def device_put_sharded(tree: Any, devices: Sequence[Any] | None = None) -> Any:
  """Places an already-sharded host batch [local_devices, ...] on the devices."""
  sharding, _ = _leading_axis_sharding(devices)
  return jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), sharding), tree)


# Whether `psum` adds the devices' values in device order (see `fixed_reduction_order`).
# Read when a step is traced, so it must be set before the step is first called.
_FIXED_ORDER = False


def set_fixed_reduction_order(enabled: bool) -> None:
  """Makes every cross-device sum add the devices' values in device order.

  A psum across processes runs through the CPU/network collectives (gloo on CPU, NCCL,
  ICI), whose algorithms add the devices' values in an order of their own: measured on
  2 processes x 2 CPU devices, a psum of 100k float32 values differed from the one-process
  x 4 result in 27% of its elements, by float32 rounding. With the fixed order each value
  is gathered (no arithmetic) and summed over the device axis by the same local program
  on every topology, so a run is bit-identical however its devices are spread over
  processes. The gather holds one copy per device of what is summed (the gradients
  included), so it is for checks and small models, not the default.
  """
  global _FIXED_ORDER
  _FIXED_ORDER = bool(enabled)


@contextlib.contextmanager
def fixed_reduction_order(enabled: bool = True) -> Iterator[None]:
  """`set_fixed_reduction_order` for the steps traced inside the block."""
  previous = _FIXED_ORDER
  set_fixed_reduction_order(enabled)
  try:
    yield
  finally:
    set_fixed_reduction_order(previous)


def _traced_in_current_order(fn: Callable) -> Callable:
  """`fn`, or under the fixed order a new wrapper of it: jax caches a trace per function
  object, and one traced with the collectives' order must not be reused."""
  return functools.partial(fn) if _FIXED_ORDER else fn


def _ordered_sum(x: jax.Array) -> jax.Array:
  return jnp.sum(jax.lax.all_gather(x, axis_name=BATCH_AXIS), axis=0).astype(x.dtype)


def psum(tree: Any) -> Any:
  if _FIXED_ORDER:
    return jax.tree_util.tree_map(_ordered_sum, tree)
  return jax.lax.psum(tree, axis_name=BATCH_AXIS)


def pmean(tree: Any) -> Any:
  if _FIXED_ORDER:
    count = jax.lax.psum(1, axis_name=BATCH_AXIS)  # the device count: exact in any order
    return jax.tree_util.tree_map(lambda x: (_ordered_sum(x) / count).astype(x.dtype), tree)
  return jax.lax.pmean(tree, axis_name=BATCH_AXIS)


def pmax(tree: Any) -> Any:
  return jax.lax.pmax(tree, axis_name=BATCH_AXIS)


def all_gather(tree: Any) -> Any:
  return jax.lax.all_gather(tree, axis_name=BATCH_AXIS)


def axis_index() -> jax.Array:
  return jax.lax.axis_index(BATCH_AXIS)


def device_rng(rng: jax.Array) -> jax.Array:
  """Inside a pmapped function: a key that differs per device (same on every step)."""
  return jax.random.fold_in(rng, jax.lax.axis_index(BATCH_AXIS))


def masked_mean(total: jax.Array, count: jax.Array) -> jax.Array:
  """Cross-device token-weighted mean from a local (sum, count) pair."""
  total, count = psum((total, count))
  return total / jnp.maximum(count, 1)


def fetch(tree: Any) -> Any:
  """Host copy of replicated metrics (device 0); the only sync point per log interval."""
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x))[0], tree)


def process_allgather(tree: Any) -> Any:
  """Gathers host arrays from every process (multi-host); identity on one process."""
  if jax.process_count() == 1:
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[None], tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree)


def sync_global_devices(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Joins a multi-process run when launched as one (flags or environment)."""
  import os
  env_coord = os.environ.get("JAX_COORDINATOR_ADDRESS")
  env_n = os.environ.get("JAX_NUM_PROCESSES")
  env_id = os.environ.get("JAX_PROCESS_ID")
  coordinator_address = coordinator_address or env_coord
  num_processes = num_processes if num_processes is not None else (
      int(env_n) if env_n else None)
  process_id = process_id if process_id is not None else (
      int(env_id) if env_id else None)
  if coordinator_address and num_processes and num_processes > 1:
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id)
  elif _on_cloud_tpu_vm():
    # On a TPU VM (pod slice, GKE or multislice) every worker finds the others by itself
    # (metadata server or TPU_* variables); one worker alone becomes a 1-process run.
    jax.distributed.initialize()


def _on_cloud_tpu_vm() -> bool:
  """Whether jax's own TPU cluster detection finds this host (GCE TPU VM or GKE)."""
  import os
  if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  try:  # jax's detection; a private module, so a missing name only means "no"
    from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
    return any(cluster.is_env_present() for cluster in (
        cloud_tpu_cluster.GceTpuCluster, cloud_tpu_cluster.GkeTpuCluster))
  except (ImportError, AttributeError):
    return False


__all__ = [
    "BATCH_AXIS", "check_batch_size", "pmap_step", "pmap_fn", "replicate",
    "unreplicate", "shard", "unshard", "device_put_sharded", "pmean", "psum",
    "masked_mean", "fetch", "device_rng", "set_fixed_reduction_order",
    "fixed_reduction_order",
]

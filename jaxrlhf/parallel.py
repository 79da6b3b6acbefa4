"""Every pmap, replicate, shard and unreplicate call in jaxrlhf lives here.

Two layouts, one set of calls (`configure`, in jaxrlhf/layout.py, picks one from
`config.parallel`):

- "pmap" (the default): every device holds the whole state; a step body sees its
  device's rows and reduces over the `batch` axis with `psum` / `pmean`.
- "mesh": `jit` over a device mesh (axes `data`, `fsdp` and `tensor`). Batches are
  split over `data` and `fsdp`; parameters, optimizer states, EMA, reference and reward
  model are split over `tensor` by parameter name and over `fsdp` by shape
  (jaxrlhf/layout.py), and XLA inserts the collectives. A step body sees the GLOBAL
  batch, so the reductions below are identities there: the same step is exact in both
  layouts.

Host code keeps one convention in both: host batches are [local_devices, per_device,
...] (`shard`), per-row outputs come back through `unshard`, replicated ones through
`fetch` / `unreplicate`. Nowhere else spells an axis name.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import config_lib
# The layouts and their shardings (re-exported: callers spell them parallel.X).
from jaxrlhf.layout import (  # pylint: disable=unused-import
    MESH_AXES, MIN_SHARDED_SIZE, MODES, Layout, batch_sharding, configure, constrain_state,
    layout, make_layout, map_state, param_sharding, param_spec, parse_mesh, rows_spec,
    set_layout, state_shardings, using)

# The one axis every pmapped train step reduces over.
BATCH_AXIS = "batch"

def local_device_count() -> int:
  return jax.local_device_count()


def check_batch_size(global_batch_size: int, name: str = "batch_size") -> int:
  """Returns the per-device batch size, or raises a readable error at start-up."""
  devices = jax.device_count()
  processes = jax.process_count()
  if global_batch_size <= 0:
    raise config_lib.ConfigError(f"config.{name}={global_batch_size} must be positive.")
  if global_batch_size % devices:  # both layouts split a batch over every device
    raise config_lib.ConfigError(
        f"config.{name}={global_batch_size} is not divisible by the {devices} devices "
        f"({processes} process(es) x {jax.local_device_count()} local); pick a multiple "
        f"of {devices}.")
  return global_batch_size // devices


def pmap_step(step_fn: Callable, *, donate_state: bool = True,
              static_broadcasted_argnums: Sequence[int] = (),
              devices: Sequence[Any] | None = None) -> Callable:
  """Wraps a pure `step(state, batch, ...) -> (state, ...)` once for all (or the given)
  devices: pmapped, or in mesh mode jitted with the new state kept in the state's
  sharding."""
  if layout().is_mesh and devices is None:
    lay = layout()

    def mesh_step(state, *args):
      out = step_fn(state, *args)
      return (constrain_state(out[0], lay),) + tuple(out[1:])
    return _mesh_jit(mesh_step, donate_argnums=(0,) if donate_state else (),
                     static_argnums=tuple(static_broadcasted_argnums))
  return jax.pmap(
      _traced_as(_traced_in_current_order(step_fn)),
      axis_name=BATCH_AXIS,
      donate_argnums=(0,) if donate_state else (),
      static_broadcasted_argnums=tuple(static_broadcasted_argnums),
      devices=devices)


def pmap_fn(fn: Callable, **kwargs) -> Callable:
  """pmaps a pure function that donates nothing (evaluation, scoring, sampling); in
  mesh mode, jits it (`in_axes` has no meaning there: every argument is global)."""
  if layout().is_mesh and kwargs.get("devices") is None:
    return _mesh_jit(fn, static_argnums=tuple(kwargs.get("static_broadcasted_argnums", ())))
  return jax.pmap(_traced_as(_traced_in_current_order(fn)),
                  axis_name=BATCH_AXIS, **kwargs)


def _mesh_jit(fn: Callable, **kwargs) -> Callable:
  """jit: the arguments carry their shardings (`replicate`, `device_put_sharded`), and
  XLA partitions the program to match."""
  return jax.jit(_traced_as(fn, mesh_layout=layout()), **kwargs)


# While jax traces a step: None when it sees one device's rows (pmap), else the mesh
# layout whose global batch it sees. Set by the mesh wrapper only, so a function pmapped
# on given devices inside a mesh-mode stage (the rankings' sampler) still reduces over
# them.
_TRACING_MESH: Layout | None = None


def shard_count() -> int:
  """Into how many equal blocks of rows, one per device, the batch a step is being
  traced for falls: the mesh's devices in mesh mode (the step sees the global batch),
  1 under pmap (it sees one device's rows). Per-device packed layouts (a ranking's
  `slot`, data/buckets.py) read their offsets from it."""
  return 1 if _TRACING_MESH is None else int(_TRACING_MESH.mesh.size)


def _traced_as(fn: Callable, *, mesh_layout: Layout | None = None) -> Callable:
  """`fn` traced with `_TRACING_MESH` set to `mesh_layout`.

  Outside a mesh trace the flag is already None, so a pmapped function is `fn` itself.
  A mesh wrapper is made once per function and mesh and kept on the function: jax
  caches one trace per function object, and a new wrapper on each `pmap_fn` call would
  trace (and lower) the function again on every call.
  """
  if mesh_layout is None:
    return fn
  cache = getattr(fn, "__dict__", {}).setdefault("_jaxrlhf_mesh_traced", {})
  if mesh_layout.mesh in cache:
    return cache[mesh_layout.mesh]

  @functools.wraps(fn, updated=())
  def traced(*args, **kwargs):
    global _TRACING_MESH
    previous, _TRACING_MESH = _TRACING_MESH, mesh_layout
    try:
      return fn(*args, **kwargs)
    finally:
      _TRACING_MESH = previous
  cache[mesh_layout.mesh] = traced
  return traced


def _leading_axis_sharding(devices: Sequence[Any] | None):
  devices = list(devices or jax.local_devices())
  mesh = jax.sharding.Mesh(np.asarray(devices), (BATCH_AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXIS)), len(devices)


def _global_from_host(x: Any, sharding) -> jax.Array:
  """A global array from a host value every process holds whole."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree: Any, devices: Sequence[Any] | None = None) -> Any:
  """Copies a host pytree onto every local device (leading axis = local devices); in
  mesh mode, places it split over the mesh (`param_spec`) with no leading axis."""
  if layout().is_mesh and devices is None:
    # Arrays already on the mesh (a state restored sharded from a checkpoint) move to
    # their split without a trip through the host, as copies: the step donates them.
    mesh_devices = set(layout().mesh.devices.flat)
    on_mesh = lambda x: (isinstance(x, jax.Array) and not _is_pmapped(x)
                         and x.sharding.device_set == mesh_devices)
    return map_state(
        lambda path, x: jax.device_put(x, param_sharding(x.shape, path=path),
                                       may_alias=False) if on_mesh(x)
        else _global_from_host(jax.device_get(x), param_sharding(np.shape(x), path=path)),
        tree)
  sharding, n = _leading_axis_sharding(devices)
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x)),
                               sharding), jax.device_get(tree))


def _whole(x: Any) -> np.ndarray:
  """The whole value of a global array on this host (gathered from every process)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _is_pmapped(x: Any) -> bool:
  """Whether `x` has pmap's leading device axis (a pmap output or a `replicate` copy)."""
  if not isinstance(x, jax.Array):
    return True  # host arrays in pmap's layout
  sharding = x.sharding
  pmap_sharding = getattr(jax.sharding, "PmapSharding", None)  # gone in newer jax
  if pmap_sharding is not None and isinstance(sharding, pmap_sharding):
    return True
  return (isinstance(sharding, jax.sharding.NamedSharding)
          and sharding.mesh.axis_names == (BATCH_AXIS,))


def unreplicate(tree: Any) -> Any:
  """Takes device 0's copy of a replicated pytree, as numpy-backed host arrays; in mesh
  mode, gathers each array whole."""
  return jax.tree_util.tree_map(
      lambda x: jax.device_get(x[0]) if _is_pmapped(x) else _whole(x), tree)


def for_checkpoint(tree: Any) -> Any:
  """What a checkpoint saves of a placed state: under pmap, device 0's copy on the host;
  in mesh mode the global arrays as they lie, each process writing its own shards
  (nothing is gathered whole)."""
  return tree if layout().is_mesh else unreplicate(tree)


def checkpoint_shardings() -> Callable[[str, Sequence[int]], Any] | None:
  """How a checkpoint is restored: in mesh mode a function of an array's path
  (`jax.tree_util.keystr`) and shape giving its split, so each array is read straight
  into it (each process reads its own shards), whatever layout wrote the checkpoint;
  None under pmap (host arrays)."""
  if not layout().is_mesh:
    return None
  lay = layout()
  return lambda path, shape: param_sharding(shape, lay, path)


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
  """This process's rows of per-row outputs, on the host: pmap's [devices, per_device,
  ...] -> [devices * per_device, ...]; a mesh-mode [global rows, ...] -> its rows."""
  def rows(x):
    if _is_pmapped(x):
      x = np.asarray(jax.device_get(x))
      return x.reshape((-1,) + tuple(x.shape[2:]))
    whole = _whole(x)
    n = whole.shape[0] // jax.process_count()
    return whole[jax.process_index() * n:(jax.process_index() + 1) * n]
  return jax.tree_util.tree_map(rows, tree)


def device_put_sharded(tree: Any, devices: Sequence[Any] | None = None,
                       row_axis: int = 0) -> Any:
  """Places an already-sharded host batch [local_devices, ...] on the devices; in mesh
  mode, as the process's rows of one global batch split over `data` and `fsdp`.

  `row_axis`: where a device's rows sit in what the step sees, for stacked batches:
  host [local_devices, updates, per_device, ...] with row_axis=1 becomes the mesh's
  [updates, global rows, ...]."""
  if layout().is_mesh and devices is None:
    sharding = jax.sharding.NamedSharding(layout().mesh, rows_spec(row_axis))

    def put(x):
      x = np.moveaxis(np.asarray(x), 0, row_axis)  # [..., local_devices, per_device, ...]
      shape = x.shape[:row_axis] + (-1,) + x.shape[row_axis + 2:]
      return jax.make_array_from_process_local_data(sharding, x.reshape(shape))
    return jax.tree_util.tree_map(put, tree)
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


# Inside a step. In mesh mode a step sees the global batch, so a sum or mean over the
# devices is already taken: the reductions are identities there.


def psum(tree: Any) -> Any:
  if _TRACING_MESH is not None:
    return tree
  if _FIXED_ORDER:
    return jax.tree_util.tree_map(_ordered_sum, tree)
  return jax.lax.psum(tree, axis_name=BATCH_AXIS)


def pmean(tree: Any) -> Any:
  if _TRACING_MESH is not None:
    return tree
  if _FIXED_ORDER:
    count = jax.lax.psum(1, axis_name=BATCH_AXIS)  # the device count: exact in any order
    return jax.tree_util.tree_map(lambda x: (_ordered_sum(x) / count).astype(x.dtype), tree)
  return jax.lax.pmean(tree, axis_name=BATCH_AXIS)


def pmax(tree: Any) -> Any:
  if _TRACING_MESH is not None:
    return tree
  return jax.lax.pmax(tree, axis_name=BATCH_AXIS)


def device_rng(rng: jax.Array) -> jax.Array:
  """Inside a step: a key that differs per device (same on every step); in mesh mode,
  where the step sees every row, the key itself (dropout masks then differ from pmap's,
  with the same distribution). Draws that must equal pmap's go through `per_device`."""
  if _TRACING_MESH is not None:
    return rng
  return jax.random.fold_in(rng, jax.lax.axis_index(BATCH_AXIS))


def _device_keys(key: jax.Array, n: int) -> jax.Array:
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def per_device(fn: Callable, key: jax.Array, *rows: Any) -> Any:
  """Inside a step: `fn(device key, *rows)` on each device's rows, with the key pmap
  gives that device (fold_in(key, device index)); every output has a leading row axis.

  pmap: one call on the device's rows. Mesh: vmapped over the devices' shares of the
  global rows, in device order, so samples drawn this way equal pmap's.
  """
  if _TRACING_MESH is None:
    return fn(jax.random.fold_in(key, jax.lax.axis_index(BATCH_AXIS)), *rows)
  n = _TRACING_MESH.mesh.size
  grouped = jax.tree_util.tree_map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]),
                                   rows)
  out = jax.vmap(fn)(_device_keys(key, n), *grouped)
  return jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), out)


def shuffled_slice(key: jax.Array, num_rows: int, num_slices: int, index) -> jax.Array:
  """Inside a step: indices of slice `index` (of `num_slices`) of each device's rows
  shuffled by its key (fold_in(key, device index)). pmap: of the device's `num_rows`;
  mesh: of each device's share of the `num_rows` global rows, joined in device order,
  which are the rows pmap's devices take together."""
  def local(device_key, n_rows):
    size = n_rows // num_slices
    order = jax.random.permutation(device_key, n_rows)
    return jax.lax.dynamic_slice_in_dim(order, index * size, size)
  if _TRACING_MESH is None:
    return local(jax.random.fold_in(key, jax.lax.axis_index(BATCH_AXIS)), num_rows)
  n = _TRACING_MESH.mesh.size
  share = num_rows // n
  rows = jax.vmap(lambda k: local(k, share))(_device_keys(key, n))  # [devices, size]
  return (rows + (jnp.arange(n) * share)[:, None]).reshape(-1)


def masked_mean(total: jax.Array, count: jax.Array) -> jax.Array:
  """Cross-device token-weighted mean from a local (sum, count) pair."""
  total, count = psum((total, count))
  return total / jnp.maximum(count, 1)


def fetch(tree: Any) -> Any:
  """Host copy of replicated metrics (device 0's in pmap mode), in one transfer; the
  only sync point per log interval."""
  pmapped = jax.tree_util.tree_map(_is_pmapped, tree)
  host = jax.device_get(jax.tree_util.tree_map(
      lambda x, p: x if p or x.is_fully_addressable else _whole(x), tree, pmapped))
  return jax.tree_util.tree_map(lambda x, p: np.asarray(x)[0] if p else np.asarray(x),
                                host, pmapped)


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
    "BATCH_AXIS", "Layout", "layout", "configure", "make_layout", "set_layout", "using",
    "state_shardings", "check_batch_size", "pmap_step", "pmap_fn", "replicate",
    "unreplicate", "shard", "unshard", "device_put_sharded", "pmean", "psum",
    "masked_mean", "fetch", "device_rng", "set_fixed_reduction_order",
    "fixed_reduction_order",
]

"""Device layouts: pmap, or a `data x fsdp x tensor` mesh with the state split.

`configure` (called by every stage with its `config.parallel`) or `using` sets the
layout that `jaxrlhf/parallel.py` builds steps and places arrays for; the shardings of
mesh mode are made here:
- a batch's rows are split over `data` and `fsdp` (BATCH_AXES); the devices of one
  `tensor` group see the same rows;
- each state array (parameters, optimizer moments, EMA, reference, reward model) is
  split over `tensor` along its heads / MLP / vocabulary dimension, picked by the
  parameter's name (TENSOR_DIMS: Megatron's column and row splits), and over `fsdp`
  along its largest other dimension that the axis size divides.
XLA inserts the gathers, reduce-scatters and all-reduces either split needs, so a step
computes the same function in every layout; the splits decide only memory and traffic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from jaxrlhf import config_lib

MODES = ("pmap", "mesh")
MESH_AXES = ("data", "fsdp", "tensor")
# A batch's rows are split over these; `tensor` splits the model within each share.
BATCH_AXES = ("data", "fsdp")
# Arrays with fewer elements stay whole on every device in mesh mode (norm scales,
# biases, the step counter, PRNG keys): splitting them saves nothing and costs a gather.
MIN_SHARDED_SIZE = 1024

# The `tensor` split of a parameter (and of its optimizer moments and EMA, whose paths
# end the same way), by the end of its path: the dimension, counted from the last (a
# scanned model's leading layer axis is never split), that the axis splits. Column
# splits for the projections into heads and the MLP's hidden units and for the output
# vocabulary, row splits for the projections back to the residual stream, so that each
# attention head and hidden unit lives on one device of the group. An array whose
# dimension the axis size does not divide (a few kv heads, an odd vocabulary) is kept
# whole over `tensor`, as grouped-query models keep their kv heads.
TENSOR_DIMS = (
    (r"\['attn'\]\['[qkv]'\]\['(kernel|bias)'\]$", -1),
    (r"\['attn'\]\['o'\]\['kernel'\]$", -2),
    (r"\['mlp'\]\['(up|gate)'\]\['(kernel|bias)'\]$", -1),
    (r"\['mlp'\]\['down'\]\['kernel'\]$", -2),
    (r"\['transformer'\]\['embed'\]\['embedding'\]$", -2),
    (r"\['lm_head'\]\['kernel'\]$", -1),
)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the devices are used: `mode` "pmap", or "mesh" with `mesh` (axes MESH_AXES)."""
  mode: str = "pmap"
  mesh: jax.sharding.Mesh | None = None

  @property
  def is_mesh(self) -> bool:
    return self.mode == "mesh"

  def axis_size(self, name: str) -> int:
    return int(self.mesh.shape[name]) if self.mesh is not None else 1

  def describe(self) -> str:
    if not self.is_mesh:
      return f"pmap over {jax.device_count()} devices"
    return "mesh " + " x ".join(f"{a}={self.axis_size(a)}" for a in MESH_AXES)


_LAYOUT = Layout()


def layout() -> Layout:
  return _LAYOUT


def parse_mesh(spec: str, num_devices: int, field: str = "config.parallel.mesh"
               ) -> dict[str, int]:
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'tensor': 1}; one size may be -1 (the
  rest of the devices); an axis left out has size 1; '' is fsdp over every device."""
  sizes = {a: 1 for a in MESH_AXES}
  if not spec.strip():
    spec = "fsdp=-1"
  seen = set()
  for part in spec.split(","):
    name, sep, value = part.partition("=")
    name = name.strip()
    if not sep or name not in MESH_AXES or name in seen:
      raise config_lib.ConfigError(
          f"{field}={spec!r}: each entry is <axis>=<size> with axis one of "
          f"{', '.join(MESH_AXES)}, each at most once ('{part.strip()}' is not).")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise config_lib.ConfigError(
          f"{field}={spec!r}: the size of {name} must be an integer, not {value!r}.") from None
    seen.add(name)
  rest = [a for a, n in sizes.items() if n == -1]
  if len(rest) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
    raise config_lib.ConfigError(
        f"{field}={spec!r}: sizes are positive, and at most one is -1 (the rest).")
  known = math.prod(n for n in sizes.values() if n != -1)
  if rest:
    if num_devices % known:
      raise config_lib.ConfigError(
          f"{field}={spec!r}: {num_devices} devices are not a multiple of {known}.")
    sizes[rest[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise config_lib.ConfigError(
        f"{field}={spec!r}: the axes hold {math.prod(sizes.values())} devices and the run "
        f"has {num_devices}; make their product {num_devices} (or use -1 for one axis).")
  return sizes


def make_layout(mode: str = "pmap", mesh: str = "", devices: Sequence[Any] | None = None,
                field: str = "config.parallel") -> Layout:
  if mode not in MODES:
    raise config_lib.ConfigError(
        f"{field}.mode={mode!r}: choose one of {', '.join(repr(m) for m in MODES)}.")
  if mode == "pmap":
    return Layout()
  devices = list(devices or jax.devices())
  sizes = parse_mesh(mesh, len(devices), field=f"{field}.mesh")
  # `tensor` varies fastest: a group is consecutive devices (one host, the fastest links).
  grid = np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
  for group in grid.reshape(-1, sizes["tensor"]):
    # The group's devices see the same rows, and each process loads rows of its own.
    processes = sorted({getattr(d, "process_index", 0) for d in group})
    if len(processes) > 1:
      raise config_lib.ConfigError(
          f"{field}.mesh={mesh!r}: a tensor group spans processes {processes}; its "
          f"devices must be on one host (tensor={sizes['tensor']} at most "
          f"{jax.local_device_count()}, the devices per process, and dividing it).")
  return Layout("mesh", jax.sharding.Mesh(grid, MESH_AXES))


def set_layout(new: Layout) -> Layout:
  """Makes `new` the layout of every step built and batch placed from now on; returns
  the previous one."""
  global _LAYOUT
  previous, _LAYOUT = _LAYOUT, new
  return previous


def configure(parallel_config: Any | None) -> Layout:
  """Sets the layout from a `config.parallel` section ({mode, mesh}); pmap without one."""
  new = (Layout() if parallel_config is None else
         make_layout(parallel_config.get("mode", "pmap"), parallel_config.get("mesh", "")))
  set_layout(new)
  return new


@contextlib.contextmanager
def using(new: Layout) -> Iterator[Layout]:
  """`set_layout(new)` for the block."""
  previous = set_layout(new)
  try:
    yield new
  finally:
    set_layout(previous)


def rows_spec(row_axis: int = 0) -> jax.sharding.PartitionSpec:
  """A batch whose rows (dimension `row_axis`) are split over BATCH_AXES."""
  return jax.sharding.PartitionSpec(*([None] * row_axis), BATCH_AXES)


def batch_sharding(lay: Layout | None = None) -> jax.sharding.NamedSharding:
  """Mesh mode: rows split over `data` and `fsdp`."""
  lay = lay or _LAYOUT
  return jax.sharding.NamedSharding(lay.mesh, rows_spec())


def tensor_dim(path: str, ndim: int) -> int | None:
  """The dimension (0-based) the `tensor` axis splits in the array at `path` (a
  `jax.tree_util.keystr`), or None for arrays it keeps whole (TENSOR_DIMS)."""
  for pattern, dim in TENSOR_DIMS:
    if re.search(pattern, path) and ndim >= -dim:
      return ndim + dim
  return None


def param_spec(shape: Sequence[int], fsdp: int, tensor: int = 1, path: str = ""
               ) -> jax.sharding.PartitionSpec:
  """The split of one state array of shape `shape` at `path`.

  tensor: the dimension `tensor_dim` names, when `tensor` divides it. fsdp: the largest
  other dimension that `fsdp` divides (the first of equals). Small arrays
  (MIN_SHARDED_SIZE) and dimensions no axis size divides stay whole.
  """
  shape = tuple(shape)
  axes: list[str | None] = [None] * len(shape)
  if math.prod(shape) < MIN_SHARDED_SIZE:
    return jax.sharding.PartitionSpec()
  if tensor > 1:
    dim = tensor_dim(path, len(shape))
    if dim is not None and shape[dim] % tensor == 0:
      axes[dim] = "tensor"
  if fsdp > 1:
    candidates = [d for d in range(len(shape)) if axes[d] is None and shape[d] % fsdp == 0]
    if candidates:
      axes[max(candidates, key=lambda d: (shape[d], -d))] = "fsdp"
  if not any(axes):
    return jax.sharding.PartitionSpec()
  return jax.sharding.PartitionSpec(*axes)


def param_sharding(shape: Sequence[int], lay: Layout | None = None, path: str = ""
                   ) -> jax.sharding.NamedSharding:
  """The sharding of the state array of shape `shape` at `path` (see `param_spec`)."""
  lay = lay or _LAYOUT
  return jax.sharding.NamedSharding(lay.mesh, param_spec(
      shape, lay.axis_size("fsdp"), lay.axis_size("tensor"), path))


def map_state(fn, tree: Any) -> Any:
  """`fn(path, leaf)` on every leaf of a state, the path as `jax.tree_util.keystr`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: fn(jax.tree_util.keystr(path), x), tree)


def state_shardings(tree: Any, lay: Layout | None = None) -> Any:
  """The mesh-mode sharding of every array of a state (params, optimizer states, ...)."""
  return map_state(lambda path, x: param_sharding(np.shape(x), lay, path), tree)


def constrain_state(tree: Any, lay: Layout) -> Any:
  """Inside a jitted step: every array of `tree` in its split over `lay`'s mesh."""
  return map_state(
      lambda path, x: jax.lax.with_sharding_constraint(x, param_sharding(x.shape, lay, path))
      if hasattr(x, "shape") else x, tree)

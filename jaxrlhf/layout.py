"""Device layouts: pmap, or a `data x fsdp` mesh with the state split over fsdp.

`configure` (called by every stage with its `config.parallel`) or `using` sets the
layout that `jaxrlhf/parallel.py` builds steps and places arrays for; the shardings of
mesh mode (a batch's rows over every axis, each state array over fsdp) are made here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from jaxrlhf import config_lib

MODES = ("pmap", "mesh")
MESH_AXES = ("data", "fsdp")
# Arrays with fewer elements stay whole on every device in mesh mode (norm scales,
# biases, the step counter, PRNG keys): splitting them saves nothing and costs a gather.
MIN_SHARDED_SIZE = 1024


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
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}; one size may be -1 (the rest of the
  devices); an axis left out has size 1; '' is fsdp over every device."""
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
  grid = np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
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


def _batch_spec() -> jax.sharding.PartitionSpec:
  return jax.sharding.PartitionSpec(MESH_AXES)


def batch_sharding(lay: Layout | None = None) -> jax.sharding.NamedSharding:
  """Mesh mode: rows split over every mesh axis."""
  lay = lay or _LAYOUT
  return jax.sharding.NamedSharding(lay.mesh, _batch_spec())


def param_spec(shape: Sequence[int], fsdp: int) -> jax.sharding.PartitionSpec:
  """The fsdp split of one array: its largest dimension that `fsdp` divides (the first
  of equals), or none for small arrays and arrays no dimension of which it divides."""
  shape = tuple(shape)
  if fsdp == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
    return jax.sharding.PartitionSpec()
  candidates = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
  if not candidates:
    return jax.sharding.PartitionSpec()
  dim = max(candidates, key=lambda d: (shape[d], -d))
  return jax.sharding.PartitionSpec(*(["fsdp" if d == dim else None
                                       for d in range(len(shape))]))


def param_sharding(shape: Sequence[int], lay: Layout | None = None
                   ) -> jax.sharding.NamedSharding:
  lay = lay or _LAYOUT
  return jax.sharding.NamedSharding(lay.mesh, param_spec(shape, lay.axis_size("fsdp")))


def state_shardings(tree: Any, lay: Layout | None = None) -> Any:
  """The mesh-mode sharding of every array of a state (params, optimizer states, ...)."""
  return jax.tree_util.tree_map(lambda x: param_sharding(np.shape(x), lay), tree)


def constrain_state(tree: Any, lay: Layout) -> Any:
  """Inside a jitted step: every array of `tree` in its fsdp split over `lay`'s mesh."""
  return jax.tree_util.tree_map(
      lambda x: jax.lax.with_sharding_constraint(x, param_sharding(x.shape, lay))
      if hasattr(x, "shape") else x, tree)

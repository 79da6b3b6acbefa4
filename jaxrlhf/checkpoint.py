"""Checkpoints of a run in its workdir: orbax CheckpointManager plus data-iterator state.

A run restores itself from the newest good checkpoint in `workdir/checkpoints`; a
damaged newest one is reported and the previous one is used instead.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxrlhf.models import transformer as transformer_lib


def _encode_data_state(data_state: Any) -> Any:
  if data_state is None:
    return {"kind": "none"}
  if isinstance(data_state, bytes):
    return {"kind": "bytes", "value": data_state.decode("utf-8")}
  return {"kind": "json", "value": data_state}


def _decode_data_state(blob: Any) -> Any:
  kind = blob.get("kind", "none")
  if kind == "bytes":
    return blob["value"].encode("utf-8")
  if kind == "json":
    return blob["value"]
  return None


CHECKSUMS_KEY = "checksums"


def _is_scanned(node: Any) -> bool:
  """A params-shaped dict (model params, an Adam moment, the EMA) whose trunk holds its
  layers stacked (config.model.scan_layers)."""
  trunk = node.get("transformer") if isinstance(node, dict) else None
  return isinstance(trunk, dict) and "layers" in trunk


def _layers_one_by_one(node: Any) -> Any:
  count = jax.tree_util.tree_leaves(node["transformer"]["layers"])[0].shape[0]
  return transformer_lib.unstack_layers(node, count)


def canonical_layers(state: Any) -> tuple[Any, Any]:
  """(the state with every scanned trunk's layers one by one, a function taking a tree
  of that form back to the state's own). Checkpoints hold the first form, so a run may
  resume with config.model.scan_layers changed, as with the device layout changed."""
  nodes, treedef = jax.tree_util.tree_flatten(state, is_leaf=_is_scanned)
  scanned = [_is_scanned(n) for n in nodes]
  canonical = treedef.unflatten(
      [_layers_one_by_one(n) if s else n for n, s in zip(nodes, scanned)])

  def back(tree: Any) -> Any:
    parts = treedef.flatten_up_to(tree)
    return treedef.unflatten([
        transformer_lib.stack_layers(part, jax.tree_util.tree_leaves(
            node["transformer"]["layers"])[0].shape[0]) if s else part
        for part, node, s in zip(parts, nodes, scanned)])
  return canonical, back


_WEIGHT = 2654435761  # Knuth's multiplicative constant: position weights mod 2**32


def _unsigned_bits(x):
  """x's bits as unsigned integers of its width (bool as 0/1), numpy or jax alike."""
  xp = jnp if isinstance(x, jax.Array) else np
  dtype = np.dtype(x.dtype)
  if dtype == np.bool_:
    return x.astype(xp.uint32)
  # 8-byte values (host-only: jax runs without x64) count as two 32-bit words.
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[dtype.itemsize]
  if isinstance(x, jax.Array):
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return np.ascontiguousarray(x).reshape(-1).view(unsigned).astype(np.uint32)


@jax.jit
def _device_sum32(x: jax.Array) -> jax.Array:
  bits = _unsigned_bits(x)
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(x.ndim)):  # the row-major position, built where x lies
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride)
    stride *= x.shape[d]
  return jnp.sum(bits * (index * jnp.uint32(_WEIGHT) + jnp.uint32(1)), dtype=jnp.uint32)


def _sum32(x: Any) -> int:
  """sum over positions i of bits_i * (i * _WEIGHT + 1), mod 2**32: an integer sum, so
  the same however the array is split over devices and processes, computed where the
  array lies (a sharded array is never gathered for it)."""
  if isinstance(x, jax.Array):
    return int(np.asarray(_device_sum32(x)))
  bits = _unsigned_bits(np.asarray(x)).reshape(-1)
  index = np.arange(bits.size, dtype=np.uint32)
  weights = index * np.uint32(_WEIGHT) + np.uint32(1)  # wraps mod 2**32, as on device
  return int(np.sum(bits * weights, dtype=np.uint32))


def checksums(state: Any) -> dict[str, str]:
  """'dtype:sum32:N' of every array of a state (host or device arrays), by its path in
  the tree: written with each checkpoint and compared on restore, so flipped bytes that
  leave every file its size (and orbax reading it happily) are caught, whatever layout
  wrote or reads the checkpoint."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    leaf = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
    out[jax.tree_util.keystr(path)] = f"{np.dtype(leaf.dtype)}:sum32:{_sum32(leaf)}"
  return out


def _crc_checksums(state: Any) -> dict[str, str]:
  """The 'dtype:CRC-32' form that checkpoints written before sum32 hold (host arrays)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state)):
    array = np.ascontiguousarray(np.asarray(leaf))
    crc = zlib.crc32(array.reshape(-1).view(np.uint8).data)
    out[jax.tree_util.keystr(path)] = f"{array.dtype}:{crc}"
  return out


class Checkpointer:
  """Saves every `save_every` steps and at the end, keeps the newest `keep`."""

  def __init__(self, directory: str | epath.Path, *, save_every: int, keep: int = 3):
    directory = str(directory)
    # orbax needs absolute paths; a bucket path (gs://...) already is one.
    self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
    self.save_every = max(int(save_every), 1)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "extra"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, state: Any, *, data_state: Any = None,
           extra: dict | None = None) -> None:
    """Saves `state`: host arrays (pmap's unreplicated state), or global device arrays
    split over devices and processes (mesh mode), each process writing its own shards.
    Every process must call this."""
    state, _ = canonical_layers(state)
    extra = {**(extra or {}), CHECKSUMS_KEY: checksums(state)}
    self._manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_encode_data_state(data_state)),
            extra=ocp.args.JsonSave(extra),
        ),
        force=True)
    self._manager.wait_until_finished()

  def restore(self, state_template: Any, step: int | None = None, *,
              shardings: Any = None):
    """Returns (state, data_state, extra, step) from the newest readable checkpoint.

    Returns None when the directory holds no checkpoint. A checkpoint that fails to
    restore (truncated, corrupted, or arrays whose checksums differ from those written
    with it) is reported and the previous one is tried. The state comes back as host
    arrays, or with `shardings` (a function of an array's path and shape, as
    parallel.checkpoint_shardings gives) as global arrays read straight into that split.
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    template = jax.tree_util.tree_map(
        lambda x: np.zeros(x.shape, x.dtype) if hasattr(x, "shape") else x,
        jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
                               if hasattr(x, "dtype") else x, state_template))
    template, own_layers = canonical_layers(template)
    if shardings is not None:  # the layers one by one, each split by its own name
      template = jax.tree_util.tree_map_with_path(
          lambda path, x: jax.ShapeDtypeStruct(
              x.shape, x.dtype, sharding=shardings(jax.tree_util.keystr(path), x.shape))
          if hasattr(x, "shape") else x, template)
    errors = []
    for candidate in steps:
      try:
        restored = self._manager.restore(
            candidate,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(template),
                data=ocp.args.JsonRestore(),
                extra=ocp.args.JsonRestore(),
            ))
        _verify(restored["state"], dict(restored["extra"] or {}))
      except Exception as e:  # pylint: disable=broad-except
        # Not swallowed: reported, and the run only goes on from an older checkpoint.
        msg = f"checkpoint at step {candidate} in {self.directory} is unreadable: {e!r}"
        logging.info(msg)  # the log file's record; the console line follows
        print(f"WARNING: {msg}; falling back to the previous checkpoint.", flush=True)
        errors.append(msg)
        continue
      if errors:
        damaged = [s for s in steps if s > candidate]
        self._set_aside(damaged)
        print(f"Restored from step {candidate} after skipping {len(errors)} damaged "
              f"checkpoint(s); moved to {self.damaged_directory}.", flush=True)
      extra = dict(restored["extra"] or {})
      extra.pop(CHECKSUMS_KEY, None)
      return (own_layers(restored["state"]), _decode_data_state(restored["data"]), extra,
              candidate)
    if errors:
      raise RuntimeError(
          f"no checkpoint in {self.directory} could be restored:\n" + "\n".join(errors))
    return None

  @property
  def damaged_directory(self) -> epath.Path:
    return self.directory.parent / f"{self.directory.name}.damaged"

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged checkpoints out of the way, kept for inspection.

    Left in place, the run would fail when it reaches that step again (orbax refuses to
    save a step that exists) and every later restart would trip over them first.
    """
    if jax.process_index() == 0:
      self.damaged_directory.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = self.damaged_directory / str(step)
        suffix = 0
        while target.exists():
          suffix += 1
          target = self.damaged_directory / f"{step}.{suffix}"
        (self.directory / str(step)).rename(target)
        logging.warning("moved damaged checkpoint %d to %s", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("checkpoint_set_aside")
    self._manager.reload()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _verify(state: Any, extra: dict) -> None:
  """Raises when the restored arrays' checksums differ from those saved with them (a
  checkpoint written before checksums were kept has none to compare)."""
  saved = extra.get(CHECKSUMS_KEY)
  if saved is None:
    logging.info("checkpoint without checksums: restored unverified")
    return
  old_form = any(":sum32:" not in str(v) for v in saved.values())
  now = _crc_checksums(state) if old_form else checksums(state)
  # An array restored into another dtype (the config changed it) was cast by orbax and
  # cannot be compared; the stage names such changes itself.
  differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)
                  and str(saved.get(k)).split(":")[0] == str(now.get(k)).split(":")[0])
  if differ:
    raise ValueError(f"{len(differ)} array(s) differ from the checksums written with the "
                     f"checkpoint (first: {differ[0]})")


def save_json(path: str | epath.Path, obj: Any) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))

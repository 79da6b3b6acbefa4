"""grain pipeline: examples -> shuffle -> per-process shard -> tokenise -> device batches.

`make_loader` builds the pipeline over any random-access source of parsed
examples (a list from `read_examples`, or a prepared TFDS dataset from
`tfds_builders.load_prepared`) and returns a `Loader`, a grain `DatasetIterator`
yielding dicts shaped [local_devices, per_device_batch, ...]. Its state is a small
JSON dict, so a resumed run sees exactly the batches it would have seen:

    loader = make_loader("demonstrations", examples, tokenizer, Lengths(),
                         per_device_batch_size=8, seed=0)
    state = loader.get_state()            # store with the model checkpoint
    ...
    loader = make_loader(...same arguments...)
    loader.set_state(state)               # continues where the saved one stopped

With orbax, grain's handler saves it as one JSON file per process:

    mngr = ocp.CheckpointManager(dir, item_names=("state", "data"))
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(loader)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data=grain.checkpoint.CheckpointRestore(loader)))

Batches hold the device fields of `tokenize.py` plus host-only fields: `index`
(the record's position in its source, -1 for padding) and, for prompts, `meta`
(an object array of the records' other fields, e.g. the world task the labeler
reads). `split_host_fields` separates them before a batch goes to `pmap`.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable, Sequence

from absl import logging
import grain
import numpy as np

from jaxrlhf.data import buckets
from jaxrlhf.data.formats import DataError, KINDS
from jaxrlhf.data.stats import DataStats
from jaxrlhf.data.tokenize import Encoder, Lengths, TOKENIZERS, empty_example

HOST_FIELDS = ("index", "meta")


class _Padding:
  """Marks a slot that holds no example (evaluation tails, uneven shards)."""

  def __repr__(self) -> str:
    return "PADDING"


PADDING = _Padding()


class ShardedDataset(grain.MapDataset):
  """This process's share of `parent`, whose elements are (index, example).

  The data is one stream, epoch after epoch (a shuffled parent is reshuffled every
  epoch by grain), cut into global batches of `block_size * n` positions (n
  processes); process p takes the p-th run of `block_size` positions of each. With
  `block_size` the process's local batch, global device d sees the same examples
  whatever the number of processes, epoch boundaries included: a run on N hosts
  computes what it computes on one (per-device sampling keys too). Shards are disjoint.

  Training (`pad_to_multiple=None`): an epoch of the shard is `len(parent) // n`
  positions, so every process runs the same number of steps; batches run on across
  epoch boundaries as on one process, and what a finite run leaves at its end is
  counted by the loader. Evaluation (`pad_to_multiple` set): one pass in which the
  global batches cover every example once, each shard padded with PADDING up to a
  multiple of `pad_to_multiple`.
  """

  def __init__(self, parent: grain.MapDataset, *, process_index: int, process_count: int,
               pad_to_multiple: int | None = None, block_size: int = 1):
    super().__init__(parent)
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if block_size < 1:
      raise ValueError(f"block_size {block_size} must be >= 1")
    self._n = len(parent)
    self._index, self._count = process_index, process_count
    self._block = block_size
    self._stream = pad_to_multiple is None
    if self._n // process_count == 0:
      raise ValueError(f"{self._n} examples cannot be shared among {process_count} processes")
    if self._stream:
      self._length = self._n // process_count
    else:
      blocks = math.ceil(self._n / (block_size * process_count))
      self._real = blocks * block_size  # the last block partly past the data: padding
      self._length = math.ceil(self._real / pad_to_multiple) * pad_to_multiple
    self.dropped_per_epoch = self._n % process_count if self._stream else 0

  def __len__(self) -> int:
    return self._length

  def _global_position(self, position: int) -> int:
    block, offset = divmod(position, self._block)
    return (block * self._count + self._index) * self._block + offset

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if self._stream:  # grain maps positions past the first epoch to later epochs
      return self._parent[self._global_position(index)]
    epoch, position = divmod(index, self._length)
    global_position = self._global_position(position)
    if position >= self._real or global_position >= self._n:
      return (-1, PADDING)
    return self._parent[epoch * self._n + global_position]

  def __str__(self) -> str:
    return f"ShardedDataset(process {self._index} of {self._count})"


def _tokenize_element(item: tuple[int, Any], *, kind: str, encoder: Encoder,
                      lengths: Lengths, skip_invalid: bool) -> dict[str, Any]:
  index, example = item
  if isinstance(example, _Padding):
    out = empty_example(kind, encoder, lengths)
    out["_stats"]["padding"] = np.int32(1)
  else:
    try:
      out = TOKENIZERS[kind](example, encoder, lengths)
    except DataError as e:
      if not skip_invalid:
        raise
      # Kept as a padding slot, so shards keep their length on every process.
      logging.warning("Skipping example that cannot be tokenised: %s", e)
      out = empty_example(kind, encoder, lengths)
      out["_stats"]["skipped/tokenize"] = np.int32(1)
      index = -1
  out["index"] = np.int64(index)
  if kind == "prompts":
    meta = None if isinstance(example, _Padding) else example.meta
    out["meta"] = json.dumps(meta, sort_keys=True)
  return out


class Loader(grain.DatasetIterator):
  """Device-shaped batches from a grain iterator, counting what tokenisation cut.

  `stats` merges the counts from parsing (fixed when the loader is built) with
  the counts of batches served so far; the latter are part of the state.
  """

  def __init__(self, parent: grain.DatasetIterator, *, local_device_count: int,
               per_device_batch_size: int, parse_stats: DataStats | None = None,
               static_stats: dict[str, int] | None = None,
               cut: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
    super().__init__(parent)
    self._cut = cut
    self._shape = (local_device_count, per_device_batch_size)
    self._parse_stats = parse_stats or DataStats()
    self._static_stats = dict(static_stats or {})
    self._served = DataStats()
    self._batches = 0

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    for key, flags in batch.pop("_stats").items():
      self._served.add(key, int(np.sum(flags)))
    self._batches += 1
    out = {}
    for key, value in batch.items():
      value = np.asarray(value)
      out[key] = value.reshape(self._shape + value.shape[1:])
    if "meta" in out:
      decoded = np.empty(self._shape, dtype=object)
      for pos, text in np.ndenumerate(out["meta"]):
        decoded[pos] = json.loads(str(text))
      out["meta"] = decoded
    return self._cut(out) if self._cut else out

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._parent.get_state(), "served": self._served.as_dict(),
            "batches": self._batches}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["grain"])
    self._served = DataStats(state.get("served", {}))
    self._batches = int(state.get("batches", 0))

  @property
  def stats(self) -> DataStats:
    stats = DataStats(self._parse_stats.as_dict()).merge(self._served)
    return stats.merge(self._static_stats)

  @property
  def batches_served(self) -> int:
    return self._batches

  def __str__(self) -> str:
    return f"Loader(batch shape {self._shape})"


def split_host_fields(batch: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(device fields, host-only fields) of a loader batch."""
  device = {k: v for k, v in batch.items() if k not in HOST_FIELDS}
  host = {k: v for k, v in batch.items() if k in HOST_FIELDS}
  return device, host


def _process_info(process_index: int | None, process_count: int | None,
                  local_device_count: int | None) -> tuple[int, int, int]:
  if None in (process_index, process_count, local_device_count):
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local_device_count = (jax.local_device_count() if local_device_count is None
                          else local_device_count)
  return process_index, process_count, local_device_count


def make_loader(
    kind: str,
    source: Sequence[Any] | grain.sources.RandomAccessDataSource,
    tokenizer: Any,
    lengths: Lengths = Lengths(),
    *,
    per_device_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    skip_invalid: bool = False,
    parse_stats: DataStats | None = None,
    local_device_count: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    cut: bool = True,
) -> Loader:
  """Builds the checkpointable loader of batches [local_devices, per_device_batch, ...].

  Args:
    kind: 'demonstrations', 'rankings', 'prompts' or 'text'.
    source: parsed examples of that kind with len() and [] (a list, or a
      prepared TFDS split from `load_prepared`).
    tokenizer: a Hugging Face tokenizer or an `Encoder`.
    lengths: token budgets.
    per_device_batch_size: examples per device per step.
    seed: shuffle seed; every process must pass the same one.
    shuffle: reshuffle every epoch (by `seed` and the epoch number).
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: for training. False (for evaluation) pads the last batch and
      uneven shards with all-masked padding (index -1) instead of dropping.
    skip_invalid: an example that cannot be tokenised (more than k_max
      responses, a chat the template rejects) becomes a counted padding slot
      instead of an error.
    parse_stats: counts from parsing, reported with the loader's own.
    local_device_count, process_index, process_count: default to jax's values;
      pass them to simulate several processes.
    worker_count: grain worker processes for tokenisation (0: in-process, plenty
      for short sequences). Workers need absl flags parsed (as under absl.app),
      and a state saved with one worker_count restores only with the same.
    cut: cut each batch to its bucket (`lengths.bucket`; rankings are always packed,
      see buckets.py). False leaves the budgets' shapes, for batches that are cut
      together later (`buckets.cut_together`, the evaluation caches).
  """
  if kind not in KINDS:
    raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")
  if len(source) == 0:
    raise ValueError(f"the {kind} source is empty")
  process_index, process_count, local_device_count = _process_info(
      process_index, process_count, local_device_count)
  encoder = tokenizer if isinstance(tokenizer, Encoder) else Encoder(tokenizer)
  local_batch = local_device_count * per_device_batch_size

  num_examples = len(source)
  # Tag each example with its position in the source before shuffling hides it.
  dataset = grain.MapDataset.source(source).map_with_index(
      lambda index, example: (index % num_examples, example))
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  sharded = ShardedDataset(dataset, process_index=process_index, process_count=process_count,
                           pad_to_multiple=None if drop_remainder else local_batch,
                           block_size=local_batch)
  dataset = sharded.repeat(num_epochs) if num_epochs != 1 else sharded
  dataset = dataset.map(functools.partial(
      _tokenize_element, kind=kind, encoder=encoder, lengths=lengths,
      skip_invalid=skip_invalid))
  dataset = dataset.batch(local_batch, drop_remainder=drop_remainder)
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if worker_count > 0:
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count))

  static = {}
  if sharded.dropped_per_epoch:
    static["dropped/uneven_shard_per_epoch"] = sharded.dropped_per_epoch
    logging.info("%s: %d examples a epoch do not divide among %d processes and are "
                 "left out of that epoch (a different few each epoch when shuffled)",
                 kind, sharded.dropped_per_epoch, process_count)
  if drop_remainder and num_epochs is not None:
    left = (len(sharded) * num_epochs) % local_batch
    if left:
      static["dropped/final_partial_batch"] = left
      logging.info("%s: the last %d examples of the run do not fill a batch and are "
                   "dropped", kind, left)
  return Loader(iter(iter_dataset), local_device_count=local_device_count,
                per_device_batch_size=per_device_batch_size, parse_stats=parse_stats,
                static_stats=static,
                cut=batch_cutter(kind, lengths, per_device_batch_size, encoder) if cut
                else None)


def batch_cutter(kind: str, lengths: Lengths, per_device_batch_size: int, encoder: Encoder):
  """The cut `make_loader` applies to each batch of `kind` (buckets.py), or None."""
  return buckets.cutter(kind, **_bucket_args(kind, lengths, per_device_batch_size, encoder))


def cut_together(kind: str, batches: list[dict[str, Any]], lengths: Lengths,
                 per_device_batch_size: int, encoder: Encoder) -> list[dict[str, Any]]:
  """Batches of a `make_loader(..., cut=False)` cut to the one bucket all of them fit."""
  return buckets.cut_together(kind, batches,
                              **_bucket_args(kind, lengths, per_device_batch_size, encoder))


def _bucket_args(kind, lengths, per_device_batch_size, encoder) -> dict[str, int]:
  budget = {"prompts": lengths.prompt, "text": lengths.text}.get(kind, lengths.sequence)
  if not isinstance(encoder, Encoder):
    encoder = Encoder(encoder)
  return {"budget": budget, "k_max": lengths.k_max, "per_device": per_device_batch_size,
          "multiple": lengths.bucket, "pad_id": encoder.pad_id}


def steps_per_epoch(num_examples: int, *, per_device_batch_size: int,
                    local_device_count: int, process_count: int = 1) -> int:
  """Full batches one epoch yields on every process (training, drop_remainder=True)."""
  per_process = num_examples // process_count
  return per_process // (per_device_batch_size * local_device_count)

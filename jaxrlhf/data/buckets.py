"""Less padding: batches cut to a few fixed shapes (`Lengths.bucket`).

A loader pads every example to the configured budgets: `prompt + response` token slots,
`k_max` responses per ranking. Short prompts and rankings of fewer than `k_max`
responses make most of those slots padding. With `Lengths.bucket = b > 0` each batch is
cut to the smallest multiple of b token slots that holds its longest example (capped at
the budget), so a jitted step sees a handful of shapes and compiles once for each:

- prompts (left-padded): the leading pad columns go;
- demonstrations, texts and rankings (right-padded): the trailing pad columns go;
- rankings also drop their padded response slots: each device's real responses are
  packed into rows [rows, T], where rows is the device's response count rounded up to
  a multiple of its prompts per batch (so a batch pays for its mean K, rounded up, not
  for k_max), and `slot` [prompts, k_max] says which row holds each response (-1:
  none). `scoring.ranking_scores` puts the scores back in the [prompts, k_max] layout
  the ranking loss reads.

The models are causal and their positions follow the attention mask, so cutting pad
columns changes no score beyond float rounding. All local devices get one shape, and
in a run of several processes every process takes the largest any of them needs.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

PROMPT_FIELDS = ("prompt_ids", "prompt_mask")
RANKING_ROW_FIELDS = ("input_ids", "attention_mask", "prompt_mask", "response_mask")


def round_up(need: int, limit: int, multiple: int) -> int:
  """The smallest multiple of `multiple` >= need (and >= multiple), at most `limit`."""
  if multiple <= 0:
    return limit
  return int(min(limit, max(multiple, -(-int(need) // multiple) * multiple)))


def agree(needs: Sequence[int]) -> np.ndarray:
  """Elementwise max of `needs` over every process (the same shape everywhere)."""
  needs = np.asarray(needs, np.int64)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    needs = np.max(np.asarray(multihost_utils.process_allgather(needs)), axis=0)
  return needs


def _last_real(mask: np.ndarray) -> int:
  """1 + the last column where any row of `mask` [..., T] is nonzero (0 if none)."""
  columns = np.nonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))[0]
  return int(columns[-1]) + 1 if columns.size else 0


def need(kind: str, batch: dict[str, Any]) -> tuple[int, ...]:
  """What a batch [devices, per_device, ...] needs: token slots (and, for rankings, rows
  per device)."""
  if kind == "prompts":
    return (int(np.max(np.sum(batch["prompt_mask"], axis=-1), initial=0)),)
  if kind == "rankings":
    rows = int(np.max(np.sum(batch["response_valid"], axis=(1, 2)), initial=0))
    return (_last_real(batch["attention_mask"]), rows)
  return (_last_real(batch["attention_mask"]),)


def shape_for(kind: str, needs: Sequence[int], *, budget: int, k_max: int,
              per_device: int, multiple: int) -> tuple[int, ...]:
  """The bucket for `needs`: token slots, and for rankings rows per device."""
  slots = round_up(needs[0], budget, multiple)
  if kind != "rankings":
    return (slots,)
  if multiple <= 0:  # every response slot kept, in the packed layout
    return (slots, per_device * k_max)
  return (slots, round_up(needs[1], per_device * k_max, per_device))


def cut(kind: str, batch: dict[str, Any], shape: Sequence[int], *,
        pad_id: int = 0) -> dict[str, Any]:
  """`batch` cut to `shape` (from `shape_for`); host-only fields pass through. Packed
  ranking rows that hold no response are `pad_id` with an all-zero mask."""
  out = dict(batch)
  if kind == "prompts":
    (slots,) = shape
    for name in PROMPT_FIELDS:
      out[name] = batch[name][..., batch[name].shape[-1] - slots:]
    return out
  if kind != "rankings":
    (slots,) = shape
    for name, value in batch.items():
      if isinstance(value, np.ndarray) and value.ndim == 3 and value.dtype != object:
        out[name] = value[..., :slots]
    return out
  slots, rows = shape
  valid = np.asarray(batch["response_valid"]) > 0  # [D, B, K]
  devices = valid.shape[0]
  slot = np.full(valid.shape, -1, np.int32)
  row_fields = [name for name in RANKING_ROW_FIELDS if name in batch]
  packed = {name: np.zeros((devices, rows, slots), batch[name].dtype) for name in row_fields}
  packed["input_ids"][:] = pad_id
  end_index = np.zeros((devices, rows), np.int32)
  for d in range(devices):
    where = np.nonzero(valid[d].reshape(-1))[0]  # real responses, prompt-major
    slot[d].reshape(-1)[where] = np.arange(where.size, dtype=np.int32)
    for name in row_fields:
      flat = batch[name][d].reshape((-1,) + batch[name].shape[-1:])
      packed[name][d, :where.size] = flat[where, :slots]
    end_index[d, :where.size] = batch["end_index"][d].reshape(-1)[where]
  out.update(packed, end_index=end_index, slot=slot)
  return out


def cutter(kind: str, *, budget: int, k_max: int, per_device: int, multiple: int,
           pad_id: int = 0) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
  """The per-batch cut a loader applies. None when `multiple` is 0, except for
  rankings: those are always packed (every slot kept then), so steps see one layout."""
  def apply(batch):
    shape = shape_for(kind, agree(need(kind, batch)), budget=budget, k_max=k_max,
                      per_device=per_device, multiple=multiple)
    return cut(kind, batch, shape, pad_id=pad_id)
  if multiple <= 0 and kind != "rankings":
    return None
  return apply


def cut_together(kind: str, batches: list[dict[str, Any]], *, budget: int, k_max: int,
                 per_device: int, multiple: int, pad_id: int = 0) -> list[dict[str, Any]]:
  """Cached batches (evaluation) cut to one shape, the largest any of them needs, so
  the step that reads them compiles once."""
  if not batches or (multiple <= 0 and kind != "rankings"):
    return batches
  needs = np.max([need(kind, b) for b in batches], axis=0)
  shape = shape_for(kind, agree(needs), budget=budget, k_max=k_max,
                    per_device=per_device, multiple=multiple)
  return [cut(kind, b, shape, pad_id=pad_id) for b in batches]

"""PPO's side of the host loop (`train_lib.run_loop`): batches to the devices, the data
iterators' state in checkpoints, resuming."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from jaxrlhf import checkpoint as checkpoint_lib
from jaxrlhf import config_lib
from jaxrlhf import parallel
from jaxrlhf import train_lib
from jaxrlhf.ppo import state as ppo_state


# ---------------------------------------------------------------------------------------
# Host loop.
# ---------------------------------------------------------------------------------------

PROMPT_FIELDS = ("prompt_ids", "prompt_mask")
PTX_FIELDS = ("input_ids", "attention_mask", "loss_mask")


def device_prompts(batch: dict) -> dict:
  """The device fields of a prompt batch [local_devices, per_device, P] (host fields dropped)."""
  missing = [k for k in PROMPT_FIELDS if k not in batch]
  if missing:
    raise KeyError(f"prompt batch lacks {missing}; it has {sorted(batch)}")
  return {k: np.asarray(batch[k]) for k in PROMPT_FIELDS}


def stack_ptx_batches(batches: list[dict]) -> dict:
  """Pretraining batches [local_devices, per_device, T] -> [local_devices, updates, ...]."""
  return {k: np.stack([np.asarray(b[k]) for b in batches], axis=1) for k in PTX_FIELDS}


def _pack_iterator_state(state: Any) -> dict:
  # Checkpoint data states are JSON; grain hands out dicts, other iterators may use bytes.
  if isinstance(state, bytes):
    return {"bytes": state.decode("utf-8")}
  return {"json": state}


def _unpack_iterator_state(blob: dict) -> Any:
  return blob["bytes"].encode("utf-8") if "bytes" in blob else blob["json"]


def data_state(prompt_iter, ptx_iter) -> dict:
  """The iterators' position, saved with the PPO state."""
  return {"prompts": _pack_iterator_state(prompt_iter.get_state()),
          "ptx": None if ptx_iter is None else _pack_iterator_state(ptx_iter.get_state())}


def restore_iterators(prompt_iter, ptx_iter, directory) -> Callable[[dict, int], None]:
  """`restore_data` for `stage_lib.Stage.resume`: moves the prompt and pretraining
  iterators to where the checkpoint at `iteration` (in `directory`) left them."""
  def restore(saved_data, iteration):
    if not saved_data:
      return
    prompt_iter.set_state(_unpack_iterator_state(saved_data["prompts"]))
    if ptx_iter is not None:
      if saved_data.get("ptx") is None:
        raise config_lib.ConfigError(
            f"checkpoint at iteration {iteration} in {directory} was written without "
            "pretraining data (ptx_coef 0) but this run mixes it in; resume with the same "
            "config.ptx.coef or start a new workdir.")
      ptx_iter.set_state(_unpack_iterator_state(saved_data["ptx"]))
  return restore


def restore_or_keep(checkpointer: checkpoint_lib.Checkpointer, state: ppo_state.PPOState,
                    prompt_iter, ptx_iter) -> tuple[ppo_state.PPOState, int]:
  """(state, iteration) from the newest checkpoint, iterators moved to where it stopped;
  (state, 0) unchanged if the workdir holds none."""
  restored = checkpointer.restore(state, shardings=parallel.checkpoint_shardings())
  if restored is None:
    return state, 0
  state, saved_data, _, iteration = restored
  restore_iterators(prompt_iter, ptx_iter, checkpointer.directory)(saved_data,
                                                                   int(iteration))
  return state, int(iteration)


def iteration_batches(prompt_iter: Iterator[dict], ptx_iter: Iterator[dict] | None,
                      updates_per_iteration: int) -> Callable[[], tuple]:
  """`next_batch` for `train_lib.run_loop`: an iteration's prompts and, for PPO-ptx, one
  pretraining batch per minibatch update, all sharded over the devices."""
  def next_batch():
    prompts = train_lib.put_batch(device_prompts(next(prompt_iter)))
    ptx = None
    if ptx_iter is not None:
      ptx = parallel.device_put_sharded(stack_ptx_batches(
          [next(ptx_iter) for _ in range(updates_per_iteration)]), row_axis=1)
    return (prompts, ptx), 0.0
  return next_batch


def loop_settings(prompt_iter, ptx_iter) -> dict:
  """What PPO tells `train_lib.run_loop` beyond the batches: a metric fetch every
  iteration, the metrics that must be finite, and what the progress bar shows."""
  return {"log_every": 1, "unit": "iteration", "must_be_finite": ppo_state.MUST_BE_FINITE,
          "progress": {"score": "score", "kl": "kl_k1"},
          "seconds_name": "seconds_per_iteration",
          "data_state_fn": lambda: data_state(prompt_iter, ptx_iter)}

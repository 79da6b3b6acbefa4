"""PPO's host loop: batches to the devices, checkpoints, SIGTERM, metrics once an iteration."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator

from absl import logging
import numpy as np

from jaxrlhf import checkpoint as checkpoint_lib
from jaxrlhf import metrics as metrics_lib
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


def restore_or_keep(checkpointer: checkpoint_lib.Checkpointer, state: ppo_state.PPOState,
                    prompt_iter, ptx_iter) -> tuple[ppo_state.PPOState, int]:
  """(state, iteration) from the newest checkpoint, iterators moved to where it stopped;
  (state, 0) unchanged if the workdir holds none."""
  restored = checkpointer.restore(state)
  if restored is None:
    return state, 0
  state, saved_data, _, iteration = restored
  if saved_data:
    prompt_iter.set_state(_unpack_iterator_state(saved_data["prompts"]))
    if ptx_iter is not None:
      if saved_data.get("ptx") is None:
        raise ValueError(
            f"checkpoint at iteration {iteration} in {checkpointer.directory} was written "
            "without pretraining data (ptx_coef 0) but this run mixes it in; resume with "
            "the same config.ptx.coef or start a new workdir.")
      ptx_iter.set_state(_unpack_iterator_state(saved_data["ptx"]))
  return state, int(iteration)


@dataclasses.dataclass
class LoopResult:
  state: ppo_state.PPOState       # replicated, as the loop left it
  iteration: int
  history: list         # host metrics of every iteration run here
  eval_history: list    # {"iteration": i, **metrics} of every evaluation run here
  preempted: bool = False


def run_iterations(*, rstate: ppo_state.PPOState, iteration_fn: Callable,
                   prompt_iter: Iterator[dict], ptx_iter: Iterator[dict] | None,
                   updates_per_iteration: int,
                   start_iteration: int, num_iterations: int,
                   checkpointer: checkpoint_lib.Checkpointer,
                   writer: metrics_lib.MetricWriter,
                   eval_fn: Callable[[ppo_state.PPOState, int], dict] | None = None,
                   eval_every: int = 0, desc: str = "ppo") -> LoopResult:
  """Runs pmapped `iteration_fn` from `start_iteration` to `num_iterations`.

  Metrics are fetched once per iteration (the only host sync) and checked for NaN before
  any checkpoint is written; SIGTERM saves at the next iteration boundary and returns.
  """
  iteration = start_iteration
  history, eval_history = [], []
  progress = metrics_lib.Progress(total=num_iterations, initial=iteration, desc=desc)
  preempted = False
  with train_lib.PreemptionWatcher() as watcher:
    while iteration < num_iterations:
      t0 = time.perf_counter()
      prompts = train_lib.put_batch(device_prompts(next(prompt_iter)))
      ptx = None
      if ptx_iter is not None:
        ptx = train_lib.put_batch(stack_ptx_batches(
            [next(ptx_iter) for _ in range(updates_per_iteration)]))
      rstate, metrics = iteration_fn(rstate, prompts, ptx)
      metrics = {k: float(v) for k, v in parallel.fetch(metrics).items()}
      iteration += 1
      train_lib.check_finite(iteration, metrics, names=ppo_state.MUST_BE_FINITE)
      metrics["seconds_per_iteration"] = time.perf_counter() - t0
      writer.write_scalars(iteration, metrics)
      history.append({"iteration": iteration, **metrics})
      progress.update(1, score=metrics["score"], kl=metrics["kl_k1"])
      is_last = iteration == num_iterations
      if eval_fn is not None and eval_every and (iteration % eval_every == 0 or is_last):
        eval_metrics = eval_fn(rstate, iteration)
        writer.write_scalars(iteration, eval_metrics)
        eval_history.append({"iteration": iteration, **eval_metrics})
      stop = watcher.should_stop(iteration)  # agreed by every process
      if checkpointer.should_save(iteration) or is_last or stop:
        checkpointer.save(iteration, parallel.unreplicate(rstate),
                          data_state=data_state(prompt_iter, ptx_iter))
      if stop and not is_last:
        logging.info("SIGTERM received: saved iteration %d and stopping.", iteration)
        print(f"SIGTERM received: checkpoint saved at iteration {iteration}; exiting.",
              flush=True)
        preempted = True
        break
  progress.close()
  writer.flush()
  return LoopResult(state=rstate, iteration=iteration, history=history,
                    eval_history=eval_history, preempted=preempted)

"""Pieces every stage's training loop shares: state, norms, NaN guard, preemption, loop.

Stages (pretrain, SFT, reward model) build a pure step and call `fit`; PPO reuses the
state, guard and checkpoint helpers around its own rollout/update loop.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from jaxrlhf import checkpoint as checkpoint_lib
from jaxrlhf import metrics as metrics_lib
from jaxrlhf import parallel


class TrainState(train_state.TrainState):
  """Model params, optimizer state, step, and the run's base PRNG key."""
  rng: jax.Array


def create_train_state(apply_fn, params, tx, seed: int) -> TrainState:
  return TrainState.create(apply_fn=apply_fn, params=params, tx=tx,
                           rng=jax.random.key_data(jax.random.key(seed)))


def step_rng(state: TrainState) -> jax.Array:
  """A per-step, per-device key: fold_in(base key, step), then the device index."""
  key = jax.random.wrap_key_data(state.rng)
  return parallel.device_rng(jax.random.fold_in(key, state.step))


def global_norm(tree) -> jax.Array:
  return optax.tree.norm(tree)


def apply_gradients_guarded(state: TrainState, grads, loss) -> tuple[TrainState, dict]:
  """Applies (already cross-device reduced) grads unless loss or grads are non-finite.

  A non-finite step leaves the state as it was, so the last good parameters survive
  for the host to stop on; norms are logged as big_vision does.
  """
  grad_norm = global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = state.apply_gradients(grads=grads)
  update_norm = global_norm(jax.tree_util.tree_map(
      lambda new, old: new - old, new_state.params, state.params))
  new_state = jax.tree_util.tree_map(
      lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics = {
      "grad_norm": grad_norm,
      "param_norm": global_norm(new_state.params),
      "update_norm": update_norm,
      "loss_finite": finite.astype(jnp.float32),
  }
  return new_state, metrics


class NonFiniteError(FloatingPointError):
  pass


def check_finite(step: int, metrics: dict, names=("loss", "grad_norm"),
                 last_checkpoint: int | None = None) -> None:
  """Raises NonFiniteError naming the step and the quantity; call before any save."""
  for name in names:
    if name in metrics and not np.isfinite(metrics[name]):
      saved = ("no checkpoint was written yet" if last_checkpoint is None else
               f"the last checkpoint, step {last_checkpoint}, is left untouched and a "
               "restart resumes from it")
      raise NonFiniteError(
          f"step {step}: {name} is {metrics[name]}; stopping before anything after it is "
          f"saved ({saved}). Lower the learning rate or look at that step's batch.")


class PreemptionWatcher:
  """SIGTERM (TPU VM preemption) makes the loop save at a step boundary and stop.

  Call `should_stop(step)` once per step on every process. On one process a SIGTERM
  handler sets a flag. On several, the processes must stop at the SAME step (the save
  is collective, and a process that stopped early would leave the others waiting in a
  collective), and only some of them may get the signal: jax's preemption service
  (started by jax.distributed.initialize) catches SIGTERM on any of them and agrees on
  the step, so no Python handler is installed there.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._sync_point = None

  def __enter__(self):
    if jax.process_count() > 1 and _preemption_service_running():
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self._sync_point = multihost_utils.reached_preemption_sync_point
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside a notebook worker)
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if self._sync_point is not None and self._sync_point(int(step)):
      self.requested = True
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def _preemption_service_running() -> bool:
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    return distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError):
    return False


def put_batch(batch: dict) -> dict:
  """Host batch [local_devices, per_device, ...] onto the devices."""
  return parallel.device_put_sharded(batch)


@dataclasses.dataclass
class LoopResult:
  state: Any            # replicated, as the loop left it
  step: int             # the last step (PPO: iteration) run
  last_metrics: dict    # host metrics of the last step fetched
  history: list         # every row logged by this run: {unit: step, **metrics, timing}
  eval_history: list    # {unit: step, **metrics} of every evaluation run here
  preempted: bool = False


def batches_from(train_iter: Iterator[dict],
                 units: Callable[[dict], float] | None = None) -> Callable[[], tuple]:
  """`next_batch` for `run_loop` from a host iterator: one sharded batch per step."""
  def next_batch():
    batch = next(train_iter)
    return (put_batch(batch),), (units(batch) if units is not None else 0.0)
  return next_batch


def run_loop(*, rstate: Any, step_fn: Callable, next_batch: Callable[[], tuple],
             num_steps: int, checkpointer: checkpoint_lib.Checkpointer,
             writer: metrics_lib.MetricWriter, log_every: int = 1, start_step: int = 0,
             eval_fn: Callable[[Any, int], dict] | None = None, eval_every: int = 0,
             data_state_fn: Callable[[], Any] | None = None, unit: str = "step",
             desc: str = "train", must_be_finite: Sequence[str] = ("loss", "grad_norm"),
             progress: Mapping[str, str] = (("loss", "loss"),),
             units_name: str | None = None, seconds_name: str | None = None) -> LoopResult:
  """The one host loop of every stage: `step_fn(rstate, *args)` from `start_step` to
  `num_steps`, where `next_batch()` returns (device args, units of work in them).

  `rstate` is replicated and so is the result's state. Metrics are fetched once per
  `log_every` steps (the only host sync), checked for NaN/Inf (`must_be_finite`) before
  any checkpoint is written, and logged with the throughput since the previous fetch:
  `<units_name>_per_sec` and/or `<seconds_name>` (seconds per step); evaluation and
  checkpoint time count in neither. `eval_fn(rstate, step)` returns scalars to log every
  `eval_every` steps and at the end. SIGTERM saves at the next step boundary and returns
  with `preempted`; on several processes they all stop at one agreed step. `unit` names
  a step in messages and in the history rows ("iteration" for PPO); `progress` maps the
  progress bar's fields to metric names.
  """
  step = start_step
  pending: list[tuple[int, Any]] = []
  history, eval_history = [], []
  last = {}
  bar = metrics_lib.Progress(total=num_steps, initial=step, desc=desc)
  t_window, seconds, units = time.perf_counter(), 0.0, 0.0

  def flush_metrics():
    nonlocal last
    if not pending:
      return
    host = parallel.fetch([m for _, m in pending])
    for (s, _), m in zip(pending, host):
      m = {k: float(v) for k, v in m.items()}
      check_finite(s, m, names=must_be_finite, last_checkpoint=checkpointer.latest_step())
      last = m
    elapsed = seconds + time.perf_counter() - t_window
    row = dict(last)
    postfix = {name: last.get(key, float("nan")) for name, key in dict(progress).items()}
    if units_name:
      row[f"{units_name}_per_sec"] = units / max(elapsed, 1e-9)
      postfix[f"{units_name}/s"] = row[f"{units_name}_per_sec"]
    if seconds_name:
      row[seconds_name] = elapsed / len(pending)
    s = pending[-1][0]
    writer.write_scalars(s, row)
    history.append({unit: s, **row})
    pending.clear()
    bar.update(0, **postfix)

  def restart_window():
    nonlocal t_window, seconds, units
    t_window, seconds, units = time.perf_counter(), 0.0, 0.0

  preempted = False
  with PreemptionWatcher() as watcher:
    while step < num_steps:
      if not pending:
        restart_window()
      args, step_units = next_batch()
      units += step_units
      rstate, metrics = step_fn(rstate, *args)
      step += 1
      pending.append((step, metrics))
      bar.update(1)
      is_last = step == num_steps
      if step % log_every == 0 or is_last:
        flush_metrics()
      # Time spent below (evaluation, checkpoints) is left out of the rates.
      seconds += time.perf_counter() - t_window
      t_window = time.perf_counter()
      if eval_fn is not None and eval_every and (step % eval_every == 0 or is_last):
        flush_metrics()
        ev = eval_fn(rstate, step)
        writer.write_scalars(step, ev)
        eval_history.append({unit: step, **ev})
      stop = watcher.should_stop(step)  # agreed by every process
      if checkpointer.should_save(step) or is_last or stop:
        flush_metrics()  # never checkpoint a state whose steps we have not checked
        checkpointer.save(step, parallel.for_checkpoint(rstate),
                          data_state=data_state_fn() if data_state_fn else None)
      t_window = time.perf_counter()  # a flush above counted up to its own call
      if stop and not is_last:
        logging.info("SIGTERM received: saved %s %d and stopping.", unit, step)
        print(f"SIGTERM received: checkpoint saved at {unit} {step}; exiting.", flush=True)
        preempted = True
        break
  bar.close()
  writer.flush()
  return LoopResult(state=rstate, step=step, last_metrics=last, history=history,
                    eval_history=eval_history, preempted=preempted)


def enable_compilation_cache(workdir) -> str | None:
  """Points jax's persistent compilation cache at <workdir>/jax_cache, unless the user
  already chose a directory (flag or JAX_COMPILATION_CACHE_DIR). A rerun or resume then
  reads its compiled steps back instead of compiling them again.

  Returns the cache directory in use.
  """
  if not jax.config.jax_compilation_cache_dir and workdir:
    path = epath.Path(workdir) / "jax_cache"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
  return jax.config.jax_compilation_cache_dir


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def to_host_tree(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


__all__ = ["TrainState", "create_train_state", "step_rng", "apply_gradients_guarded",
           "check_finite", "NonFiniteError", "enable_compilation_cache", "PreemptionWatcher",
           "run_loop", "batches_from", "LoopResult"]

"""Pieces every stage's training loop shares: state, norms, NaN guard, preemption, loop.

Stages (pretrain, SFT, reward model) build a pure step and call `fit`; PPO reuses the
state, guard and checkpoint helpers around its own rollout/update loop.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable, Iterator

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


def start_run(config, workdir, state: TrainState, train_iter, name: str):
  """Opens a stage's checkpointer and writer, resuming state and data from `workdir`.

  Returns (state, start_step, checkpointer, writer); the config is logged on a fresh run.
  """
  checkpointer = checkpoint_lib.Checkpointer(
      epath.Path(workdir) / "checkpoints", save_every=config.checkpoint_every,
      keep=config.keep_checkpoints)
  start_step = 0
  restored = checkpointer.restore(state)
  if restored is not None:
    state, data_state, _, start_step = restored
    train_iter.set_state(data_state)
    logging.info("Resumed %s from step %d in %s", name, start_step, workdir)
    print(f"Resuming {name} from step {start_step} in {workdir}", flush=True)
  writer = metrics_lib.MetricWriter(workdir)
  if start_step == 0:
    writer.write_config(config)
  return state, start_step, checkpointer, writer


def put_batch(batch: dict) -> dict:
  """Host batch [local_devices, per_device, ...] onto the devices."""
  return parallel.device_put_sharded(batch)


@dataclasses.dataclass
class FitResult:
  state: Any            # unreplicated host state
  step: int
  last_metrics: dict
  eval_history: list
  preempted: bool = False


def fit(*, state: TrainState, step_fn: Callable, train_iter: Iterator[dict],
        num_steps: int, checkpointer: checkpoint_lib.Checkpointer,
        writer: metrics_lib.MetricWriter, log_every: int, eval_every: int = 0,
        eval_fn: Callable[[TrainState, int], dict] | None = None,
        units_per_step: Callable[[dict], float] | None = None, units_name: str = "tokens",
        desc: str = "train", data_state_fn: Callable[[], Any] | None = None,
        start_step: int = 0) -> FitResult:
  """Runs `step_fn` (pmapped, donating) from `start_step` to `num_steps`.

  `state` is the unreplicated host state; `eval_fn(replicated_state, step)` returns
  scalars to log. Metrics are fetched once per `log_every` steps, never per step.
  """
  rstate = parallel.replicate(state)
  step = start_step
  pending: list[tuple[int, Any]] = []
  eval_history = []
  last = {}
  progress = metrics_lib.Progress(total=num_steps, initial=step, desc=desc)
  t_last = time.perf_counter()
  units_since = 0.0

  def flush_metrics():
    nonlocal last, t_last, units_since
    if not pending:
      return
    host = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, host):
      m = {k: float(np.asarray(v)[0]) for k, v in m.items()}
      check_finite(s, m, last_checkpoint=checkpointer.latest_step())
      last = m
    now = time.perf_counter()
    rate = units_since / max(now - t_last, 1e-9)
    t_last, units_since = now, 0.0
    s = pending[-1][0]
    row = dict(last)
    row[f"{units_name}_per_sec"] = rate
    writer.write_scalars(s, row)
    pending.clear()
    progress.update(0, loss=last.get("loss", float("nan")), **{f"{units_name}/s": rate})

  preempted = False
  with PreemptionWatcher() as watcher:
    while step < num_steps:
      batch = next(train_iter)
      if units_per_step is not None:
        units_since += units_per_step(batch)
      rstate, metrics = step_fn(rstate, put_batch(batch))
      step += 1
      pending.append((step, metrics))
      progress.update(1)
      is_last = step == num_steps
      if step % log_every == 0 or is_last:
        flush_metrics()
      if eval_fn is not None and eval_every and (step % eval_every == 0 or is_last):
        flush_metrics()
        ev = eval_fn(rstate, step)
        writer.write_scalars(step, ev)
        eval_history.append({"step": step, **ev})
      stop = watcher.should_stop(step)
      if checkpointer.should_save(step) or is_last or stop:
        flush_metrics()  # never checkpoint a state whose steps we have not checked
        checkpointer.save(step, parallel.unreplicate(rstate),
                          data_state=data_state_fn() if data_state_fn else None)
      if stop and not is_last:
        logging.info("SIGTERM received: saved step %d and stopping.", step)
        print(f"SIGTERM received: checkpoint saved at step {step}; exiting.", flush=True)
        preempted = True
        break
  progress.close()
  writer.flush()
  return FitResult(state=parallel.unreplicate(rstate), step=step, last_metrics=last,
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
           "check_finite", "NonFiniteError", "enable_compilation_cache", "PreemptionWatcher", "fit", "FitResult",
           ]

"""The frame every training stage shares: the start and the end of a run.

A stage file (`sft.py`, `reward_model.py`, `ppo/stage.py`) builds its data, model and
steps, and leaves the rest to a `Stage`:

  stage = stage_lib.Stage("sft", config, workdir)         # workdir, tokenizer
  state = stage.resume(state, restore_data)                 # checkpoints, writer
  initial, result = stage.train(state, step_fn, data.train_iter,
                                evaluators=[...], initial=[...])
  if result.preempted: return stage.preempted(result)
  return stage.finish(summary, exports={"hf": (model, params)}, figures={...})

PPO, whose loop has hooks of its own, calls `stage.initial_eval(...)` and `stage.loop(...)`
itself. The evaluation before training is saved to `<workdir>/initial_eval.json`, so a
run resumed from a checkpoint still reports it.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import ml_collections
from etils import epath

from jaxrlhf import checkpoint as checkpoint_lib
from jaxrlhf import config_lib
from jaxrlhf import evaluators as evaluators_lib
from jaxrlhf import metrics as metrics_lib
from jaxrlhf import model_lib
from jaxrlhf import models
from jaxrlhf import optim
from jaxrlhf import parallel
from jaxrlhf import train_lib

INITIAL_EVAL_FILE = "initial_eval.json"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def config_changes(saved_file: epath.Path, config: ml_collections.ConfigDict,
                   limit: int = 20) -> list[str]:
  """'field: saved -> now' for each config field that differs from `saved_file` (the
  config.json a run wrote when it started), at most `limit` of them."""
  if not saved_file.exists():
    return []
  saved = _flatten(json.loads(saved_file.read_text()))
  now = _flatten(json.loads(config.to_json_best_effort()))
  changes = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
  return changes[:limit] + ([f"... {len(changes) - limit} more"] if len(changes) > limit else [])


class Stage:
  """One run of a training stage in `workdir`: resumes by itself, exports at the end."""

  def __init__(self, name: str, config: ml_collections.ConfigDict, workdir: str,
               *, unit: str = "step"):
    self.name, self.config, self.unit = name, config, unit
    self.workdir = epath.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    if not config.get("tokenizer"):
      raise config_lib.ConfigError("config.tokenizer is empty: give the directory of your checkpoint's "
                       "tokenizer (the Hugging Face directory of init_from, usually).")
    self.tokenizer = models.load_tokenizer(config.tokenizer)
    # Every step and placement of this stage follows config.parallel (pmap without it).
    self.layout = parallel.configure(config.get("parallel"))
    self.checkpointer: checkpoint_lib.Checkpointer | None = None
    self.writer: metrics_lib.MetricWriter | None = None
    self.start_step = 0

  def resume(self, state: Any,
             restore_data: Callable[[Any, int], None] | None = None) -> Any:
    """Opens the checkpointer and the writer; returns the newest checkpoint's state (and
    `restore_data(saved data state, step)` moves the data iterators to it), or `state`
    on a fresh run, whose config is then logged."""
    self.checkpointer = checkpoint_lib.Checkpointer(
        self.workdir / "checkpoints", save_every=self.config.checkpoint_every,
        keep=self.config.keep_checkpoints)
    restored = self.checkpointer.restore(state,
                                         shardings=parallel.checkpoint_shardings())
    if restored is not None:
      self._check_same_shapes(state, restored[0], restored[3])
      state, data_state, _, step = restored
      self.start_step = int(step)
      if restore_data is not None:
        restore_data(data_state, self.start_step)
      logging.info("Resumed %s from %s %d in %s", self.name, self.unit, self.start_step,
                   self.workdir)
      print(f"Resuming {self.name} from {self.unit} {self.start_step} in {self.workdir}",
            flush=True)
    # Rows and events after the restored step (all of them on a fresh start) are logged
    # again by this run: cut back to it.
    self.writer = metrics_lib.MetricWriter(
        self.workdir, resume_step=self.start_step if restored is not None else -1)
    if self.start_step == 0:
      self.writer.write_config(self.config)
    return state

  def one_model(self, kind: str, *, seq_len: int, num_steps: int, train_iter,
                step_fn: Callable, batches: str):
    """(model, state, schedule, pmapped train step) of a stage that trains one model
    (pretraining, SFT, the reward model): `kind` 'lm' or 'scalar', from config.init_from
    or config.model; config.optimizer over `num_steps`; the state resumed from the
    workdir with `train_iter` moved to its position. `step_fn(state, batch, *, dropout)`
    is wrapped with dropout on when config.dropout_rate is; `batches` says what a batch
    holds, for the console."""
    config = self.config
    model, params = model_lib.stage_model(kind, config, self.tokenizer, seq_len=seq_len)
    tx, schedule = optim.make_optimizer(config.optimizer, num_steps)
    state = train_lib.create_train_state(model.apply, params, tx, config.seed)
    metrics_lib.console(f"{self.name}: {train_lib.count_params(params)} parameters, "
                        f"{num_steps} steps of {batches}")
    state = self.resume(state, lambda data_state, _: train_iter.set_state(data_state))
    step = parallel.pmap_step(
        functools.partial(step_fn, dropout=config.get("dropout_rate", 0.0) > 0))
    return model, state, schedule, step

  def finished_summary(self, num_steps: int) -> dict | None:
    """The saved summary of a run that already finished (`num_steps` done and summary.json
    written), for the stage to return as it is; None otherwise. A rerun of the documented
    command then loses nothing: rebuilt from a loop that ran no step, the summary would
    hold no training figures."""
    summary_file = self.workdir / "summary.json"
    if self.start_step < num_steps or not summary_file.exists():
      return None
    summary = json.loads(summary_file.read_text())
    self.checkpointer.close()
    self.writer.close()
    metrics_lib.console(f"{self.name}: already finished ({self.start_step} {self.unit}s); "
                        f"summary in {summary_file}")
    return summary

  def _check_same_shapes(self, state: Any, saved: Any, step: int) -> None:
    """Refuses a checkpoint whose arrays have other shapes or another structure than the
    state this config builds, naming what changed since the run's saved config.json
    (orbax restores the saved shapes, and the first step would fail deep inside flax)."""
    new_leaves = jax.tree_util.tree_leaves_with_path(state)
    saved_leaves = jax.tree_util.tree_leaves_with_path(saved)
    first = None
    if len(new_leaves) != len(saved_leaves):
      first = f"{len(saved_leaves)} arrays saved, {len(new_leaves)} built now"
    else:
      for (path, a), (_, b) in zip(new_leaves, saved_leaves):
        if getattr(a, "shape", None) != getattr(b, "shape", None):
          first = (f"{jax.tree_util.keystr(path)} is {tuple(getattr(b, 'shape', ()))} in "
                   f"the checkpoint and {tuple(getattr(a, 'shape', ()))} now")
          break
    if first is None:
      return
    changed = config_changes(self.workdir / "config.json", self.config)
    raise config_lib.ConfigError(
        f"{self.workdir}: the checkpoint at {self.unit} {step} does not fit the model this "
        f"config builds ({first}). Config fields that differ from the run's "
        f"{self.workdir / 'config.json'}: {', '.join(changed) if changed else 'none found'}. "
        "Resume with the config the run started with, or give a new --workdir.")

  def initial_eval(self, evaluate: Callable[[], dict] | None) -> dict | None:
    """The evaluation before training: run (and kept) on a fresh run, read back on a
    resumed one; None when `evaluate` is None or a resumed run never recorded one."""
    path = self.workdir / INITIAL_EVAL_FILE
    if self.start_step == 0:
      if evaluate is None:
        return None
      metrics = evaluate()
      self.writer.write_scalars(0, metrics)
      if jax.process_index() == 0:
        checkpoint_lib.save_json(path, metrics)
      return metrics
    return json.loads(path.read_text()) if path.exists() else None

  def loop(self, **kwargs):
    """`train_lib.run_loop` with this stage's checkpointer, writer, start step and name."""
    return train_lib.run_loop(checkpointer=self.checkpointer, writer=self.writer,
                              start_step=self.start_step, desc=self.name, **kwargs)

  def train(self, state: Any, step_fn: Callable, data_iter, *,
            units: Callable[[dict], float], units_name: str, num_steps: int,
            evaluators: Sequence[evaluators_lib.Evaluator],
            initial: Sequence[evaluators_lib.Evaluator] = ()):
    """The run of a stage that trains on one checkpointed data iterator (pretraining,
    SFT, the reward model), from `state` (replicated here): the `initial` evaluators
    before training (`initial_eval`), then the loop, with `data_iter`'s position saved
    with each checkpoint, `units(batch)` counted for throughput, and logging and
    `evaluators` every `config.log_every` and `config.eval_every` steps.

    Returns (the evaluation before training or None, the loop's result).
    """
    rstate = parallel.replicate(state)
    initial_eval = self.initial_eval(
        (lambda: evaluators_lib.run_all(initial, rstate, 0)) if initial else None)
    result = self.loop(rstate=rstate, step_fn=step_fn,
                       next_batch=train_lib.batches_from(data_iter, units),
                       num_steps=num_steps, log_every=self.config.log_every,
                       eval_every=self.config.eval_every,
                       eval_fn=evaluators_lib.as_eval_fn(evaluators),
                       units_name=units_name, data_state_fn=data_iter.get_state)
    return initial_eval, result

  def preempted(self, result) -> dict:
    """What a stage returns when SIGTERM stopped it: rerunning the command resumes."""
    self.checkpointer.close()
    self.writer.close()
    return {"preempted": True, self.unit: result.step}

  def finish(self, summary: dict, *, exports: Mapping[str, tuple[Any, Any]],
             figures: Mapping[str, float | None],
             extra_files: Mapping[str, dict] | None = None) -> dict:
    """Writes each export (`<workdir>/<name>/`, model and tokenizer), any extra JSON files
    (paths relative to the workdir) and `summary.json` on process 0, prints the stage's
    result line, and waits for every process."""
    self.checkpointer.close()
    summary_file = self.workdir / "summary.json"
    if jax.process_index() == 0:
      for name, (model, params) in exports.items():
        models.save_pretrained(model, params, str(self.workdir / name))
        self.tokenizer.save_pretrained(str(self.workdir / name))
      for relative, content in (extra_files or {}).items():
        checkpoint_lib.save_json(self.workdir / relative, content)
      checkpoint_lib.save_json(summary_file, summary)
    where = ", ".join(f"{name} in {self.workdir / name}" for name in exports)
    count = f"{self.unit}s"
    steps = f"{summary[count]} {count}, " if count in summary else ""
    metrics_lib.console(f"{self.name}: {steps}{metrics_lib.format_figures(figures)}; "
                        f"{where}; summary in {summary_file}")
    parallel.sync_global_devices(f"{self.name}_export")
    self.writer.close()
    return summary

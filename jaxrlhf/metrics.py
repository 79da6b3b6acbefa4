"""Run logs: JSONL and TensorBoard event files in the workdir, a progress bar.

Only process 0 writes; the other processes get writers that do nothing, so call sites
need no `if process_index == 0`.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np
from etils import epath


def _to_float(value: Any) -> float:
  return float(np.asarray(value).item())


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard events to `workdir/tb`.

  A run resumed from the checkpoint of `resume_step` first cuts both back to it: the
  rows of later steps, which the stopped run logged after its last checkpoint and the
  resumed run logs again, are dropped from metrics.jsonl, and TensorBoard is told to
  drop its events after that step (a SessionLog START event), so no step shows twice.
  `resume_step=-1` (a fresh start in a workdir a run left without a checkpoint) drops
  them all.
  """

  def __init__(self, workdir: str | epath.Path, *, enabled: bool | None = None,
               resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = epath.Path(workdir)
    self._jsonl = None
    self._tb = None
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      path = self.workdir / "metrics.jsonl"
      if resume_step is not None and path.exists():
        _cut_rows_after(path, resume_step)
      self._jsonl = open(path, "a", encoding="utf-8")
      from tensorboardX import SummaryWriter
      # Event files are named by the second they were opened in: a suffix of its own
      # keeps a run restarted within that second from overwriting the last one's file.
      self._tb = SummaryWriter(
          logdir=str(self.workdir / "tb"), flush_secs=10,
          filename_suffix=f".{os.getpid()}.{time.time_ns()}",
          purge_step=None if resume_step is None else int(resume_step) + 1)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time()}
    for name, value in scalars.items():
      value = _to_float(value)
      row[name] = value if math.isfinite(value) else str(value)
      self._tb.add_scalar(name, value, int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    if not self.enabled:
      return
    for name, text in texts.items():
      self._tb.add_text(name, text, int(step))
    self._jsonl.write(json.dumps({"step": int(step), "texts": dict(texts)}) + "\n")
    self._jsonl.flush()

  def write_figure(self, step: int, name: str, figure) -> None:
    if self.enabled:
      self._tb.add_figure(name, figure, int(step))

  def write_config(self, config) -> None:
    if not self.enabled:
      return
    (self.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    self._tb.add_text("config", "```\n" + str(config) + "\n```", 0)

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _cut_rows_after(path: epath.Path, step: int) -> None:
  """Keeps the rows of metrics.jsonl up to `step` (and a torn last line is dropped)."""
  kept, dropped = [], 0
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
      dropped += 1
      continue
    if int(row.get("step", 0)) <= step:
      kept.append(line)
    else:
      dropped += 1
  if dropped:
    logging.info("%s: dropped %d rows after step %d, which the resumed run logs again",
                 path, dropped, step)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def read_jsonl_scalars(workdir: str | epath.Path) -> list[dict]:
  """The scalar rows of a run's metrics.jsonl (for reports and tests)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  rows = []
  for line in path.read_text().splitlines():
    row = json.loads(line)
    if "texts" not in row:
      rows.append(row)
  return rows


def console(message: str) -> None:
  """A line for the console on process 0 (stage headers, results), kept in the log too.

  Library INFO logs go to the log file only (jaxrlhf/launch.py), so what a user should
  see as a run goes comes through here or a progress bar.
  """
  logging.info("%s", message)
  if jax.process_index() == 0:
    print(message, flush=True)


def format_figures(figures: Mapping[str, Any]) -> str:
  """'name 1.234, other 0.5' for the figures that are numbers (missing ones are left out)."""
  return ", ".join(f"{name} {value:.4g}" for name, value in figures.items()
                   if isinstance(value, (int, float, np.floating)))


class Progress:
  """A tqdm bar on process 0 showing loss and throughput; silent elsewhere."""

  def __init__(self, total: int, initial: int = 0, desc: str = ""):
    self._bar = None
    if jax.process_index() == 0:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                       mininterval=1.0)

  def update(self, n: int = 1, **postfix) -> None:
    if self._bar is not None:
      self._bar.update(n)
      if postfix:
        self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v
                               for k, v in postfix.items()}, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()

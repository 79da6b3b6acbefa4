"""Kill anywhere: SFT, reward model and PPO run as child processes that are SIGKILLed at
random steps (one of them part-way through a checkpoint save), SIGTERMed, and restarted
from a damaged newest checkpoint; each stage then finishes with parameters, optimizer
state and checkpoints bit-identical to an uninterrupted run.

Kill points come from the progress the child reports (its metrics.jsonl rows, one per
step), never from wall-clock sleeps.
"""

import json
import random
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrlhf import metrics as metrics_lib
from jaxrlhf import models
from tests import background
from tests import rankings_files
from tests import subprocess_utils as sp

SEED = 20260  # of the kill points; printed with each trial
TRIALS = []   # (stage, what, step, outcome): printed by the last test


STAGES = {
    "sft": ("experiments.sft", "configs/sft.py:test", "num_steps", 15, 3,
            {"eval_every": 0, "num_sample_prompts": 0}),
    "rm": ("experiments.reward_model", "configs/reward_model.py:test", "num_steps", 12, 3,
           {"eval_every": 0}),
    "ppo": ("experiments.ppo", "configs/ppo.py:test", "num_iterations", 6, 2,
            {"eval_every": 0}),
}


def _setup(root):
  world = root / "world"
  from jaxrlhf.data.world import world as world_lib  # pylint: disable=g-import-not-at-top
  from configs import sft as sft_config  # pylint: disable=g-import-not-at-top
  world_lib.write_world(world_lib.WorldConfig.from_dict(
      sft_config.get_config("test").data.world.to_dict()), str(world))
  rng = np.random.default_rng(0)
  rankings_files.write_rankings(world, root / "rank_train.jsonl", 48, rng)
  rankings_files.write_rankings(world, root / "rank_valid.jsonl", 8, rng)
  return {"root": root, "world": world, "cache": root / "jax_cache"}


def _overrides(stage, setup):
  _, _, steps_key, steps, every, extra = STAGES[stage]
  out = {"data.world_dir": str(setup["world"]), steps_key: steps, "checkpoint_every": every,
         "keep_checkpoints": 100, **extra}
  if stage != "ppo":
    out["log_every"] = 1
  if stage == "rm":
    out["data.train_file"] = str(setup["root"] / "rank_train.jsonl")
    out["data.valid_file"] = str(setup["root"] / "rank_valid.jsonl")
    out["data.demonstrations_file"] = str(setup["world"] / "sft" / "train.jsonl")
  return out


class Child:
  """One run of a stage in a child process with 4 CPU devices."""

  def __init__(self, stage, setup, workdir, kill_in_save=None):
    module, config_file, *_ = STAGES[stage]
    args = sp.config_flags(config_file, _overrides(stage, setup)) + [f"--workdir={workdir}"]
    env = sp.child_env(4, setup["cache"])
    if kill_in_save:
      env["JAXRLHF_TEST_KILL_IN_SAVE"] = "%d:%d" % kill_in_save
    self.workdir = workdir
    self._old_rows = len(self._rows())  # what earlier runs in this workdir logged
    self.log = open(workdir.parent / f"{workdir.name}.{len(TRIALS)}.log", "w+")
    self.proc = sp.popen(sp.python_command("tests.kill_hooks", [module] + args),
                         cwd=sp.REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

  def _rows(self) -> list[str]:
    path = self.workdir / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []

  def last_step(self) -> int:
    """The newest step this run (not an earlier one in the workdir) has logged."""
    steps = [json.loads(line)["step"] for line in self._rows()[self._old_rows:]
             if line.endswith("}")]
    return max(steps, default=-1)

  def wait_for_step(self, step: int) -> bool:
    """Polls the child's own progress reports until it logged `step` (or exited)."""
    deadline = time.monotonic() + sp.CHILD_TIMEOUT_S
    while self.proc.poll() is None and time.monotonic() < deadline:
      if self.last_step() >= step:
        return True
      time.sleep(0.005)  # a polling interval, not a wait for the child to get anywhere
    return self.last_step() >= step

  def finish(self) -> tuple[int, str]:
    try:
      rc = self.proc.wait(timeout=sp.CHILD_TIMEOUT_S)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
        self.proc.wait()
    self.log.seek(0)
    out = self.log.read()
    self.log.close()
    return rc, out


def _state_tree(directory):
  return ocp.StandardCheckpointer().restore(directory)


def _assert_trees_identical(a, b, what):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b], what
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _logged(workdir) -> list[dict]:
  """metrics.jsonl's rows without wall-clock figures (times and throughputs)."""
  return [{k: v for k, v in row.items()
           if k != "time" and "per_sec" not in k and "second" not in k}
          for row in metrics_lib.read_jsonl_scalars(workdir)]


def _damage(checkpoint_dir):
  """Truncates every file of a checkpoint to half, as a kill during a copy would."""
  for f in checkpoint_dir.rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])


def _trials(setup, stage):
  """Runs the stage straight and through the kills; returns the two workdirs."""
  rng = random.Random(f"{SEED}-{stage}")
  _, _, _, steps, every, _ = STAGES[stage]
  base = setup["root"] / stage
  base.mkdir()
  straight, killed = base / "straight", base / "killed"

  rc, out = Child(stage, setup, straight).finish()
  assert rc == 0, out[-4000:]

  # 1. SIGKILL inside a checkpoint save of a random step. A save makes 4 atomic commits
  # (the data, extra and state items, then the step directory); each stage dies at a
  # different one, from "one item written" to "everything written but not renamed".
  save_step = rng.choice(range(every, steps, every))
  commit = {"sft": 4, "rm": 1, "ppo": 3}[stage]
  rc, out = Child(stage, setup, killed, kill_in_save=(save_step, commit)).finish()
  assert rc == -9 and "kill_hooks: SIGKILL during the save" in out, out[-4000:]
  TRIALS.append((stage, f"SIGKILL in save (commit {commit})", save_step, None))

  # 2. SIGKILL from outside at a random step after the restart.
  child = Child(stage, setup, killed)
  target = rng.randint(save_step - every + 1, steps - 2)
  reached = child.wait_for_step(target)
  child.proc.kill()
  rc, out = child.finish()
  assert "Resuming" in out or save_step == every, out[-4000:]
  assert rc == (-9 if reached else 0), out[-4000:]  # unreached: it finished first
  if reached:
    TRIALS.append((stage, "SIGKILL", child.last_step(), None))

  # 3. SIGTERM (preemption): saves at the next step boundary and exits 0.
  if stage == "sft":
    child = Child(stage, setup, killed)
    target = rng.randint(child.last_step() + 1, steps - 3)
    if child.wait_for_step(target):
      child.proc.terminate()
      rc, out = child.finish()
      assert rc == 0, out[-4000:]
      assert "SIGTERM received: checkpoint saved at step" in out, out[-4000:]
      TRIALS.append((stage, "SIGTERM", child.last_step(), None))
    else:
      child.finish()

  # 4. The newest checkpoint damaged (truncated) before the restart: reported, set
  # aside, the previous one used.
  checkpoints = killed / "checkpoints"
  saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  damaged = None
  if stage == "rm" and len(saved) >= 2:
    damaged = saved[-1]
    _damage(checkpoints / str(damaged))

  rc, out = Child(stage, setup, killed).finish()
  assert rc == 0, out[-4000:]
  if damaged is not None:
    assert f"checkpoint at step {damaged}" in out and "unreadable" in out, out[-4000:]
    assert (killed / "checkpoints.damaged" / str(damaged)).exists()
    TRIALS.append((stage, "damaged newest checkpoint", damaged, None))

  return straight, killed


@background.job("kill_resume_trials")
def _all_trials(root):
  """Every stage's trials, one stage after another; a stage's failure is its test's."""
  setup = _setup(root)
  out = {}
  for stage in STAGES:
    try:
      out[stage] = {"dirs": _trials(setup, stage)}
    except Exception as e:  # pylint: disable=broad-except
      out[stage] = {"error": e}
  return out


@pytest.fixture(scope="module")
def kill_resume_trials():
  return background.result("kill_resume_trials")


@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_anywhere_and_resumed_is_bit_identical(kill_resume_trials, stage):
  trials = kill_resume_trials
  if "error" in trials[stage]:
    raise trials[stage]["error"]
  _, _, _, steps, _, _ = STAGES[stage]
  straight, killed = trials[stage]["dirs"]
  checkpoints = killed / "checkpoints"
  # Bit-identical: every checkpoint both runs hold (state, optimizer, step, PRNG,
  # KL controller, EMA), and the exported model(s).
  assert not list(checkpoints.glob("*orbax-checkpoint-tmp*"))  # the partial save is gone
  common = sorted({p.name for p in checkpoints.iterdir() if p.name.isdigit()}
                  & {p.name for p in (straight / "checkpoints").iterdir()})
  assert str(steps) in common
  for step in common:
    _assert_trees_identical(_state_tree(straight / "checkpoints" / step / "state"),
                            _state_tree(checkpoints / step / "state"), f"{stage} step {step}")
  for export in ("hf", "hf_ema") if stage == "ppo" else ("hf",):
    _, a = models.from_pretrained(str(straight / export))
    _, b = models.from_pretrained(str(killed / export))
    _assert_trees_identical(a, b, f"{stage} {export}")
  # The log too: every step once, with the uninterrupted run's figures (the rows a
  # killed run wrote after its last checkpoint are cut when the next run resumes).
  assert _logged(killed) == _logged(straight), stage
  for i, trial in enumerate(TRIALS):
    if trial[0] == stage and trial[3] is None:
      TRIALS[i] = trial[:3] + ("bit-identical",)
  print("\n".join(f"kill/resume trial: {t}" for t in TRIALS if t[0] == stage))

"""Two processes x 2 CPU devices (jax.distributed, gloo, coordinator on 127.0.0.1) compute
what one process x 4 devices computes: SFT, reward model and PPO through the experiment
scripts, with the same losses and final parameters, disjoint data shards, and logs
written by process 0 alone. Every run is a child process, in the background from the
start of the session (tests/background.py)."""

import json
import pathlib
import re
import signal
import time

import jax
import numpy as np
import pytest

from jaxrlhf import metrics as metrics_lib
from jaxrlhf import models
from tests import background
from tests import rankings_files
from tests import subprocess_utils as sp

# Both topologies run with parallel.fixed_reduction_order: every cross-device sum adds the
# four devices' values in device order, so 2 x 2 must equal 1 x 4 to the bit. (With the
# collectives' own order the two drift apart by float32 rounding: a 200-step SFT run's
# loss differed by a relative 1.3e-5 at step 121, which a 1e-5 tolerance once failed.)
FIXED_ORDER_FLAG = "--fixed_reduction_order"


SFT_STEPS = 200


def _sft(world):
  # Enough steps for a SIGTERM to be agreed on before the end (see the preempted run):
  # a step takes ~20 ms here, and with 40 steps a loaded machine once finished all of
  # them before the two processes had agreed on where to stop.
  return {"data.world_dir": world, "num_steps": SFT_STEPS, "log_every": 1,
          "eval_every": 0, "checkpoint_every": 1000, "num_sample_prompts": 0}


def _rm(world, init_from):
  return {"data.world_dir": world, "init_from": init_from, "num_steps": 2, "log_every": 1,
          "eval_every": 0, "checkpoint_every": 100}


def _ppo(world, policy, reward):
  # Plain PPO: the pretraining mix reads through the same sharded loader as SFT.
  return {"data.world_dir": world, "policy_init_from": policy, "reward_init_from": reward,
          "num_iterations": 2, "eval_every": 0, "checkpoint_every": 100, "ptx.coef": 0.0,
          "ptx.eval_nll": False}


MESH = {"parallel.mode": "mesh", "parallel.mesh": "data=2,fsdp=2"}
# PPO splits each process's two devices over tensor and the rows over the processes.
MESH_TENSOR = {"parallel.mode": "mesh", "parallel.mesh": "data=2,tensor=2"}
MESH_SFT_STEPS = 20


@background.job("multihost_runs")
def _runs(root):
  world = str(root / "world")
  cache = root / "jax_cache"

  def job(module, config_file, overrides, workdir, flags=(FIXED_ORDER_FLAG,),
          num_processes=2, **kw):
    return sp.Processes(
        module, sp.config_flags(config_file, overrides) + [f"--workdir={workdir}", *flags],
        num_processes=num_processes, devices_per_process=4 // num_processes,
        cache_dir=cache, log_dir=root / "logs", **kw)

  def one(module, config_file, overrides, workdir):
    return job(module, config_file, overrides, workdir, num_processes=1).wait()

  out = {"root": root, "outputs": {}}
  # One process x 4 devices; its SFT run also writes the world both topologies read.
  one("experiments.sft", "configs/sft.py:test", _sft(world), root / "one" / "sft")
  # Two processes x 2 devices, joined through the JAX_* environment variables: the data
  # and collectives probe (both orders of one psum), then SFT in the same processes.
  out["outputs"]["sft"] = job("tests.shard_probe", "configs/sft.py:test", _sft(world),
                              root / "two" / "sft",
                              flags=(FIXED_ORDER_FLAG, f"--probe_dir={root / 'two' / 'probe'}"),
                              use_env_vars=True).wait()

  # SIGTERM to process 1 alone, once process 0 has logged a few steps: both must stop
  # at one agreed step, save, exit 0; the restart then finishes the run.
  preempted = root / "two" / "sft_preempted"
  running = job("experiments.sft", "configs/sft.py:test", _sft(world), preempted)
  metrics_file = preempted / "metrics.jsonl"
  while running.procs[0].poll() is None and not (
      metrics_file.exists() and '"step": 3,' in metrics_file.read_text()):
    time.sleep(0.005)  # a polling interval on the child's own progress report
  running.procs[1].send_signal(signal.SIGTERM)
  out["outputs"]["sft_preempted"] = running.wait()
  out["outputs"]["sft_resumed"] = job("experiments.sft", "configs/sft.py:test",
                                      _sft(world), preempted).wait()

  # The reward model starts from the two-process SFT export in both topologies and
  # trains on the same rankings files.
  policy = str(root / "two" / "sft" / "hf")
  rng = np.random.default_rng(0)
  rankings_files.write_rankings(pathlib.Path(world), root / "rank_train.jsonl", 32, rng)
  rankings_files.write_rankings(pathlib.Path(world), root / "rank_valid.jsonl", 8, rng)
  rm = _rm(world, policy) | {"data.train_file": str(root / "rank_train.jsonl"),
                             "data.valid_file": str(root / "rank_valid.jsonl"),
                             "data.demonstrations_file": f"{world}/sft/train.jsonl"}
  out["outputs"]["rm"] = job("experiments.reward_model", "configs/reward_model.py:test", rm,
                             root / "two" / "rm").wait()
  one("experiments.reward_model", "configs/reward_model.py:test", rm, root / "one" / "rm")

  reward = str(root / "two" / "rm" / "hf")
  out["outputs"]["ppo"] = job("experiments.ppo", "configs/ppo.py:test",
                              _ppo(world, policy, reward), root / "two" / "ppo").wait()
  one("experiments.ppo", "configs/ppo.py:test", _ppo(world, policy, reward),
      root / "one" / "ppo")

  # Mesh mode over both processes against pmap on one process, with the collectives' own
  # order: SFT at data=2 x fsdp=2 (every array split across processes), PPO at data=2 x
  # tensor=2 (heads and MLP units split within each process, rows across them).
  short_sft = _sft(world) | {"num_steps": MESH_SFT_STEPS}
  one("experiments.sft", "configs/sft.py:test", short_sft, root / "one" / "sft_short")
  out["outputs"]["sft_mesh"] = job("experiments.sft", "configs/sft.py:test",
                                   short_sft | MESH, root / "two" / "sft_mesh",
                                   flags=()).wait()
  # Its checkpoint, written shard by shard by both processes, read back by both processes
  # into the mesh (each its own shards), then by one process under pmap (whole arrays).
  out["outputs"]["sft_mesh_again"] = job("experiments.sft", "configs/sft.py:test",
                                         short_sft | MESH, root / "two" / "sft_mesh",
                                         flags=()).wait()
  out["outputs"]["sft_mesh_on_pmap"] = job("experiments.sft", "configs/sft.py:test",
                                           short_sft, root / "two" / "sft_mesh",
                                           num_processes=1).wait()
  out["outputs"]["ppo_mesh"] = job("experiments.ppo", "configs/ppo.py:test",
                                   _ppo(world, policy, reward) | MESH_TENSOR,
                                   root / "two" / "ppo_mesh", flags=()).wait()
  return out


@pytest.fixture(scope="module")
def multihost_runs():
  return background.result("multihost_runs")


def _max_param_difference(dir_one, dir_two) -> float:
  _, one = models.from_pretrained(str(dir_one))
  _, two = models.from_pretrained(str(dir_two))
  leaves_one, leaves_two = jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(two)
  assert len(leaves_one) == len(leaves_two)
  return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(leaves_one, leaves_two))


STAGES = {"sft": ("loss",), "rm": ("loss", "accuracy"),
          "ppo": ("score", "policy_loss", "value_loss", "kl_k1")}


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_match_one_process(multihost_runs, stage):
  runs = multihost_runs
  rows_one = [r for r in metrics_lib.read_jsonl_scalars(runs["root"] / "one" / stage)
              if STAGES[stage][0] in r]
  rows_two = [r for r in metrics_lib.read_jsonl_scalars(runs["root"] / "two" / stage)
              if STAGES[stage][0] in r]
  assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] != []
  for name in STAGES[stage]:
    np.testing.assert_array_equal([r[name] for r in rows_two], [r[name] for r in rows_one],
                                  err_msg=f"{stage} {name}")
  exports = ("hf", "hf_ema") if stage == "ppo" else ("hf",)
  for export in exports:
    diff = _max_param_difference(runs["root"] / "one" / stage / export,
                                 runs["root"] / "two" / stage / export)
    assert diff == 0.0, (stage, export, diff)


@pytest.mark.parametrize("stage, reference", [("sft_mesh", "sft_short"), ("ppo_mesh", "ppo")])
def test_two_process_mesh_matches_one_process_pmap(multihost_runs, stage, reference):
  runs = multihost_runs
  names = STAGES[stage.split("_")[0]]
  rows_one = [r for r in metrics_lib.read_jsonl_scalars(runs["root"] / "one" / reference)
              if names[0] in r]
  rows_two = [r for r in metrics_lib.read_jsonl_scalars(runs["root"] / "two" / stage)
              if names[0] in r]
  assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] != []
  for name in names:
    # Measured: SFT losses within 4.8e-7 (1.3e-7 relative) over 20 steps; PPO's policy
    # loss within 1.5e-7 (8.5e-6 relative: it is near 0), the others within 5e-7.
    np.testing.assert_allclose([r[name] for r in rows_two], [r[name] for r in rows_one],
                               rtol=1e-5, atol=1e-6, err_msg=f"{stage} {name}")
  diff = _max_param_difference(runs["root"] / "one" / reference / "hf",
                               runs["root"] / "two" / stage / "hf")
  assert diff < 1e-5, (stage, diff)  # measured: 1.2e-7 for both, PPO at data=2 x fsdp=2


def test_a_sharded_checkpoint_restores_on_the_mesh_and_on_one_process(multihost_runs):
  outputs = multihost_runs["outputs"]
  for name, logs in (("two processes, mesh", outputs["sft_mesh_again"]),
                     ("one process, pmap", outputs["sft_mesh_on_pmap"])):
    for log in logs:
      assert f"Resuming sft from step {MESH_SFT_STEPS}" in log, name
      assert "unreadable" not in log, name  # no checkpoint failed its checksums or read
    assert "already finished" in logs[0], name  # process 0's console


def test_collectives_own_order_differs_only_by_rounding(multihost_runs):
  runs = multihost_runs
  # What the fixed order buys: across processes the collectives' psum adds in an order of
  # its own. Each process wrote both sums of the same values (tests/shard_probe.py).
  for process in range(2):
    sums = np.load(runs["root"] / "two" / "probe" / f"sums_{process}_of_2.npz")
    values = sums["values"]  # [4 devices, n]
    in_device_order = ((values[0] + values[1]) + values[2]) + values[3]
    np.testing.assert_array_equal(sums["fixed"], in_device_order)
    # Rounding only: 3 additions, each off by at most half an ulp of a partial sum
    # (at most 4x the largest value), in each of the two orders.
    bound = 3 * np.spacing(4 * np.max(np.abs(values), axis=0))
    assert (np.abs(sums["collective"] - in_device_order) <= bound).all()
    print(f"collectives' own order: {np.mean(sums['collective'] != in_device_order):.0%} "
          f"of {values.shape[1]} sums differ from the device-order sum")


def test_each_process_reads_a_disjoint_shard(multihost_runs):
  runs = multihost_runs
  probe = runs["root"] / "two" / "probe"
  shards = [json.loads((probe / f"shard_{p}_of_2.json").read_text()) for p in range(2)]
  assert all(s["local_devices"] == 2 for s in shards)
  for name in ("sft", "prompts"):
    indices = [np.asarray(s[name]) for s in shards]  # [batches, local devices, per device]
    assert not set(indices[0].ravel()) & set(indices[1].ravel()), name
    assert (indices[0] >= 0).all() and (indices[1] >= 0).all()


def test_only_process_zero_writes_logs(multihost_runs):
  runs = multihost_runs
  for stage in STAGES:
    workdir = runs["root"] / "two" / stage
    rows_two = metrics_lib.read_jsonl_scalars(workdir)
    rows_one = metrics_lib.read_jsonl_scalars(runs["root"] / "one" / stage)
    assert len(rows_two) == len(rows_one), stage  # one writer: no row twice
    events = list((workdir / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1, (stage, events)
    process_zero, process_one = runs["outputs"][stage]
    assert f"{'reward_model' if stage == 'rm' else stage}:" in process_zero
    assert "%|" not in process_one, stage  # no progress bar on process 1
    # A quiet console: library INFO lines (orbax's among them) go to each process's log
    # file in the workdir, not to the console.
    for output in (process_zero, process_one):
      assert not re.search(r"^I\d{4} ", output, re.MULTILINE), (stage, output[-2000:])
    for name in ("log.txt", "log.process1.txt"):
      assert "CheckpointManager" in (workdir / name).read_text(), (stage, name)


def test_tpu_vm_pod_workers_join_without_flags(monkeypatch):
  # A GCE TPU VM pod slice sets no TPU_* variables: jax finds the workers through the
  # metadata server, so the launcher must ask jax's detection, not the environment.
  from jax._src.clusters import cloud_tpu_cluster
  from jaxrlhf import parallel
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  for name in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  parallel.maybe_initialize_distributed()
  assert calls == []  # a plain machine stays a single process
  monkeypatch.setattr(cloud_tpu_cluster.GceTpuCluster, "is_env_present",
                      classmethod(lambda cls: True))
  parallel.maybe_initialize_distributed()
  assert calls == [((), {})]
  parallel.maybe_initialize_distributed("127.0.0.1:1", 2, 1)
  assert calls[-1] == ((), {"coordinator_address": "127.0.0.1:1", "num_processes": 2,
                            "process_id": 1})


def test_sigterm_to_one_process_stops_all_at_one_step_and_resumes_bit_identical(
    multihost_runs):
  runs = multihost_runs
  outputs = runs["outputs"]["sft_preempted"]
  stops = [re.findall(r"SIGTERM received: checkpoint saved at step (\d+)", out)
           for out in outputs]
  assert stops[0] and stops[0] == stops[1], stops  # the same step on both processes
  step = int(stops[0][0])
  assert step < SFT_STEPS
  assert f"Resuming sft from step {step}" in runs["outputs"]["sft_resumed"][0]
  print(f"multi-host SIGTERM: both processes stopped at step {step}; resumed")
  _, straight = models.from_pretrained(str(runs["root"] / "two" / "sft" / "hf"))
  _, resumed = models.from_pretrained(str(runs["root"] / "two" / "sft_preempted" / "hf"))
  for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

"""Two processes x 2 CPU devices (jax.distributed, gloo, coordinator on 127.0.0.1) compute
what one process x 4 devices computes: SFT, reward model and PPO through the experiment
scripts, with the same losses and final parameters, disjoint data shards, and logs
written by process 0 alone."""

import json
import re
import signal
import time

import jax
import numpy as np
import pytest

from configs import ppo as ppo_config
from configs import reward_model as rm_config
from configs import sft as sft_config
from jaxrlhf import metrics as metrics_lib
from jaxrlhf import models
from jaxrlhf import ppo
from jaxrlhf import reward_model
from jaxrlhf import sft
from tests import subprocess_utils as sp

# Largest |difference| allowed between the two topologies: the psums add the same
# numbers in a different tree, so the results agree to float32 rounding, not bits.
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5


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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  world = str(root / "world")
  cache = root / "jax_cache"

  def multi(module, config_file, overrides, workdir, **kw):
    return sp.Processes(
        module, sp.config_flags(config_file, overrides) + [f"--workdir={workdir}"],
        num_processes=2, devices_per_process=2, cache_dir=cache, log_dir=root / "logs", **kw)

  out = {"root": root, "outputs": {}}
  # One process x 4 devices runs in this process (tests/conftest.py forces 4 devices);
  # its SFT run also writes the world both topologies read.
  sft.train_and_evaluate(sp.apply_overrides(sft_config.get_config("test"), _sft(world)),
                         str(root / "one" / "sft"))
  out["outputs"]["sft"] = multi("experiments.sft", "configs/sft.py:test", _sft(world),
                                root / "two" / "sft").wait()
  out["outputs"]["probe"] = multi("tests.shard_probe", "configs/sft.py:test",
                                  {"data.world_dir": world}, root / "two" / "probe",
                                  use_env_vars=True).wait()

  # SIGTERM to process 1 alone, once process 0 has logged a few steps: both must stop
  # at one agreed step, save, exit 0; the restart then finishes the run.
  preempted = root / "two" / "sft_preempted"
  job = multi("experiments.sft", "configs/sft.py:test", _sft(world), preempted)
  metrics_file = preempted / "metrics.jsonl"
  while job.procs[0].poll() is None and not (
      metrics_file.exists() and '"step": 3,' in metrics_file.read_text()):
    time.sleep(0.005)  # a polling interval on the child's own progress report
  job.procs[1].send_signal(signal.SIGTERM)
  out["outputs"]["sft_preempted"] = job.wait()
  out["outputs"]["sft_resumed"] = multi("experiments.sft", "configs/sft.py:test",
                                        _sft(world), preempted).wait()

  # The reward model starts from the two-process SFT export in both topologies. The
  # two-process run samples the world's rankings (on process 0); the one-process run
  # trains on those very files.
  policy = str(root / "two" / "sft" / "hf")
  out["outputs"]["rm"] = multi("experiments.reward_model", "configs/reward_model.py:test",
                               _rm(world, policy), root / "two" / "rm").wait()
  rankings = root / "two" / "rm" / "rankings"
  rm_one = _rm(world, policy) | {"data.train_file": str(rankings / "train.jsonl"),
                                 "data.valid_file": str(rankings / "validation.jsonl")}
  reward_model.train_and_evaluate(
      sp.apply_overrides(rm_config.get_config("test"), rm_one), str(root / "one" / "rm"))

  reward = str(root / "two" / "rm" / "hf")
  ppo_overrides = _ppo(world, policy, reward)
  out["outputs"]["ppo"] = multi("experiments.ppo", "configs/ppo.py:test", ppo_overrides,
                                root / "two" / "ppo").wait()
  ppo.train_and_evaluate(sp.apply_overrides(ppo_config.get_config("test"), ppo_overrides),
                         str(root / "one" / "ppo"))
  return out


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
def test_two_processes_match_one_process(runs, stage):
  rows_one = [r for r in metrics_lib.read_jsonl_scalars(runs["root"] / "one" / stage)
              if STAGES[stage][0] in r]
  rows_two = [r for r in metrics_lib.read_jsonl_scalars(runs["root"] / "two" / stage)
              if STAGES[stage][0] in r]
  assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] != []
  for name in STAGES[stage]:
    np.testing.assert_allclose([r[name] for r in rows_two], [r[name] for r in rows_one],
                               rtol=LOSS_RTOL, atol=1e-6, err_msg=f"{stage} {name}")
  exports = ("hf", "hf_ema") if stage == "ppo" else ("hf",)
  for export in exports:
    diff = _max_param_difference(runs["root"] / "one" / stage / export,
                                 runs["root"] / "two" / stage / export)
    print(f"{stage}/{export}: largest parameter difference 2x2 vs 1x4 = {diff:.3g}")
    assert diff <= PARAM_ATOL, (stage, export, diff)


def test_each_process_reads_a_disjoint_shard(runs):
  probe = runs["root"] / "two" / "probe"
  shards = [json.loads((probe / f"shard_{p}_of_2.json").read_text()) for p in range(2)]
  assert all(s["local_devices"] == 2 for s in shards)
  for name in ("sft", "prompts"):
    indices = [np.asarray(s[name]) for s in shards]  # [batches, local devices, per device]
    assert not set(indices[0].ravel()) & set(indices[1].ravel()), name
    assert (indices[0] >= 0).all() and (indices[1] >= 0).all()


def test_only_process_zero_writes_logs(runs):
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


def test_sigterm_to_one_process_stops_all_at_one_step_and_resumes_bit_identical(runs):
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

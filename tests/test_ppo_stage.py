"""ppo.train_and_evaluate end to end on the CI-sized config: PPO-ptx with random models on
the embedded world's tokenizer and text, logging, evaluation, export and resume."""

import json

import jax
import numpy as np
import pytest

from configs import ppo as ppo_config
from jaxrlhf import checkpoint as checkpoint_lib
from jaxrlhf import metrics as metrics_lib
from jaxrlhf import models
from jaxrlhf import ppo

LOGGED_EVERY_ITERATION = (
    "score", "kl_k1", "kl_k3", "entropy", "clip_fraction", "approx_kl",
    "value_explained_variance", "response_length", "stopped_fraction", "ptx_loss",
    "kl_coef", "policy_loss", "value_loss", "first_minibatch_log_ratio_abs_max",
    "policy_learning_rate", "value_learning_rate")


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
  root = tmp_path_factory.mktemp("ppo_stage")
  config = ppo_config.get_config("test")
  config.num_iterations = 2
  config.checkpoint_every = 1
  summary = ppo.train_and_evaluate(config, str(root / "run"))
  resumed = ppo.train_and_evaluate(config, str(root / "run"))
  return {"root": root / "run", "summary": summary, "resumed": resumed}


def test_logs_every_listed_metric_each_iteration(stage):
  rows = [r for r in metrics_lib.read_jsonl_scalars(stage["root"]) if "score" in r]
  assert [r["step"] for r in rows] == [1, 2]
  for row in rows:
    for name in LOGGED_EVERY_ITERATION:
      assert np.isfinite(row[name]), (name, row)
    assert row["first_minibatch_log_ratio_abs_max"] < 1e-5
  evals = [r for r in metrics_lib.read_jsonl_scalars(stage["root"])
           if "eval_ema_score" in r]
  assert [r["step"] for r in evals] == [0, 2]
  for name in ("eval_policy_score", "eval_ema_score", "eval_ema_kl_k1",
               "eval_ema_pretrain_nll", "eval_policy_pretrain_nll"):
    assert np.isfinite(evals[-1][name]), name


def test_exports_policy_and_ema(stage):
  summary = stage["summary"]
  assert summary["iterations"] == 2
  assert summary["ptx_coef"] == 0.5
  assert summary["final_eval"]["iteration"] == 2
  assert np.isfinite(summary["final_eval"]["eval_ema_score"])
  for name in ("initial_score", "final_score", "final_kl"):
    assert np.isfinite(summary[name]), name
  saved = json.loads((stage["root"] / "summary.json").read_text())
  assert saved["iterations"] == 2
  model, policy = models.from_pretrained(str(stage["root"] / "hf"))
  _, ema = models.from_pretrained(str(stage["root"] / "hf_ema"))
  assert isinstance(model, models.CausalLM)
  diffs = [float(np.max(np.abs(a - b))) for a, b in
           zip(jax.tree_util.tree_leaves(policy), jax.tree_util.tree_leaves(ema))]
  assert max(diffs) > 0  # the EMA lags the policy
  assert (stage["root"] / "hf" / "tokenizer_config.json").exists()


def test_second_run_resumes_at_the_end(stage):
  assert stage["resumed"]["iterations"] == 2
  assert stage["resumed"]["initial_score"] == stage["summary"]["initial_score"]
  # A rerun of a finished stage loses nothing: every figure as the first run left it.
  saved = json.loads((stage["root"] / "summary.json").read_text())
  for key in ("final_train", "final_eval", "initial_eval", "final_score", "final_kl"):
    assert stage["resumed"][key] == saved[key] and saved[key], key
  checkpointer = checkpoint_lib.Checkpointer(stage["root"] / "checkpoints", save_every=1)
  assert checkpointer.latest_step() == 2
  checkpointer.close()

"""The PPO / PPO-ptx stage: config to models, data and settings, then the loop and exports.

`train_and_evaluate(config, workdir)` is what `experiments/ppo.py` and the pipeline run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from jaxrlhf import config_lib
from jaxrlhf import data_lib
from jaxrlhf import evaluators
from jaxrlhf import metrics as metrics_lib
from jaxrlhf import model_lib
from jaxrlhf import models
from jaxrlhf import optim
from jaxrlhf import parallel
from jaxrlhf import scoring
from jaxrlhf import stage_lib
from jaxrlhf import train_lib
from jaxrlhf.data.world import labeler as labeler_lib
from jaxrlhf.ppo import loop as loop_lib
from jaxrlhf.ppo import rollout as rollout_lib
from jaxrlhf.ppo import state as ppo_state
from jaxrlhf.ppo import update as update_lib


# ---------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------


def settings_from_config(config: ml_collections.ConfigDict, tokenizer) -> ppo_state.PPOSettings:
  """Static settings from a configs/ppo.py config; checks the batch arithmetic."""
  parallel.check_batch_size(config.batch_size)
  parallel.check_batch_size(config.minibatch_size, "minibatch_size")
  if config.batch_size % config.minibatch_size:
    raise config_lib.ConfigError(f"config.batch_size={config.batch_size} must be a multiple of "
                     f"config.minibatch_size={config.minibatch_size}.")
  if config.num_ppo_epochs < 1:
    raise config_lib.ConfigError(f"config.num_ppo_epochs={config.num_ppo_epochs} must be >= 1.")
  if config.ptx.coef < 0:
    raise config_lib.ConfigError(f"config.ptx.coef={config.ptx.coef} must be >= 0 (0 = plain PPO).")
  return ppo_state.PPOSettings(
      max_new_tokens=config.data.max_response_len,
      stop_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id,
      temperature=config.rollout.temperature,
      top_k=config.rollout.top_k,
      top_p=config.rollout.top_p,
      penalty_score=config.reward.penalty_score,
      gae_gamma=config.ppo.gae_gamma,
      gae_lambda=config.ppo.gae_lambda,
      clip_eps=config.ppo.clip_eps,
      value_clip_eps=config.ppo.value_clip_eps,
      ptx_coef=config.ptx.coef,
      num_epochs=config.num_ppo_epochs,
      num_minibatches=config.batch_size // config.minibatch_size,
      ema_decay=config.ema_decay,
      kl_controller=config.kl.controller,
      kl_target=config.kl.get("target"),
      kl_horizon=config.kl.get("horizon"),
      episodes_per_iteration=config.batch_size)


def ptx_batch_size(config: ml_collections.ConfigDict) -> int:
  """Pretraining sequences per update: ptx.ratio times the RL episodes of a minibatch."""
  size = int(round(config.ptx.ratio * config.minibatch_size))
  parallel.check_batch_size(size, f"ptx.ratio * minibatch_size (= {size})")
  return size


def _require_score_head(path: str) -> None:
  config_file = epath.Path(path) / models.hf.CONFIG_FILE
  if not config_file.exists():
    raise FileNotFoundError(f"config.reward_init_from={path!r}: no {models.hf.CONFIG_FILE} "
                            "there (expected the reward model's <workdir>/hf).")
  hf = json.loads(config_file.read_text())
  classifier = any(str(a).endswith("ForSequenceClassification")
                   for a in hf.get("architectures") or [])
  if not (hf.get(models.hf.SCORE_HEAD_KEY) or classifier):
    raise config_lib.ConfigError(f"config.reward_init_from={path!r} holds a causal LM, not a reward "
                     f"model ({config_file} has no {models.hf.SCORE_HEAD_KEY!r} flag).")


def _take(iterable, n: int):
  for i, item in enumerate(iterable):
    if n and i >= n:
      return
    yield item


def evaluate(eval_step_p, rparams, rstate, batches, tokenizer=None,
             num_texts: int = 0, metas: list | None = None) -> tuple[dict, list[str]]:
  """Means of `rollout_lib.evaluate_step` over host prompt batches, and a few decoded
  responses.

  With `metas` (the held-out prompts' hidden world tasks, by the batches' `index`), also
  `gold`: the mean of the world labeler's noiseless latent quality (1-7) of the answers,
  the true objective that the reward model's `score` stands in for.
  """
  totals, texts, gold = None, [], []
  for batch in batches:
    device_batch = loop_lib.device_prompts(batch)
    if "valid" in batch:
      device_batch["valid"] = np.asarray(batch["valid"], np.float32)
    sums, (ids, mask) = eval_step_p(rparams, rstate, train_lib.put_batch(device_batch))
    sums = parallel.fetch(sums)
    totals = sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
    judge = metas is not None and "index" in batch
    show = tokenizer is not None and len(texts) < num_texts
    if not (judge or show):
      continue
    # The answers come to the host once, each decoded once, for both uses.
    ids, mask = parallel.unshard((ids, mask))
    answers = [tokenizer.decode(r[rm > 0].tolist()) for r, rm in zip(ids, mask)]
    if judge:
      for i, answer in zip(np.asarray(batch["index"]).reshape(-1), answers):
        if i >= 0 and metas[i] is not None:
          gold.append(labeler_lib.latent_score(metas[i], answer, None))
    if show:
      prompts = parallel.unshard(device_batch)
      for p, pm, answer in zip(prompts["prompt_ids"], prompts["prompt_mask"], answers):
        if len(texts) < num_texts:
          texts.append(f"{tokenizer.decode(p[pm > 0].tolist())!r} -> {answer!r}")
  if totals is None:
    return {}, texts
  means = {name: float(s.total / max(s.count, 1.0)) for name, s in totals.items()}
  if gold:
    means["gold"] = float(np.mean(gold))
  return means, texts


@dataclasses.dataclass
class HeldOutRollouts:
  """The policy's (`params(rstate)`) answers to held-out prompts, scored by the reward
  model with the KL from SFT (`eval_<name>_score`, `eval_<name>_kl_k1`, ...); with the
  world's prompts, also by the labeler's noiseless quality (`eval_<name>_gold`: gold
  against the reward model's proxy). A few decoded answers go to TensorBoard."""
  eval_step_p: Any
  batches: Any
  name: str
  params: Any
  tokenizer: Any
  num_texts: int
  writer: Any
  metas: list | None = None

  def run(self, rstate, step):
    means, texts = evaluate(self.eval_step_p, self.params(rstate), rstate, self.batches(),
                            self.tokenizer, self.num_texts, self.metas)
    if texts:
      self.writer.write_texts(step, {f"sample_{i}": t for i, t in enumerate(texts)})
    return {f"eval_{self.name}_{k}": v for k, v in means.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs PPO (config.ptx.coef 0) or PPO-ptx from an SFT policy and a reward model.

  Resumes from `workdir` by itself; writes metrics.jsonl/TensorBoard, exports the policy
  to <workdir>/hf and its EMA to <workdir>/hf_ema, and returns (and saves) a summary.
  """
  stage = stage_lib.Stage(config.get("name") or config.get("stage", "ppo"), config, workdir,
                          unit="iteration")
  workdir, tokenizer = stage.workdir, stage.tokenizer
  settings = settings_from_config(config, tokenizer)
  updates = settings.updates_per_iteration
  use_ptx = settings.ptx_coef > 0

  # --- Data -------------------------------------------------------------------------
  prompt_data = data_lib.prompt_data(config, tokenizer, workdir)
  # Pretraining text: mixed into the policy loss for PPO-ptx, and its held-out NLL
  # measures the "alignment tax" with or without ptx.
  pretrain_data = None
  if use_ptx or config.ptx.eval_nll:
    ptx = config.ptx
    if config.data.train_file and not ptx.data.train_file:
      raise config_lib.ConfigError(
          "config.ptx.data.train_file is empty while the prompts are your own "
          "(config.data.train_file): PPO-ptx mixes in, and the alignment tax is measured "
          "on, pretraining text, and the embedded world's is not yours. Set "
          "config.ptx.data.train_file and valid_file to text of your own, or "
          "config.ptx.coef=0 and config.ptx.eval_nll=False to do without.")
    train_file, valid_file = data_lib.files_or_world(
        config.data, workdir, "pretrain", train=ptx.data.train_file,
        valid=ptx.data.valid_file, train_field="config.ptx.data.train_file",
        valid_field="config.ptx.data.valid_file")
    pretrain_data = data_lib.lm_data(
        "text", tokenizer, train_file=train_file, valid_file=valid_file,
        lengths=data_lib.Lengths(prompt=config.data.max_prompt_len,
                                 response=config.data.max_response_len,
                                 text=ptx.data.max_seq_len),
        batch_size=ptx_batch_size(config), shuffle_seed=ptx.data.shuffle_seed,
        skip_invalid=config.data.skip_invalid, num_eval_batches=ptx.num_eval_batches,
        fields=ptx.data.get("fields", ""))
  prompt_iter = prompt_data.train_iter
  ptx_iter = pretrain_data.train_iter if use_ptx else None

  # --- Models and state -------------------------------------------------------------
  seq_len = config.data.max_prompt_len + settings.max_new_tokens
  # Dropout off in both: the policy's log-probabilities must be those it sampled with.
  policy_model, sft_params = model_lib.load_or_init(
      "lm", tokenizer, seq_len=seq_len, init_from=config.policy_init_from,
      model=config.model, seed=config.seed, dtype=config.dtype,
      param_dtype=config.param_dtype, field="config.policy_init_from")
  if config.reward_init_from:
    _require_score_head(config.reward_init_from)
  value_model, reward_params = model_lib.load_or_init(
      "scalar", tokenizer, seq_len=seq_len, init_from=config.reward_init_from,
      model=config.model, seed=config.seed + 1, dtype=config.dtype,
      param_dtype=config.param_dtype, field="config.reward_init_from")
  total_updates = config.num_iterations * updates
  # Warm-up is stated in iterations (InstructGPT: 10); the optimizer counts updates.
  policy_tx, policy_schedule = optim.make_optimizer(
      config.policy_optimizer, total_updates, updates_per_warmup_unit=updates)
  value_tx, value_schedule = optim.make_optimizer(
      config.value_optimizer, total_updates, updates_per_warmup_unit=updates)
  state = ppo_state.create_ppo_state(
      policy_model=policy_model, sft_params=sft_params, value_model=value_model,
      reward_params=reward_params, policy_tx=policy_tx, value_tx=value_tx,
      init_kl_coef=config.kl.init_coef, seed=config.seed,
      reward_gain=config.reward.gain, reward_bias=config.reward.bias,
      frozen_dtype=(model_lib.dtype_from_name(config.frozen_dtype)
                    if config.get("frozen_dtype") else None))
  metrics_lib.console(
      f"{config.get('stage', 'ppo')}: policy {train_lib.count_params(sft_params)} params, "
      f"value {train_lib.count_params(reward_params)} params; {config.num_iterations} "
      f"iterations of {config.batch_size} episodes, {updates} updates each")
  del sft_params, reward_params

  state = stage.resume(state, loop_lib.restore_iterators(prompt_iter, ptx_iter,
                                                         workdir / "checkpoints"))
  if (done := stage.finished_summary(config.num_iterations)) is not None:
    return done
  start_iteration, writer = stage.start_step, stage.writer

  # --- Pmapped functions ------------------------------------------------------------
  iteration_p = parallel.pmap_step(functools.partial(
      update_lib.train_iteration, policy_model=policy_model, settings=settings,
      schedules=(policy_schedule, value_schedule)))
  eval_step_p = parallel.pmap_fn(functools.partial(
      rollout_lib.evaluate_step, policy_model=policy_model, settings=settings,
      greedy=config.eval_greedy))
  nll_step_p = parallel.pmap_fn(functools.partial(scoring.lm_eval_step,
                                                  apply_fn=policy_model.apply))

  def eval_batches():
    return _take(prompt_data.eval_batches(), config.num_eval_batches)

  # The world's held-out prompts carry their hidden task: their answers are also judged
  # by the labeler's noiseless quality (gold), beside the reward model (proxy).
  metas = prompt_data.eval_metas
  world_metas = metas if metas and all(m and "task" in m for m in metas) else None

  # The policy and its EMA, each on held-out prompts (and held-out text for the
  # alignment tax): eval_policy_* and eval_ema_*.
  eval_list = []
  for name, params in (("policy", lambda rstate: rstate.policy.params),
                       ("ema", lambda rstate: rstate.ema_params)):
    eval_list.append(HeldOutRollouts(
        eval_step_p, eval_batches, name=name, params=params, tokenizer=tokenizer,
        num_texts=config.num_sample_texts if name == "ema" else 0, writer=writer,
        metas=world_metas))
    if pretrain_data is not None:
      eval_list.append(evaluators.HeldOutNLL(
          nll_step_p, pretrain_data.eval_batches, params=params,
          names={"eval_loss": f"eval_{name}_pretrain_nll"}))
  eval_fn = evaluators.as_eval_fn(eval_list)

  # --- Loop -------------------------------------------------------------------------
  t0 = time.time()
  rstate = parallel.replicate(state)
  del state
  initial_eval = stage.initial_eval(
      (lambda: eval_fn(rstate, 0)) if config.eval_every else None)
  result = stage.loop(
      rstate=rstate, step_fn=iteration_p,
      next_batch=loop_lib.iteration_batches(prompt_iter, ptx_iter, updates),
      num_steps=config.num_iterations, eval_fn=eval_fn, eval_every=config.eval_every,
      **loop_lib.loop_settings(prompt_iter, ptx_iter))
  if result.preempted:
    return stage.preempted(result)

  final_eval = None
  if result.eval_history and result.eval_history[-1]["iteration"] == result.step:
    final_eval = result.eval_history[-1]
  elif config.eval_every:  # e.g. resumed at the end: nothing ran, evaluate what was saved
    final_eval = eval_fn(result.state, result.step)
  last = result.history[-1] if result.history else {}
  first = result.history[0] if result.history and start_iteration == 0 else {}
  summary = {
      "stage": config.get("stage", "ppo"),
      "iterations": result.step,
      "ptx_coef": settings.ptx_coef,
      # Headline numbers: the EMA policy on held-out prompts where evaluations ran, else
      # the training rollouts of the first and last iterations.
      "initial_score": (initial_eval or {}).get("eval_ema_score", first.get("score")),
      "final_score": (final_eval or {}).get("eval_ema_score", last.get("score")),
      "final_kl": (final_eval or {}).get("eval_ema_kl_k1", last.get("kl_k1")),
      "final_train": {k: last.get(k) for k in (
          "score", "kl_k1", "kl_k3", "kl_coef", "entropy", "response_length",
          "stopped_fraction", "value_explained_variance", "clip_fraction", "approx_kl",
          "ptx_loss", "first_minibatch_log_ratio_abs_max") if k in last},
      "initial_eval": initial_eval,
      "final_eval": final_eval,
      "seconds": time.time() - t0,
  }
  host_state = parallel.unreplicate(result.state)
  figures = {"score": summary["final_score"], "KL": summary["final_kl"]}
  return stage.finish(summary, figures=figures, exports={
      "hf": (policy_model, host_state.policy.params),
      "hf_ema": (policy_model, host_state.ema_params)})

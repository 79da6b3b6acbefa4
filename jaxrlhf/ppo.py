"""PPO and PPO-ptx against a frozen reward model (InstructGPT step 3).

One iteration is one pmapped call: a rollout (sample, cut at the stop token, score, per-token
KL rewards, GAE, whitened advantages), then epochs of clipped-surrogate and clipped-value
updates over shuffled minibatches (plus gamma * pretraining NLL for PPO-ptx), then the KL
controller. The host fetches that iteration's metrics once. docs/design.md section 3 is the maths.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Callable, Iterator

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from jaxrlhf import checkpoint as checkpoint_lib
from jaxrlhf import data_lib
from jaxrlhf import losses
from jaxrlhf import metrics as metrics_lib
from jaxrlhf import model_lib
from jaxrlhf import models
from jaxrlhf import optim
from jaxrlhf import parallel
from jaxrlhf import sampling
from jaxrlhf import scoring
from jaxrlhf import train_lib

# fold_in salts: the iteration's key is split by purpose, so changing how many minibatches
# are shuffled never changes the samples, and evaluation noise is the same every time.
_SAMPLE_SALT, _SHUFFLE_SALT, _EVAL_SALT = 0, 1, 2

# Host metrics that stop the run when non-finite (train_lib.check_finite).
_MUST_BE_FINITE = ("policy_loss", "value_loss", "policy_grad_norm", "value_grad_norm",
                   "score")


# ---------------------------------------------------------------------------------------
# State and static settings.
# ---------------------------------------------------------------------------------------


@flax.struct.dataclass
class PPOState:
  """Everything a PPO run carries from one iteration to the next; checkpointed whole.

  The reward model and the value network share one module (the value network is
  initialised from the reward model), so `value.apply_fn` scores with `reward_params` too;
  the reference policy runs through `policy.apply_fn`.
  """
  policy: train_lib.TrainState   # pi_theta, initialised from the SFT model
  value: train_lib.TrainState    # V, initialised from the reward model, own optimizer
  ref_params: Any                # frozen SFT params: pi_SFT of the KL penalty
  reward_params: Any             # frozen reward model r_phi
  reward_gain: jax.Array         # score = gain * r_phi + bias (float32 scalars)
  reward_bias: jax.Array
  kl: losses.KLControllerState   # beta
  ema_params: Any                # EMA of the policy params, for evaluation
  iteration: jax.Array           # int32: PPO iterations done
  rng: jax.Array                 # base key data; per-iteration keys by fold_in


def create_ppo_state(*, policy_model, sft_params, value_model, reward_params,
                     policy_tx: optax.GradientTransformation,
                     value_tx: optax.GradientTransformation, init_kl_coef: float,
                     seed: int, reward_gain: float = 1.0, reward_bias: float = 0.0) -> PPOState:
  """A fresh PPO state: policy, reference and EMA from `sft_params`, value from the RM.

  Every copy owns its buffers, so donating the state never frees an array that another
  field still uses.
  """
  copy = lambda tree: jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)
  return PPOState(
      policy=train_lib.create_train_state(policy_model.apply, copy(sft_params), policy_tx,
                                          seed),
      value=train_lib.create_train_state(value_model.apply, copy(reward_params), value_tx,
                                         seed),
      ref_params=copy(sft_params),
      reward_params=copy(reward_params),
      reward_gain=jnp.asarray(reward_gain, jnp.float32),
      reward_bias=jnp.asarray(reward_bias, jnp.float32),
      kl=losses.KLControllerState.create(init_kl_coef),
      ema_params=copy(sft_params),
      iteration=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.key(seed)))


@dataclasses.dataclass(frozen=True)
class PPOSettings:
  """Static PPO settings (bound into the pmapped functions; changing one recompiles)."""
  max_new_tokens: int                  # response length N
  stop_token_id: int                   # responses are cut after its first occurrence
  pad_token_id: int
  temperature: float = 1.0             # sampling temperature; the learner divides by it too
  top_k: int = 0                       # 0: no top-k filter
  top_p: float = 1.0                   # 1: no nucleus filter
  penalty_score: float = -1.0          # score of a response that never emits the stop token
  gae_gamma: float = 1.0
  gae_lambda: float = 0.95
  clip_eps: float = 0.2                # policy ratio clip
  value_clip_eps: float = 0.2          # value clip, in reward units
  ptx_coef: float = 0.0                # gamma of PPO-ptx; 0 is plain PPO
  num_epochs: int = 1                  # passes over each rollout
  num_minibatches: int = 1             # minibatches per pass (global batch / minibatch)
  ema_decay: float = 0.992
  kl_controller: str = "fixed"         # 'fixed' or 'adaptive'
  kl_target: float | None = None       # adaptive only
  kl_horizon: float | None = None      # adaptive only, in episodes
  episodes_per_iteration: int = 1      # global rollout batch: the controller's n_steps

  @property
  def updates_per_iteration(self) -> int:
    return self.num_epochs * self.num_minibatches


@flax.struct.dataclass
class Rollout:
  """One iteration's experience on one device; every field has the batch axis first."""
  sequences: jax.Array       # [batch, P + N] int32: left-padded prompt, then response
  attention_mask: jax.Array  # [batch, P + N] int32: 0 on prompt padding and after the stop
  response_mask: jax.Array   # [batch, N] float32: 1 up to and including the stop token
  old_logprobs: jax.Array    # [batch, N] log pi_old (learner's forward, temperature-scaled)
  old_values: jax.Array      # [batch, N] V_old before each response token
  advantages: jax.Array      # [batch, N] GAE, whitened over the global batch
  returns: jax.Array         # [batch, N] GAE returns: the value targets
  scores: jax.Array          # [batch] normalised reward-model score (or the penalty)


def _base_key(state: PPOState) -> jax.Array:
  return jax.random.wrap_key_data(state.rng)


def _iteration_key(state: PPOState, salt: int) -> jax.Array:
  """fold_in(fold_in(base, iteration), salt): the same on every device."""
  return jax.random.fold_in(jax.random.fold_in(_base_key(state), state.iteration), salt)


# ---------------------------------------------------------------------------------------
# Forward passes shared by the rollout, the learner and evaluation.
# ---------------------------------------------------------------------------------------


def rollout_scores(state: PPOState, sequences, attention_mask, response_mask, stopped,
                   prompt_len: int, penalty_score: float):
  """(score [batch], raw [batch]): the RM read at the last real response token.

  The score is gain * raw + bias, replaced by `penalty_score` where the response never
  emitted the stop token (the RM was trained on sequences ending in it).
  """
  raw = scoring.sequence_scores(state.value.apply_fn, state.reward_params, sequences,
                                attention_mask,
                                scoring.response_end_index(prompt_len, response_mask))
  score = state.reward_gain * raw + state.reward_bias
  return jnp.where(stopped, score, penalty_score), raw


def _global_mean(values, mask):
  return parallel.psum(losses.masked_sum(values, mask)).mean()


def _global_variance(values, mask):
  """Population variance of the masked entries over every device's batch (two passes)."""
  mean = _global_mean(values, mask)
  return _global_mean(jnp.square(values - mean), mask)


def _global_max(values, mask):
  return parallel.pmax(jnp.max(jnp.where(mask > 0, values, 0.0)))


# ---------------------------------------------------------------------------------------
# Rollout.
# ---------------------------------------------------------------------------------------


def score_responses(state: PPOState, prompt_ids, prompt_mask, response_ids,
                    sampler_logprobs=None, *, settings: PPOSettings):
  """Turns sampled responses into a `Rollout`: one forward each of policy, reference,
  value and reward model, then rewards, GAE and whitening over the global batch.

  Must run inside the pmap (whitening and metrics reduce over devices).

  Args:
    state: the current PPO state.
    prompt_ids, prompt_mask: [batch, P] left-padded prompts.
    response_ids: [batch, N] as sampled; cut after the first stop token here.
    sampler_logprobs: [batch, N] the sampler's log-probs, only compared with the learner's.
    settings: static settings.

  Returns:
    (Rollout, metrics dict of scalars, identical on every device).
  """
  prompt_len = prompt_ids.shape[1]
  response_ids, response_mask, stopped = scoring.truncate_after_stop(
      response_ids, settings.stop_token_id, settings.pad_token_id)
  sequences, attention_mask = scoring.join_prompt_response(prompt_ids, prompt_mask, response_ids,
                                                   response_mask)
  mask = response_mask.astype(jnp.float32)
  forward = functools.partial(scoring.response_logits, state.policy.apply_fn, sequences=sequences,
                              attention_mask=attention_mask, prompt_len=prompt_len)
  logits = forward(state.policy.params)
  logprobs = losses.token_logprobs(logits, response_ids, settings.temperature) * mask
  ref_logprobs = losses.token_logprobs(
      forward(state.ref_params), response_ids, settings.temperature) * mask
  values = scoring.response_values(state.value.apply_fn, state.value.params, sequences,
                           attention_mask, prompt_len) * mask
  scores, raw_scores = rollout_scores(state, sequences, attention_mask, mask, stopped,
                                       prompt_len, settings.penalty_score)

  kl_coef = state.kl.value
  rewards = losses.per_token_rewards(logprobs, ref_logprobs, scores, mask, kl_coef)
  advantages, returns = losses.gae(rewards, values, mask, settings.gae_gamma,
                                   settings.gae_lambda)
  whitened = losses.whiten(advantages, mask, global_sum=parallel.psum)
  rollout = Rollout(sequences=sequences, attention_mask=attention_mask, response_mask=mask,
                    old_logprobs=logprobs, old_values=values, advantages=whitened,
                    returns=returns, scores=scores)

  # --- Metrics: per-episode quantities averaged over the global batch. ---
  episodes = jnp.ones_like(scores)
  kl_k1 = jnp.sum(losses.kl_k1(logprobs, ref_logprobs) * mask, axis=-1)  # [batch]
  kl_k3 = jnp.sum(losses.kl_k3(logprobs, ref_logprobs) * mask, axis=-1)
  per_episode = lambda x: _global_mean(x, episodes)
  entropy = losses.entropy_from_logits(logits, settings.temperature)
  returns_variance = _global_variance(returns, mask)
  metrics = {
      "score": per_episode(scores),
      "score_raw": per_episode(raw_scores),
      "kl_k1": per_episode(kl_k1),
      "kl_k3": per_episode(kl_k3),
      "non_score_reward": per_episode(-kl_coef * kl_k1),
      "kl_coef": kl_coef,
      "entropy": _global_mean(entropy, mask),
      "response_length": per_episode(jnp.sum(mask, axis=-1)),
      "stopped_fraction": per_episode(stopped.astype(jnp.float32)),
      "value_mean": _global_mean(values, mask),
      "return_mean": _global_mean(returns, mask),
      # 1 - Var[R - V] / Var[R]: how much of the returns' variance the value net explains.
      "value_explained_variance": 1.0 - _global_variance(returns - values, mask) / (
          jnp.maximum(returns_variance, 1e-8)),
  }
  if sampler_logprobs is not None:
    # The KV-cache decode and the full forward differ only by float rounding; a large gap
    # means the sampler and the learner disagree about the model.
    metrics["sampler_logprob_max_diff"] = _global_max(
        jnp.abs(sampler_logprobs - logprobs), mask)
  return rollout, metrics


def rollout(state: PPOState, prompt_ids, prompt_mask, *, policy_model, settings: PPOSettings):
  """Samples one response per prompt with the current policy and scores it (in the pmap).

  The key is fold_in(base, iteration) then the device index, so a resumed run samples
  exactly what an uninterrupted one would.
  """
  key = parallel.device_rng(_iteration_key(state, _SAMPLE_SALT))
  out = sampling.sample(
      policy_model, state.policy.params, prompt_ids, prompt_mask, key,
      max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
      top_k=settings.top_k, top_p=settings.top_p, stop_token_id=settings.stop_token_id,
      pad_token_id=settings.pad_token_id)
  return score_responses(state, prompt_ids, prompt_mask, out.response_ids, out.logprobs,
                         settings=settings)


# ---------------------------------------------------------------------------------------
# Update.
# ---------------------------------------------------------------------------------------


def policy_loss_and_grads(params, minibatch: Rollout, ptx_batch: dict | None, *, apply_fn,
                          settings: PPOSettings):
  """Gradient of policy loss + ptx_coef * pretraining NLL, summed over devices.

  Both terms sit in one loss under one value_and_grad, so their gradients land in one
  buffer before the single optimizer update (PPO-ptx). Each term is a token-weighted mean
  over the global batch: local sums divided by the global count, then psum.

  Args:
    params: policy params.
    minibatch: a `Rollout` minibatch.
    ptx_batch: pretraining batch (input_ids, attention_mask, loss_mask [batch, T]) or None
      for plain PPO. The NLL uses temperature 1: it is the model's own likelihood of text.
    apply_fn: the policy's apply.
    settings: static settings.

  Returns:
    (grads, aux): aux holds the psum-ed MaskedSums and maxima of the diagnostics.
  """
  prompt_len = minibatch.sequences.shape[1] - settings.max_new_tokens
  response_ids = minibatch.sequences[:, prompt_len:]

  def loss_fn(params):
    logits = scoring.response_logits(apply_fn, params, minibatch.sequences,
                             minibatch.attention_mask, prompt_len)
    logprobs = losses.token_logprobs(logits, response_ids, settings.temperature)
    pg = losses.ppo_policy_loss(logprobs, minibatch.old_logprobs, minibatch.advantages,
                                minibatch.response_mask, settings.clip_eps)
    loss = pg.loss.total / jnp.maximum(parallel.psum(pg.loss.count), 1.0)
    aux = {"pg": pg, "log_ratio_abs_max": jnp.max(jnp.abs(
        jnp.where(minibatch.response_mask > 0, logprobs - minibatch.old_logprobs, 0.0)))}
    if ptx_batch is not None:
      ptx_logits = apply_fn({"params": params}, ptx_batch["input_ids"],
                            attention_mask=ptx_batch["attention_mask"])
      nll = losses.lm_nll(ptx_logits, ptx_batch["input_ids"], ptx_batch["loss_mask"])
      loss = loss + settings.ptx_coef * nll.total / jnp.maximum(parallel.psum(nll.count), 1.0)
      aux["ptx"] = nll
    return loss, aux

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  pg = aux["pg"]
  reduced = {
      "objective": parallel.psum(loss),
      "pg": parallel.psum(pg._replace(ratio_max=jnp.zeros(()))),
      "ratio_max": parallel.pmax(pg.ratio_max),
      "log_ratio_abs_max": parallel.pmax(aux["log_ratio_abs_max"]),
  }
  if "ptx" in aux:
    reduced["ptx"] = parallel.psum(aux["ptx"])
  return parallel.psum(grads), reduced


def value_loss_and_grads(params, minibatch: Rollout, *, apply_fn, settings: PPOSettings):
  """Gradient of the clipped value loss (token-weighted over the global batch)."""
  prompt_len = minibatch.sequences.shape[1] - settings.max_new_tokens

  def loss_fn(params):
    values = scoring.response_values(apply_fn, params, minibatch.sequences,
                             minibatch.attention_mask, prompt_len)
    out = losses.value_loss(values, minibatch.old_values, minibatch.returns,
                            minibatch.response_mask, settings.value_clip_eps)
    return out.loss.total / jnp.maximum(parallel.psum(out.loss.count), 1.0), out

  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return parallel.psum(grads), {"objective": parallel.psum(loss), "vf": parallel.psum(out)}


def select_minibatch(state: PPOState, batch: Rollout, update_index, num_minibatches: int):
  """Minibatch `update_index` of this iteration, cut on device with static shapes.

  Epoch e shuffles the device's rollout with fold_in(iteration key, e) and the device
  index; update i takes slice i % num_minibatches of epoch i // num_minibatches.
  """
  batch_size = batch.scores.shape[0]
  minibatch_size = batch_size // num_minibatches
  epoch = update_index // num_minibatches
  key = parallel.device_rng(jax.random.fold_in(_iteration_key(state, _SHUFFLE_SALT), epoch))
  order = jax.random.permutation(key, batch_size)
  rows = jax.lax.dynamic_slice_in_dim(order, (update_index % num_minibatches) *
                                      minibatch_size, minibatch_size)
  return jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0), batch)


def update_step(state: PPOState, batch: Rollout, ptx_batch: dict | None, update_index, *,
                settings: PPOSettings):
  """One optimizer update of policy and value on minibatch `update_index` (in the pmap).

  A step whose loss or gradients are non-finite leaves policy, value and EMA as they were
  (the host then stops on the logged NaN). The EMA follows the updated policy params.
  """
  minibatch = select_minibatch(state, batch, update_index, settings.num_minibatches)
  policy_grads, p = policy_loss_and_grads(state.policy.params, minibatch, ptx_batch,
                                          apply_fn=state.policy.apply_fn, settings=settings)
  value_grads, v = value_loss_and_grads(state.value.params, minibatch,
                                        apply_fn=state.value.apply_fn, settings=settings)
  policy, policy_norms = train_lib.apply_gradients_guarded(state.policy, policy_grads,
                                                           p["objective"])
  value, value_norms = train_lib.apply_gradients_guarded(state.value, value_grads,
                                                         v["objective"])
  finite = (policy_norms["loss_finite"] > 0) & (value_norms["loss_finite"] > 0)
  keep_if_finite = lambda new, old: jax.tree_util.tree_map(
      lambda a, b: jnp.where(finite, a, b), new, old)
  ema_params = optax.incremental_update(policy.params, state.ema_params,
                                        1.0 - settings.ema_decay)
  state = state.replace(
      policy=keep_if_finite(policy, state.policy),
      value=keep_if_finite(value, state.value),
      ema_params=keep_if_finite(ema_params, state.ema_params))

  pg, vf = p["pg"], v["vf"]
  metrics = {
      "policy_loss": pg.loss.mean(),
      "clip_fraction": pg.clip_fraction.mean(),
      "approx_kl": pg.approx_kl.mean(),
      "ratio_mean": pg.ratio.mean(),
      "ratio_max": p["ratio_max"],
      "log_ratio_abs_max": p["log_ratio_abs_max"],
      "value_loss": vf.loss.mean(),
      "value_clip_fraction": vf.clip_fraction.mean(),
      "loss_finite": finite.astype(jnp.float32),
  }
  if "ptx" in p:
    metrics["ptx_loss"] = p["ptx"].mean()
  for prefix, norms in (("policy", policy_norms), ("value", value_norms)):
    for name in ("grad_norm", "param_norm", "update_norm"):
      metrics[f"{prefix}_{name}"] = norms[name]
  return state, metrics


def _summarise_updates(per_update: dict) -> dict:
  """Per-update metrics [updates] -> scalars: means (maxima for *_max), plus the first
  minibatch's ratio diagnostics, which must read exactly 1 and 0."""
  summary = {}
  for name, values in per_update.items():
    summary[name] = jnp.max(values) if name.endswith("_max") else jnp.mean(values)
  summary["loss_finite"] = jnp.min(per_update["loss_finite"])
  summary["first_minibatch_ratio_mean"] = per_update["ratio_mean"][0]
  summary["first_minibatch_log_ratio_abs_max"] = per_update["log_ratio_abs_max"][0]
  summary["first_minibatch_clip_fraction"] = per_update["clip_fraction"][0]
  return summary


def train_iteration(state: PPOState, prompts: dict, ptx_batches: dict | None, *,
                    policy_model, settings: PPOSettings,
                    schedules: tuple[Callable, Callable] | None = None):
  """One PPO iteration on the device: rollout, all updates, KL controller, metrics.

  Args:
    state: PPO state (donated by the pmap).
    prompts: prompt_ids, prompt_mask [per_device_batch, P].
    ptx_batches: pretraining batches stacked per update, leaves
      [updates_per_iteration, per_device_ptx_batch, T], or None for plain PPO.
    policy_model: the CausalLM (for the sampler).
    settings: static settings.
    schedules: (policy, value) learning-rate schedules, only for logging.

  Returns:
    (new state, metrics of scalars identical on every device).
  """
  batch, metrics = rollout(state, prompts["prompt_ids"], prompts["prompt_mask"],
                           policy_model=policy_model, settings=settings)

  def body(state, inputs):
    update_index, ptx_batch = inputs
    return update_step(state, batch, ptx_batch, update_index, settings=settings)

  state, per_update = jax.lax.scan(
      body, state, (jnp.arange(settings.updates_per_iteration), ptx_batches))
  metrics.update(_summarise_updates(per_update))

  # The controller sees the rollout's KL (per episode, k1 summed over tokens), as in
  # lm-human-preferences; the new beta applies from the next rollout on.
  kl_update = losses.kl_update_fn(settings.kl_controller, settings.kl_target,
                                  settings.kl_horizon)
  kl = kl_update(state.kl, metrics["kl_k1"], settings.episodes_per_iteration)
  if schedules is not None:
    # The lr of the iteration's last update (step counts updates applied so far).
    metrics["policy_learning_rate"] = schedules[0](state.policy.step - 1)
    metrics["value_learning_rate"] = schedules[1](state.value.step - 1)
  metrics["policy_updates"] = state.policy.step.astype(jnp.float32)
  return state.replace(kl=kl, iteration=state.iteration + 1), metrics


# ---------------------------------------------------------------------------------------
# Evaluation (policy or its EMA).
# ---------------------------------------------------------------------------------------


def evaluate_step(params, state: PPOState, prompts: dict, *, policy_model,
                  settings: PPOSettings, greedy: bool):
  """Samples from `params` on evaluation prompts and scores the responses (in the pmap).

  The sampling key is the same at every evaluation, so successive evaluations differ
  only by the parameters. Rows with an empty prompt (or prompts["valid"] == 0) are
  padding and not counted.

  Returns:
    (sums of score, KL (k1) to the reference, length and stopped, each a psum-ed
    MaskedSum over episodes; (response_ids, response_mask) for logging texts).
  """
  prompt_ids, prompt_mask = prompts["prompt_ids"], prompts["prompt_mask"]
  prompt_len = prompt_ids.shape[1]
  # Evaluation batches pad their tail with empty prompts; those rows are not counted.
  valid = (jnp.sum(prompt_mask, axis=-1) > 0).astype(jnp.float32)
  if "valid" in prompts:
    valid = valid * prompts["valid"].astype(jnp.float32)
  key = parallel.device_rng(jax.random.fold_in(_base_key(state), _EVAL_SALT))
  out = sampling.sample(
      policy_model, params, prompt_ids, prompt_mask, key,
      max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
      top_k=settings.top_k, top_p=settings.top_p, stop_token_id=settings.stop_token_id,
      pad_token_id=settings.pad_token_id, greedy=greedy)
  response_ids, response_mask, stopped = scoring.truncate_after_stop(
      out.response_ids, settings.stop_token_id, settings.pad_token_id)
  sequences, attention_mask = scoring.join_prompt_response(prompt_ids, prompt_mask, response_ids,
                                                   response_mask)
  mask = response_mask.astype(jnp.float32)
  forward = functools.partial(scoring.response_logits, state.policy.apply_fn, sequences=sequences,
                              attention_mask=attention_mask, prompt_len=prompt_len)
  logprobs = losses.token_logprobs(forward(params), response_ids, settings.temperature)
  ref_logprobs = losses.token_logprobs(forward(state.ref_params), response_ids,
                                       settings.temperature)
  scores, _ = rollout_scores(state, sequences, attention_mask, mask, stopped, prompt_len,
                              settings.penalty_score)
  kl = jnp.sum(losses.kl_k1(logprobs, ref_logprobs) * mask, axis=-1)
  sums = {
      "score": losses.masked_sum(scores, valid),
      "kl_k1": losses.masked_sum(kl, valid),
      "response_length": losses.masked_sum(jnp.sum(mask, axis=-1), valid),
      "stopped_fraction": losses.masked_sum(stopped.astype(jnp.float32), valid),
  }
  return parallel.psum(sums), (response_ids, response_mask)


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


def restore_or_keep(checkpointer: checkpoint_lib.Checkpointer, state: PPOState, prompt_iter,
                    ptx_iter) -> tuple[PPOState, int]:
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
  state: PPOState       # replicated, as the loop left it
  iteration: int
  history: list         # host metrics of every iteration run here
  eval_history: list    # {"iteration": i, **metrics} of every evaluation run here
  preempted: bool = False


def run_iterations(*, rstate: PPOState, iteration_fn: Callable, prompt_iter: Iterator[dict],
                   ptx_iter: Iterator[dict] | None, updates_per_iteration: int,
                   start_iteration: int, num_iterations: int,
                   checkpointer: checkpoint_lib.Checkpointer,
                   writer: metrics_lib.MetricWriter,
                   eval_fn: Callable[[PPOState, int], dict] | None = None,
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
      train_lib.check_finite(iteration, metrics, names=_MUST_BE_FINITE)
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


# ---------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------


def settings_from_config(config: ml_collections.ConfigDict, tokenizer) -> PPOSettings:
  """Static settings from a configs/ppo.py config; checks the batch arithmetic."""
  parallel.check_batch_size(config.batch_size)
  parallel.check_batch_size(config.minibatch_size, "minibatch_size")
  if config.batch_size % config.minibatch_size:
    raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of "
                     f"config.minibatch_size={config.minibatch_size}.")
  if config.num_ppo_epochs < 1:
    raise ValueError(f"config.num_ppo_epochs={config.num_ppo_epochs} must be >= 1.")
  if config.ptx.coef < 0:
    raise ValueError(f"config.ptx.coef={config.ptx.coef} must be >= 0 (0 = plain PPO).")
  return PPOSettings(
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


def _optimizer_section(section: ml_collections.ConfigDict,
                       updates_per_iteration: int) -> ml_collections.ConfigDict:
  """A copy of an optimizer section with warm-up counted in updates.

  PPO states its warm-up in iterations (InstructGPT: 10); the optimizer counts updates.
  """
  derived = ml_collections.ConfigDict(section.to_dict())
  if section.get("warmup_iterations"):
    derived.warmup_steps = int(section.warmup_iterations) * updates_per_iteration
  return derived


def _model_section(config: ml_collections.ConfigDict, init_from: str, seed: int):
  """The fields model_lib.load_or_init reads, for the policy or the reward model."""
  return ml_collections.ConfigDict(dict(
      init_from=init_from, model=config.model.to_dict(), seed=seed, dtype=config.dtype,
      param_dtype=config.param_dtype, dropout_rate=0.0))


def _require_score_head(path: str) -> None:
  config_file = epath.Path(path) / models.hf.CONFIG_FILE
  if not config_file.exists():
    raise FileNotFoundError(f"config.reward_init_from={path!r}: no {models.hf.CONFIG_FILE} "
                            "there (expected the reward model's <workdir>/hf).")
  hf = json.loads(config_file.read_text())
  classifier = any(str(a).endswith("ForSequenceClassification")
                   for a in hf.get("architectures") or [])
  if not (hf.get(models.hf.SCORE_HEAD_KEY) or classifier):
    raise ValueError(f"config.reward_init_from={path!r} holds a causal LM, not a reward "
                     f"model ({config_file} has no {models.hf.SCORE_HEAD_KEY!r} flag).")


def _pretrain_data_config(config: ml_collections.ConfigDict, batch_size: int):
  """A pretraining-stage view of config.ptx for data_lib.lm_data (same world as the
  prompts, so both read one <workdir>/world)."""
  data = dict(config.ptx.data.to_dict(), world=config.data.world.to_dict(),
              world_dir=config.data.world_dir, skip_invalid=config.data.skip_invalid,
              max_prompt_len=config.data.max_prompt_len,
              max_response_len=config.data.max_response_len)
  return ml_collections.ConfigDict(dict(
      stage="pretrain", seed=config.seed, data=data, batch_size=batch_size,
      num_eval_batches=config.ptx.num_eval_batches))


def _take(iterable, n: int):
  for i, item in enumerate(iterable):
    if n and i >= n:
      return
    yield item


def evaluate(eval_step_p, rparams, rstate, batches, tokenizer=None,
             num_texts: int = 0) -> tuple[dict, list[str]]:
  """Means of `evaluate_step` over host prompt batches, and a few decoded responses."""
  totals, texts = None, []
  for batch in batches:
    device_batch = device_prompts(batch)
    if "valid" in batch:
      device_batch["valid"] = np.asarray(batch["valid"], np.float32)
    sums, (ids, mask) = eval_step_p(rparams, rstate, train_lib.put_batch(device_batch))
    sums = parallel.fetch(sums)
    totals = sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
    if tokenizer is not None and len(texts) < num_texts:
      ids, mask = parallel.unshard(jax.device_get((ids, mask)))
      prompts = parallel.unshard(device_batch)
      for p, pm, r, rm in zip(prompts["prompt_ids"], prompts["prompt_mask"], ids, mask):
        if len(texts) < num_texts:
          texts.append(f"{tokenizer.decode(p[pm > 0].tolist())!r} -> "
                       f"{tokenizer.decode(r[rm > 0].tolist())!r}")
  if totals is None:
    return {}, texts
  return {name: float(s.total / max(s.count, 1.0)) for name, s in totals.items()}, texts


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs PPO (config.ptx.coef 0) or PPO-ptx from an SFT policy and a reward model.

  Resumes from `workdir` by itself; writes metrics.jsonl/TensorBoard, exports the policy
  to <workdir>/hf and its EMA to <workdir>/hf_ema, and returns (and saves) a summary.
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer = models.load_tokenizer(config.tokenizer)
  settings = settings_from_config(config, tokenizer)
  updates = settings.updates_per_iteration
  use_ptx = settings.ptx_coef > 0

  # --- Data -------------------------------------------------------------------------
  prompt_data = data_lib.prompt_data(config, tokenizer, workdir)
  # Pretraining text: mixed into the policy loss for PPO-ptx, and its held-out NLL
  # measures the "alignment tax" with or without ptx.
  pretrain_data = None
  if use_ptx or config.ptx.eval_nll:
    pretrain_data = data_lib.lm_data(_pretrain_data_config(config, ptx_batch_size(config)),
                                     tokenizer, workdir)
  prompt_iter = prompt_data.train_iter
  ptx_iter = pretrain_data.train_iter if use_ptx else None

  # --- Models and state -------------------------------------------------------------
  seq_len = config.data.max_prompt_len + settings.max_new_tokens
  policy_model, sft_params = model_lib.load_or_init(
      "lm", _model_section(config, config.policy_init_from, config.seed), tokenizer,
      seq_len=seq_len)
  if config.reward_init_from:
    _require_score_head(config.reward_init_from)
  value_model, reward_params = model_lib.load_or_init(
      "scalar", _model_section(config, config.reward_init_from, config.seed + 1), tokenizer,
      seq_len=seq_len)
  total_updates = config.num_iterations * updates
  policy_tx, policy_schedule = optim.make_optimizer(
      _optimizer_section(config.policy_optimizer, updates), total_updates)
  value_tx, value_schedule = optim.make_optimizer(
      _optimizer_section(config.value_optimizer, updates), total_updates)
  state = create_ppo_state(
      policy_model=policy_model, sft_params=sft_params, value_model=value_model,
      reward_params=reward_params, policy_tx=policy_tx, value_tx=value_tx,
      init_kl_coef=config.kl.init_coef, seed=config.seed,
      reward_gain=config.reward.gain, reward_bias=config.reward.bias)
  metrics_lib.console(
      f"{config.get('stage', 'ppo')}: policy {train_lib.count_params(sft_params)} params, "
      f"value {train_lib.count_params(reward_params)} params; {config.num_iterations} "
      f"iterations of {config.batch_size} episodes, {updates} updates each")
  del sft_params, reward_params

  checkpointer = checkpoint_lib.Checkpointer(
      workdir / "checkpoints", save_every=config.checkpoint_every,
      keep=config.keep_checkpoints)
  state, start_iteration = restore_or_keep(checkpointer, state, prompt_iter, ptx_iter)
  if start_iteration:
    print(f"Resuming {config.get('stage', 'ppo')} from iteration {start_iteration} in "
          f"{workdir}", flush=True)
  writer = metrics_lib.MetricWriter(workdir)
  if start_iteration == 0:
    writer.write_config(config)

  # --- Pmapped functions ------------------------------------------------------------
  iteration_p = parallel.pmap_step(functools.partial(
      train_iteration, policy_model=policy_model, settings=settings,
      schedules=(policy_schedule, value_schedule)))
  eval_step_p = parallel.pmap_fn(functools.partial(
      evaluate_step, policy_model=policy_model, settings=settings,
      greedy=config.eval_greedy))
  nll_step_p = parallel.pmap_fn(functools.partial(scoring.lm_eval_step,
                                                  apply_fn=policy_model.apply))

  def eval_batches():
    return _take(prompt_data.eval_batches(), config.num_eval_batches)

  def eval_fn(rstate, iteration):
    metrics = {}
    for name, rparams in (("policy", rstate.policy.params), ("ema", rstate.ema_params)):
      means, texts = evaluate(eval_step_p, rparams, rstate, eval_batches(), tokenizer,
                              config.num_sample_texts if name == "ema" else 0)
      metrics.update({f"eval_{name}_{k}": v for k, v in means.items()})
      if pretrain_data is not None:
        nll = scoring.evaluate_nll(nll_step_p, rparams, pretrain_data.eval_batches())
        metrics[f"eval_{name}_pretrain_nll"] = nll["eval_loss"]
      if texts:
        writer.write_texts(iteration, {f"sample_{i}": t for i, t in enumerate(texts)})
    return metrics

  # --- Loop -------------------------------------------------------------------------
  t0 = time.time()
  rstate = parallel.replicate(state)
  del state
  # Kept in the workdir so that a resumed run's summary still compares with it.
  initial_eval_file = workdir / "initial_eval.json"
  initial_eval = None
  if start_iteration == 0 and config.eval_every:
    initial_eval = eval_fn(rstate, 0)
    writer.write_scalars(0, initial_eval)
    if jax.process_index() == 0:
      checkpoint_lib.save_json(initial_eval_file, initial_eval)
  elif initial_eval_file.exists():
    initial_eval = json.loads(initial_eval_file.read_text())
  result = run_iterations(
      rstate=rstate, iteration_fn=iteration_p, prompt_iter=prompt_iter, ptx_iter=ptx_iter,
      updates_per_iteration=updates, start_iteration=start_iteration,
      num_iterations=config.num_iterations, checkpointer=checkpointer, writer=writer,
      eval_fn=eval_fn, eval_every=config.eval_every, desc=config.get("stage", "ppo"))
  checkpointer.close()
  if result.preempted:
    writer.close()
    return {"preempted": True, "iteration": result.iteration}

  final_eval = None
  if result.eval_history and result.eval_history[-1]["iteration"] == result.iteration:
    final_eval = result.eval_history[-1]
  elif config.eval_every:  # e.g. resumed at the end: nothing ran, evaluate what was saved
    final_eval = eval_fn(result.state, result.iteration)
  last = result.history[-1] if result.history else {}
  first = result.history[0] if result.history and start_iteration == 0 else {}
  summary = {
      "stage": config.get("stage", "ppo"),
      "iterations": result.iteration,
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
  if jax.process_index() == 0:
    for name, params in (("hf", host_state.policy.params), ("hf_ema", host_state.ema_params)):
      models.save_pretrained(policy_model, params, str(workdir / name))
      tokenizer.save_pretrained(str(workdir / name))
    checkpoint_lib.save_json(workdir / "summary.json", summary)
  figures = {"score": summary["final_score"], "KL": summary["final_kl"]}
  metrics_lib.console(
      f"{config.get('stage', 'ppo')}: {metrics_lib.format_figures(figures)}; policy in "
      f"{workdir / 'hf'} (EMA {workdir / 'hf_ema'}), summary in {workdir / 'summary.json'}")
  parallel.sync_global_devices("ppo_export")
  writer.close()
  return summary

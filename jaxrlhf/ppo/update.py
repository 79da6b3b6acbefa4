"""PPO's update, on the device: clipped policy and value losses over shuffled minibatches.

`train_iteration` is one whole iteration as one pmapped call: the rollout, every epoch's
minibatch updates (plus gamma times the pretraining NLL for PPO-ptx, in the same
gradient), the KL controller and the EMA.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxrlhf import losses
from jaxrlhf import parallel
from jaxrlhf import scoring
from jaxrlhf import train_lib
from jaxrlhf.ppo import rollout as rollout_lib
from jaxrlhf.ppo import state as ppo_state


# ---------------------------------------------------------------------------------------
# Update.
# ---------------------------------------------------------------------------------------


def policy_loss_and_grads(params, minibatch: ppo_state.Rollout, ptx_batch: dict | None, *,
                          apply_fn, settings: ppo_state.PPOSettings):
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

  def loss_fn(params):
    logprobs = scoring.response_logprobs(apply_fn, params, minibatch.sequences,
                                         minibatch.attention_mask, prompt_len,
                                         temperature=settings.temperature)
    pg = losses.ppo_policy_loss(logprobs, minibatch.old_logprobs, minibatch.advantages,
                                minibatch.response_mask, settings.clip_eps)
    loss = pg.loss.total / jnp.maximum(parallel.psum(pg.loss.count), 1.0)
    aux = {"pg": pg, "log_ratio_abs_max": jnp.max(jnp.abs(
        jnp.where(minibatch.response_mask > 0, logprobs - minibatch.old_logprobs, 0.0)))}
    if ptx_batch is not None:
      nll = scoring.lm_nll(apply_fn, params, ptx_batch)
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


def value_loss_and_grads(params, minibatch: ppo_state.Rollout, *, apply_fn,
                         settings: ppo_state.PPOSettings):
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


def select_minibatch(state: ppo_state.PPOState, batch: ppo_state.Rollout, update_index,
                     num_minibatches: int):
  """Minibatch `update_index` of this iteration, cut on device with static shapes.

  Epoch e shuffles the device's rollout with fold_in(iteration key, e) and the device
  index; update i takes slice i % num_minibatches of epoch i // num_minibatches.
  """
  epoch = update_index // num_minibatches
  key = jax.random.fold_in(ppo_state.iteration_key(state, ppo_state.SHUFFLE_SALT), epoch)
  rows = parallel.shuffled_slice(key, batch.scores.shape[0], num_minibatches,
                                 update_index % num_minibatches)
  return jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0), batch)


def update_step(state: ppo_state.PPOState, batch: ppo_state.Rollout, ptx_batch: dict | None,
                update_index, *, settings: ppo_state.PPOSettings):
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


def train_iteration(state: ppo_state.PPOState, prompts: dict, ptx_batches: dict | None, *,
                    policy_model, settings: ppo_state.PPOSettings,
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
  batch, metrics = rollout_lib.rollout(state, prompts["prompt_ids"], prompts["prompt_mask"],
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

"""PPO's rollout and its evaluation, on the device: sample, cut at the stop token, score.

A rollout is one forward pass each of policy, reference, value and reward model over the
sampled responses, then per-token KL rewards, GAE and advantages whitened over the
global batch (docs/design.md, section 3). `evaluate_step` samples and scores held-out
prompts the same way, greedily or not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrlhf import losses
from jaxrlhf import parallel
from jaxrlhf import sampling
from jaxrlhf import scoring
from jaxrlhf.ppo import state as ppo_state


# ---------------------------------------------------------------------------------------
# Forward passes shared by the rollout, the learner and evaluation.
# ---------------------------------------------------------------------------------------


def rollout_scores(state: ppo_state.PPOState, sequences, attention_mask, response_mask, stopped,
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


def score_responses(state: ppo_state.PPOState, prompt_ids, prompt_mask, response_ids,
                    sampler_logprobs=None, *, settings: ppo_state.PPOSettings):
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
  forward = functools.partial(scoring.response_logprobs, state.policy.apply_fn,
                              sequences=sequences, attention_mask=attention_mask,
                              prompt_len=prompt_len, temperature=settings.temperature)
  logprobs, entropy = forward(state.policy.params, with_entropy=True)
  logprobs = logprobs * mask
  ref_logprobs = forward(state.ref_params) * mask
  values = scoring.response_values(state.value.apply_fn, state.value.params, sequences,
                           attention_mask, prompt_len) * mask
  scores, raw_scores = rollout_scores(state, sequences, attention_mask, mask, stopped,
                                       prompt_len, settings.penalty_score)

  kl_coef = state.kl.value
  rewards = losses.per_token_rewards(logprobs, ref_logprobs, scores, mask, kl_coef)
  advantages, returns = losses.gae(rewards, values, mask, settings.gae_gamma,
                                   settings.gae_lambda)
  whitened = losses.whiten(advantages, mask, global_sum=parallel.psum)
  rollout = ppo_state.Rollout(sequences=sequences, attention_mask=attention_mask,
                              response_mask=mask, old_logprobs=logprobs, old_values=values,
                              advantages=whitened, returns=returns, scores=scores)

  # --- Metrics: per-episode quantities averaged over the global batch. ---
  episodes = jnp.ones_like(scores)
  kl_k1 = jnp.sum(losses.kl_k1(logprobs, ref_logprobs) * mask, axis=-1)  # [batch]
  kl_k3 = jnp.sum(losses.kl_k3(logprobs, ref_logprobs) * mask, axis=-1)
  per_episode = lambda x: _global_mean(x, episodes)
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


def _sample(policy_model, params, key, prompt_ids, prompt_mask, *,
            settings: ppo_state.PPOSettings, greedy: bool) -> sampling.SampleOutput:
  return sampling.sample(
      policy_model, params, prompt_ids, prompt_mask, key,
      max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
      top_k=settings.top_k, top_p=settings.top_p, stop_token_id=settings.stop_token_id,
      pad_token_id=settings.pad_token_id, greedy=greedy)


def rollout(state: ppo_state.PPOState, prompt_ids, prompt_mask, *, policy_model,
            settings: ppo_state.PPOSettings):
  """Samples one response per prompt with the current policy and scores it (in the pmap).

  The key is fold_in(base, iteration) then the device index, so a resumed run samples
  exactly what an uninterrupted one would.
  """
  out = parallel.per_device(functools.partial(
      _sample, policy_model, state.policy.params, settings=settings, greedy=False),
      ppo_state.iteration_key(state, ppo_state.SAMPLE_SALT), prompt_ids, prompt_mask)
  return score_responses(state, prompt_ids, prompt_mask, out.response_ids, out.logprobs,
                         settings=settings)


# ---------------------------------------------------------------------------------------
# Evaluation (policy or its EMA).
# ---------------------------------------------------------------------------------------


def evaluate_step(params, state: ppo_state.PPOState, prompts: dict, *, policy_model,
                  settings: ppo_state.PPOSettings, greedy: bool):
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
  out = parallel.per_device(
      functools.partial(_sample, policy_model, params, settings=settings, greedy=greedy),
      jax.random.fold_in(ppo_state.base_key(state), ppo_state.EVAL_SALT),
      prompt_ids, prompt_mask)
  response_ids, response_mask, stopped = scoring.truncate_after_stop(
      out.response_ids, settings.stop_token_id, settings.pad_token_id)
  sequences, attention_mask = scoring.join_prompt_response(prompt_ids, prompt_mask, response_ids,
                                                   response_mask)
  mask = response_mask.astype(jnp.float32)
  forward = functools.partial(scoring.response_logprobs, state.policy.apply_fn,
                              sequences=sequences, attention_mask=attention_mask,
                              prompt_len=prompt_len, temperature=settings.temperature)
  logprobs = forward(params)
  ref_logprobs = forward(state.ref_params)
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

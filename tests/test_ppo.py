"""PPO on a tiny random model over 4 CPU devices: ratio 1 on the first minibatch, the
ptx gradient, stop-token cuts and the penalty, the KL controller, EMA, bit-identical resume."""

import dataclasses
import functools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf import checkpoint as checkpoint_lib
from jaxrlhf import losses
from jaxrlhf import metrics as metrics_lib
from jaxrlhf import models
from jaxrlhf import parallel
from jaxrlhf import ppo
from jaxrlhf import scoring
from jaxrlhf import train_lib

VOCAB = 64
PAD, STOP = 0, 2
PROMPT_LEN, NEW_TOKENS = 6, 4
BATCH = 8            # global rollout batch: 2 episodes per device
PTX_BATCH, PTX_LEN = 8, 8
DEVICES = 4
INIT_KL = 0.05
GAIN, BIAS = 1.5, -0.25

SETTINGS = ppo.PPOSettings(
    max_new_tokens=NEW_TOKENS, stop_token_id=STOP, pad_token_id=PAD, temperature=0.7,
    penalty_score=-3.0, num_epochs=2, num_minibatches=2, ptx_coef=0.5, ema_decay=0.9,
    kl_controller="adaptive", kl_target=0.01, kl_horizon=40.0, episodes_per_iteration=BATCH)


def _prompts(seed: int) -> dict:
  """Left-padded prompts [BATCH, PROMPT_LEN] of random real lengths 2..6, no stop token."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, size=(BATCH, PROMPT_LEN)).astype(np.int32)
  lengths = rng.integers(2, PROMPT_LEN + 1, size=BATCH)
  mask = (np.arange(PROMPT_LEN)[None] >= PROMPT_LEN - lengths[:, None]).astype(np.int32)
  return {"prompt_ids": np.where(mask > 0, ids, PAD), "prompt_mask": mask}


def _ptx(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, size=(PTX_BATCH, PTX_LEN)).astype(np.int32)
  lengths = rng.integers(3, PTX_LEN + 1, size=PTX_BATCH)
  mask = (np.arange(PTX_LEN)[None] < lengths[:, None]).astype(np.int32)
  loss_mask = mask.copy()
  loss_mask[:, 0] = 0
  return {"input_ids": np.where(mask > 0, ids, PAD), "attention_mask": mask,
          "loss_mask": loss_mask}


class _Synthetic:
  """A checkpointable iterator of host batches [devices, per_device, ...]."""

  def __init__(self, make, seed: int):
    self.make, self.seed, self.position = make, seed, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = self.make(self.seed * 1000 + self.position)
    self.position += 1
    return {**parallel.shard(batch, DEVICES), "meta": np.zeros((DEVICES, 1))}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def _put(tree):
  return parallel.device_put_sharded(parallel.shard(tree, DEVICES))


def _split_like(key, tree):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return jax.tree_util.tree_unflatten(treedef, list(jax.random.split(key, len(leaves))))


@pytest.fixture(scope="module")
def setup():
  config = models.TransformerConfig.tiny("llama", vocab_size=VOCAB, num_layers=1,
                                         eos_token_id=STOP, pad_token_id=PAD)
  policy_model = models.CausalLM(config)
  value_model = models.ScalarHeadModel(config)
  sft_params = models.init_params(policy_model, jax.random.key(0), seq_len=10)
  reward_params = models.init_params(value_model, jax.random.key(1), seq_len=10)
  state = ppo.create_ppo_state(
      policy_model=policy_model, sft_params=sft_params, value_model=value_model,
      reward_params=reward_params, policy_tx=optax.adam(3e-3), value_tx=optax.adam(1e-2),
      init_kl_coef=INIT_KL, seed=0, reward_gain=GAIN, reward_bias=BIAS)
  # Move the policy off the reference, as a few iterations would, so KL terms are not 0.
  noise = jax.tree_util.tree_map(
      lambda p, k: 0.05 * jax.random.normal(k, p.shape, p.dtype), sft_params,
      _split_like(jax.random.key(2), sft_params))
  state = state.replace(policy=state.policy.replace(params=jax.tree_util.tree_map(
      lambda p, n: np.asarray(p + n), sft_params, noise)))
  iteration_p = parallel.pmap_step(functools.partial(
      ppo.train_iteration, policy_model=policy_model, settings=SETTINGS))
  return dict(config=config, policy_model=policy_model, value_model=value_model,
              sft_params=sft_params, reward_params=reward_params, state=state,
              iteration_p=iteration_p)


@pytest.fixture(scope="module")
def score_p():
  # lambda 1 makes the first return of an episode its total reward.
  settings = dataclasses.replace(SETTINGS, gae_lambda=1.0)
  return parallel.pmap_fn(functools.partial(ppo.score_responses, settings=settings))


@pytest.fixture(scope="module")
def first_iteration(setup):
  """One iteration from the initial state, with ptx: (state, metrics) on the host."""
  rstate = parallel.replicate(setup["state"])
  ptx = ppo.stack_ptx_batches([parallel.shard(_ptx(i), DEVICES)
                               for i in range(SETTINGS.updates_per_iteration)])
  rstate, metrics = setup["iteration_p"](rstate, _put(_prompts(0)),
                                         parallel.device_put_sharded(ptx))
  return parallel.unreplicate(rstate), parallel.fetch(metrics)


def _tree_max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ---------------------------------------------------------------------------------------
# Rollout: stop tokens, penalty, rewards.
# ---------------------------------------------------------------------------------------


def test_truncate_after_stop():
  ids = jnp.array([[5, STOP, 7, STOP], [5, 6, 7, 8], [STOP, 9, 9, 9]])
  cut, mask, stopped = scoring.truncate_after_stop(ids, STOP, PAD)
  np.testing.assert_array_equal(cut, [[5, STOP, PAD, PAD], [5, 6, 7, 8], [STOP, PAD, PAD, PAD]])
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
  np.testing.assert_array_equal(stopped, [True, False, True])


def _responses(seed):
  """Responses with stops at varied places; odd rows never stop."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, size=(BATCH, NEW_TOKENS)).astype(np.int32)
  for row in range(0, BATCH, 2):
    ids[row, (row // 2) % NEW_TOKENS] = STOP
  return ids


def test_rollout_cuts_after_stop_and_penalises_unfinished(setup, score_p):
  state, value_model = setup["state"], setup["value_model"]
  prompts, responses = _prompts(1), _responses(1)
  rstate = parallel.replicate(state)
  rollout, metrics = score_p(rstate, *_put((prompts["prompt_ids"], prompts["prompt_mask"],
                                            responses)))
  rollout, metrics = parallel.unshard(jax.device_get(rollout)), parallel.fetch(metrics)
  stops = np.arange(BATCH) % 2 == 0
  lengths = np.where(stops, (np.arange(BATCH) // 2) % NEW_TOKENS + 1, NEW_TOKENS)
  expected_mask = (np.arange(NEW_TOKENS)[None] < lengths[:, None])
  np.testing.assert_array_equal(rollout.response_mask, expected_mask)
  response_part = rollout.sequences[:, PROMPT_LEN:]
  np.testing.assert_array_equal(response_part[~expected_mask], PAD)
  np.testing.assert_array_equal(rollout.attention_mask[:, PROMPT_LEN:], expected_mask)
  for name in ("old_logprobs", "old_values", "advantages", "returns"):
    np.testing.assert_array_equal(getattr(rollout, name)[~expected_mask], 0.0)

  # Unfinished responses get the penalty; finished ones gain * RM + bias, where the RM is
  # read at the stop token of the unpadded sequence (left padding shifts nothing).
  np.testing.assert_array_equal(rollout.scores[~stops], SETTINGS.penalty_score)
  unpadded = [np.concatenate([prompts["prompt_ids"][row][prompts["prompt_mask"][row] > 0],
                              responses[row, :lengths[row]]]) for row in np.flatnonzero(stops)]
  width = max(len(u) for u in unpadded)
  right_padded = np.stack([np.pad(u, (0, width - len(u))) for u in unpadded])
  right_mask = np.stack([np.arange(width) < len(u) for u in unpadded]).astype(np.int32)
  raw = jax.jit(value_model.apply)({"params": setup["reward_params"]}, right_padded,
                                   attention_mask=right_mask)
  raw = np.asarray(raw)[np.arange(len(unpadded)), [len(u) - 1 for u in unpadded]]
  np.testing.assert_allclose(rollout.scores[stops], GAIN * raw + BIAS, rtol=1e-5, atol=1e-5)

  # With gamma = lambda = 1 the first return is the whole reward: score - beta * sum(k1).
  target = rollout.sequences[:, PROMPT_LEN:]
  policy_logprobs = jax.jit(lambda params: losses.token_logprobs(setup["policy_model"].apply(
      {"params": params}, rollout.sequences, attention_mask=rollout.attention_mask)[
          :, PROMPT_LEN - 1:-1], target, SETTINGS.temperature))
  logp = policy_logprobs(state.policy.params)
  ref_logp = policy_logprobs(state.ref_params)
  kl = np.sum((logp - ref_logp) * expected_mask, axis=1)
  np.testing.assert_allclose(rollout.returns[:, 0], rollout.scores - INIT_KL * kl,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rollout.old_logprobs, logp * expected_mask, atol=2e-6)
  np.testing.assert_allclose(metrics["stopped_fraction"], stops.mean())
  np.testing.assert_allclose(metrics["response_length"], lengths.mean())
  np.testing.assert_allclose(metrics["score"], rollout.scores.mean(), rtol=1e-6)

  # Advantages are whitened over the global batch, not per device.
  adv = rollout.advantages[expected_mask]
  np.testing.assert_allclose([adv.mean(), adv.std()], [0.0, 1.0], atol=1e-4)

  # Tokens after the stop are padding: changing them changes nothing.
  changed = responses.copy()
  changed[~expected_mask] = 7
  again, _ = score_p(rstate, *_put((prompts["prompt_ids"], prompts["prompt_mask"], changed)))
  again = parallel.unshard(jax.device_get(again))
  for a, b in zip(jax.tree_util.tree_leaves(rollout), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------
# Update: ratio, ptx gradient, EMA, KL controller.
# ---------------------------------------------------------------------------------------


def test_first_minibatch_ratio_is_one(first_iteration):
  _, metrics = first_iteration
  assert metrics["first_minibatch_log_ratio_abs_max"] < 1e-5
  np.testing.assert_allclose(metrics["first_minibatch_ratio_mean"], 1.0, atol=1e-6)
  assert metrics["first_minibatch_clip_fraction"] == 0.0
  # Later updates see moved parameters, so the check above is not vacuous.
  assert metrics["log_ratio_abs_max"] > 1e-3
  assert metrics["loss_finite"] == 1.0
  for name in ("score", "kl_k1", "kl_k3", "entropy", "clip_fraction", "approx_kl",
               "value_explained_variance", "response_length", "stopped_fraction",
               "ptx_loss", "kl_coef", "value_loss", "sampler_logprob_max_diff"):
    assert np.isfinite(metrics[name]), name
  # The sampler's KV-cache log-probs agree with the learner's full forward.
  assert metrics["sampler_logprob_max_diff"] < 1e-4


def test_bfloat16_compute_and_frozen_storage_keep_the_first_ratio_at_one(setup):
  # Mixed precision: bfloat16 compute over float32 master params and Adam states, the
  # frozen reference and reward model stored in bfloat16.
  config = setup["config"].replace(dtype=jnp.bfloat16)
  policy_model, value_model = models.CausalLM(config), models.ScalarHeadModel(config)
  state = ppo.create_ppo_state(
      policy_model=policy_model, sft_params=setup["sft_params"], value_model=value_model,
      reward_params=setup["reward_params"], policy_tx=optax.adam(3e-3),
      value_tx=optax.adam(1e-2), init_kl_coef=INIT_KL, seed=0, reward_gain=GAIN,
      reward_bias=BIAS, frozen_dtype=jnp.bfloat16)
  dtypes = lambda tree: {np.dtype(x.dtype) for x in jax.tree_util.tree_leaves(tree)}
  assert dtypes(state.ref_params) == dtypes(state.reward_params) == {np.dtype(jnp.bfloat16)}
  assert dtypes(state.policy.params) == dtypes(state.value.params) == {np.dtype(np.float32)}
  assert dtypes(state.ema_params) == {np.dtype(np.float32)}
  state = state.replace(policy=state.policy.replace(params=setup["state"].policy.params))
  iteration_p = parallel.pmap_step(functools.partial(
      ppo.train_iteration, policy_model=policy_model, settings=SETTINGS))
  ptx = ppo.stack_ptx_batches([parallel.shard(_ptx(i), DEVICES)
                               for i in range(SETTINGS.updates_per_iteration)])
  rstate, metrics = iteration_p(parallel.replicate(state), _put(_prompts(0)),
                                parallel.device_put_sharded(ptx))
  metrics = parallel.fetch(metrics)
  # The rollout's log-probabilities and the first update's come from one computation.
  assert metrics["first_minibatch_log_ratio_abs_max"] == 0.0
  assert metrics["first_minibatch_ratio_mean"] == 1.0
  assert metrics["log_ratio_abs_max"] > 1e-3 and metrics["loss_finite"] == 1.0
  after = parallel.unreplicate(rstate)
  assert dtypes(after.policy.opt_state) <= {np.dtype(np.float32), np.dtype(np.int32)}
  assert dtypes(after.ref_params) == {np.dtype(jnp.bfloat16)}


def test_kl_controller_and_rewards_wired(first_iteration):
  state, metrics = first_iteration
  assert metrics["kl_coef"] == pytest.approx(INIT_KL)
  np.testing.assert_allclose(metrics["non_score_reward"], -INIT_KL * metrics["kl_k1"],
                             rtol=1e-5, atol=1e-7)
  error = np.clip(metrics["kl_k1"] / SETTINGS.kl_target - 1.0, -0.2, 0.2)
  expected = INIT_KL * (1.0 + error * BATCH / SETTINGS.kl_horizon)
  np.testing.assert_allclose(state.kl.value, expected, rtol=1e-6)
  assert state.kl.value != pytest.approx(INIT_KL)
  assert int(state.iteration) == 1
  assert int(state.policy.step) == SETTINGS.updates_per_iteration
  assert int(state.value.step) == SETTINGS.updates_per_iteration


GAMMA = 2.5


@pytest.fixture(scope="module")
def update_checks(setup, score_p):
  """One compiled program for the update-level checks, run once: a plain update step on a
  fresh rollout, and the policy gradient at perturbed params without ptx, with ptx at
  gamma 0 and with ptx at GAMMA."""
  state = setup["state"]
  rstate = parallel.replicate(state)
  prompts, responses = _prompts(2), _responses(2)
  rollout, _ = score_p(rstate, *_put((prompts["prompt_ids"], prompts["prompt_mask"],
                                      responses)))
  # Perturbed so the PPO gradient is not the one at ratio 1 only.
  perturbed = jax.tree_util.tree_map(lambda p: p * 1.01, state.policy.params)
  ptx = _ptx(5)

  def grads(state, params, rollout, ptx_batch, coef):
    settings = dataclasses.replace(SETTINGS, ptx_coef=coef)
    return ppo.policy_loss_and_grads(params, rollout, ptx_batch,
                                     apply_fn=state.policy.apply_fn, settings=settings)[0]

  def probe(state, params, rollout, ptx_batch):
    updated = ppo.update_step(state, rollout, None, jnp.zeros((), jnp.int32),
                              settings=SETTINGS)
    return updated, (grads(state, params, rollout, None, 0.0),
                     grads(state, params, rollout, ptx_batch, 0.0),
                     grads(state, params, rollout, ptx_batch, GAMMA))

  (new, metrics), all_grads = parallel.pmap_fn(probe)(
      rstate, parallel.replicate(perturbed), rollout, _put(ptx))
  return dict(state=state, new=parallel.unreplicate(new), metrics=parallel.fetch(metrics),
              grads=[parallel.unreplicate(g) for g in all_grads], perturbed=perturbed,
              ptx=ptx)


def test_update_step_ratio_one_and_ema(update_checks):
  state, new, metrics = (update_checks[k] for k in ("state", "new", "metrics"))
  assert metrics["log_ratio_abs_max"] < 1e-5
  np.testing.assert_allclose(metrics["ratio_mean"], 1.0, atol=1e-6)
  assert metrics["clip_fraction"] == 0.0
  assert "ptx_loss" not in metrics
  assert _tree_max_diff(new.policy.params, state.policy.params) > 1e-4
  assert _tree_max_diff(new.value.params, state.value.params) > 1e-4
  # EMA after the optimizer update: decay * old + (1 - decay) * new params.
  decay = SETTINGS.ema_decay
  expected = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p,
                                    state.ema_params, new.policy.params)
  assert _tree_max_diff(new.ema_params, expected) < 1e-6
  # Frozen fields stay put.
  assert _tree_max_diff(new.ref_params, state.ref_params) == 0.0
  assert _tree_max_diff(new.reward_params, state.reward_params) == 0.0


def test_ptx_gradient_is_ppo_plus_gamma_nll(setup, update_checks):
  plain, with_zero, mixed = update_checks["grads"]
  params, ptx = update_checks["perturbed"], update_checks["ptx"]
  policy_model = setup["policy_model"]

  # Reference: the token-weighted NLL of the whole global pretraining batch, on one device.
  def nll_mean(params):
    logits = policy_model.apply({"params": params}, ptx["input_ids"],
                                attention_mask=ptx["attention_mask"])
    return losses.lm_nll(logits, ptx["input_ids"], ptx["loss_mask"]).mean()
  nll_grads = jax.jit(jax.grad(nll_mean))(params)

  assert _tree_max_diff(with_zero, plain) <= 1e-7  # gamma 0 is plain PPO
  expected = jax.tree_util.tree_map(lambda g, n: g + GAMMA * n, plain, nll_grads)
  scale = max(float(np.max(np.abs(x))) for x in jax.tree_util.tree_leaves(expected))
  assert _tree_max_diff(mixed, expected) <= 1e-5 * scale
  assert _tree_max_diff(mixed, plain) > 1e-3 * scale  # the ptx term does contribute


# ---------------------------------------------------------------------------------------
# Loop: resume is bit-identical.
# ---------------------------------------------------------------------------------------


def _run_loop(setup, workdir, num_iterations, sigterm_on_call=0):
  """Runs the loop with synthetic iterators; SIGTERM arrives during call `sigterm_on_call`."""
  checkpointer = checkpoint_lib.Checkpointer(workdir, save_every=100, keep=2)
  prompt_iter, ptx_iter = _Synthetic(_prompts, 7), _Synthetic(_ptx, 8)
  state, start = ppo.restore_or_keep(checkpointer, setup["state"], prompt_iter, ptx_iter)
  calls = []

  def iteration_fn(*args):
    calls.append(1)
    if len(calls) == sigterm_on_call:
      os.kill(os.getpid(), signal.SIGTERM)
    return setup["iteration_p"](*args)

  result = train_lib.run_loop(
      rstate=parallel.replicate(state), step_fn=iteration_fn,
      next_batch=ppo.iteration_batches(prompt_iter, ptx_iter, SETTINGS.updates_per_iteration),
      start_step=start, num_steps=num_iterations, checkpointer=checkpointer,
      writer=metrics_lib.MetricWriter(workdir, enabled=False),
      **ppo.loop_settings(prompt_iter, ptx_iter))
  checkpointer.close()
  return start, result, parallel.unreplicate(result.state)


def test_resume_after_sigterm_is_bit_identical(setup, tmp_path):
  _, straight_result, straight = _run_loop(setup, tmp_path / "straight", 3)
  # Preempted during iteration 2: it finishes, saves and stops; the rerun resumes there.
  first_start, stopped, _ = _run_loop(setup, tmp_path / "resumed", 3, sigterm_on_call=2)
  assert stopped.preempted and stopped.step == 2
  start, resumed_result, resumed = _run_loop(setup, tmp_path / "resumed", 3)
  assert (first_start, start) == (0, 2)
  assert not resumed_result.preempted
  leaves = jax.tree_util.tree_leaves(straight)
  assert len(leaves) == len(jax.tree_util.tree_leaves(resumed))
  for a, b in zip(leaves, jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(resumed.iteration) == 3
  drop_time = lambda row: {k: v for k, v in row.items() if k != "seconds_per_iteration"}
  assert drop_time(straight_result.history[-1]) == drop_time(resumed_result.history[-1])
  # The restored state is a usable PPOState (static fields come from the template).
  assert isinstance(resumed, ppo.PPOState)
  assert isinstance(resumed.policy, train_lib.TrainState)


def test_ppo_learns_to_stop(setup):
  """The random policy rarely emits the stop token and so earns the penalty; PPO should
  learn to stop, raising the score, while the adaptive beta reacts to the growing KL.
  With 8 episodes an iteration the stopped fraction moves in steps of 1/8 and how soon it
  takes off depends on the sampling stream: 30 iterations, so that a late start (one
  stream stayed near 0 for 12 iterations) is not mistaken for not learning."""
  rstate = parallel.replicate(setup["state"])
  prompt_iter, ptx_iter = _Synthetic(_prompts, 3), _Synthetic(_ptx, 4)
  history = []
  for _ in range(30):
    prompts = train_lib.put_batch(ppo.device_prompts(next(prompt_iter)))
    ptx = train_lib.put_batch(ppo.stack_ptx_batches(
        [next(ptx_iter) for _ in range(SETTINGS.updates_per_iteration)]))
    rstate, metrics = setup["iteration_p"](rstate, prompts, ptx)
    history.append(parallel.fetch(metrics))
  first = {k: np.mean([m[k] for m in history[:5]]) for k in ("score", "stopped_fraction")}
  last = {k: np.mean([m[k] for m in history[-5:]]) for k in ("score", "stopped_fraction")}
  assert last["stopped_fraction"] > first["stopped_fraction"] + 0.4, (first, last)
  assert last["score"] > first["score"] + 1.0, (first, last)
  assert history[-1]["kl_coef"] > INIT_KL  # KL above its target: beta grew

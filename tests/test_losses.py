"""Each loss in jaxrlhf.losses against a plain Python/NumPy loop on random inputs."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import losses
from jaxrlhf import parallel

RTOL = 1e-5
ATOL = 1e-5


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _prefix_mask(rng, batch, time, min_len=0):
  lengths = rng.integers(min_len, time + 1, size=batch)
  return (np.arange(time)[None, :] < lengths[:, None]).astype(np.float32), lengths


# ----------------------------------------------------------------------------------------
# Log-probs, entropy, LM loss.
# ----------------------------------------------------------------------------------------


def test_token_logprobs_divides_by_temperature():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 3))
  for temperature in (1.0, 0.7):
    expected = np.take_along_axis(
        _log_softmax(logits / temperature), targets[..., None], -1
    )[..., 0]
    got = losses.token_logprobs(logits, targets, temperature)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_entropy_from_logits():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  log_probs = _log_softmax(logits / 0.5)
  expected = -(np.exp(log_probs) * log_probs).sum(-1)
  np.testing.assert_allclose(losses.entropy_from_logits(logits, 0.5), expected, rtol=RTOL)
  # A uniform distribution has entropy log(V).
  np.testing.assert_allclose(losses.entropy_from_logits(np.zeros((1, 5))), [np.log(5)], rtol=RTOL)


@pytest.fixture(scope="module")
def lm_batch():
  rng = np.random.default_rng(2)
  batch, time, vocab = 3, 6, 11
  logits = rng.normal(size=(batch, time, vocab)).astype(np.float32)
  input_ids = rng.integers(0, vocab, size=(batch, time))
  loss_mask = np.zeros((batch, time), np.float32)
  loss_mask[0, 2:5] = 1  # prompt of 2, response of 3, one pad
  loss_mask[1, 1:] = 1
  loss_mask[2, 4:6] = 1
  return logits, input_ids, loss_mask


def test_lm_nll_matches_loop(lm_batch):
  logits, input_ids, loss_mask = lm_batch
  log_probs = _log_softmax(logits)
  total, count = 0.0, 0
  for b in range(input_ids.shape[0]):
    for t in range(1, input_ids.shape[1]):
      if loss_mask[b, t]:
        total -= log_probs[b, t - 1, input_ids[b, t]]
        count += 1
  got = losses.lm_nll(logits, input_ids, loss_mask)
  np.testing.assert_allclose(got.total, total, rtol=RTOL)
  assert got.count == count
  np.testing.assert_allclose(got.mean(), total / count, rtol=RTOL)


def test_lm_nll_ignores_prompt_targets(lm_batch):
  logits, input_ids, loss_mask = lm_batch
  changed = input_ids.copy()
  changed[0, 1] = (changed[0, 1] + 1) % logits.shape[-1]  # a prompt token of example 0
  changed[2, 0] = (changed[2, 0] + 3) % logits.shape[-1]  # loss_mask[:, 0] is never a target
  np.testing.assert_array_equal(
      losses.lm_nll(logits, changed, loss_mask).total,
      losses.lm_nll(logits, input_ids, loss_mask).total,
  )
  changed[0, 3] = (changed[0, 3] + 1) % logits.shape[-1]  # a response token: must matter
  assert losses.lm_nll(logits, changed, loss_mask).total != losses.lm_nll(
      logits, input_ids, loss_mask
  ).total


# ----------------------------------------------------------------------------------------
# Ranking loss.
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranking_batch():
  """Mixed K (2..9) padded to K_max=9, with ties, plus one example with no pair."""
  rng = np.random.default_rng(3)
  k_max = 9
  ks = [2, 3, 9, 5, 4, 2]
  ranks = np.zeros((len(ks), k_max), np.int32)
  valid = np.zeros((len(ks), k_max), bool)
  for b, k in enumerate(ks):
    ranks[b, :k] = rng.integers(0, 3, size=k)  # few distinct ranks: plenty of ties
    valid[b, :k] = True
  ranks[0, :2] = [1, 1]  # example 0: K=2, tied, so no pair at all
  ranks[1, :3] = [1, 0, 1]  # example 1: K=3 with a tie, so 2 pairs rather than 3
  ranks[5, :2] = [0, 1]  # example 5: plain chosen (rank 0) / rejected pair
  # rank 0 is best; i is preferred to j iff rank_i < rank_j.
  pair_mask = (
      (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]
  ).astype(np.float32)
  scores = rng.normal(size=(len(ks), k_max)).astype(np.float32)
  scores[~valid] = 1e3  # padding scores are arbitrary and must not matter
  scores[2, 1] = scores[2, 0]  # a score tie on a real pair (if any)
  return scores, pair_mask, ranks, valid


def _ranking_loop(scores, ranks, valid):
  losses_per_example, has_pairs = [], []
  correct, num_pairs_total, gap_total = 0, 0, 0.0
  for b in range(scores.shape[0]):
    k = int(valid[b].sum())
    terms = []
    for i, j in itertools.combinations(range(k), 2):
      if ranks[b, i] == ranks[b, j]:
        continue
      winner, loser = (i, j) if ranks[b, i] < ranks[b, j] else (j, i)
      diff = float(scores[b, winner]) - float(scores[b, loser])
      terms.append(_log_sigmoid(diff))
      correct += diff > 0
      gap_total += diff
    num_pairs_total += len(terms)
    losses_per_example.append(-np.mean(terms) if terms else 0.0)
    has_pairs.append(bool(terms))
  return np.array(losses_per_example), np.array(has_pairs), correct, num_pairs_total, gap_total


def test_ranking_loss_matches_pair_loop(ranking_batch):
  scores, pair_mask, ranks, valid = ranking_batch
  expected, has_pairs, _, _, _ = _ranking_loop(scores, ranks, valid)
  assert not has_pairs[0] and has_pairs[1:].all()
  assert pair_mask[1].sum() == 2 and 0 < pair_mask[2].sum() < 36  # ties drop pairs
  got, got_has_pairs = losses.ranking_loss_per_example(scores, pair_mask)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(got_has_pairs, has_pairs)
  total = losses.ranking_loss(scores, pair_mask)
  np.testing.assert_allclose(total.total, expected[has_pairs].sum(), rtol=RTOL)
  assert total.count == has_pairs.sum()


def test_ranking_loss_k2_is_bradley_terry(ranking_batch):
  scores, pair_mask, _, _ = ranking_batch
  chosen, rejected = scores[5, 0], scores[5, 1]
  bradley_terry = -_log_sigmoid(float(chosen) - float(rejected))
  got, _ = losses.ranking_loss_per_example(scores[5:6], pair_mask[5:6])
  np.testing.assert_allclose(got[0], bradley_terry, rtol=RTOL)


def test_ranking_accuracy_and_gap(ranking_batch):
  scores, pair_mask, ranks, valid = ranking_batch
  _, _, correct, num_pairs, gap_total = _ranking_loop(scores, ranks, valid)
  accuracy = losses.pairwise_accuracy(scores, pair_mask)
  assert accuracy.total == correct and accuracy.count == num_pairs
  gap = losses.score_gap(scores, pair_mask)
  np.testing.assert_allclose(gap.total, gap_total, rtol=RTOL, atol=ATOL)
  assert gap.count == num_pairs


def test_ranking_loss_gradient_ignores_padding(ranking_batch):
  scores, pair_mask, _, valid = ranking_batch
  scores = np.where(valid, scores, np.nan)  # even NaN on padding must not leak
  loss, grads = jax.value_and_grad(lambda s: losses.ranking_loss(s, pair_mask).mean())(scores)
  assert np.isfinite(loss)
  assert np.all(np.asarray(grads)[~valid] == 0)
  assert np.all(np.isfinite(grads))


# ----------------------------------------------------------------------------------------
# PPO rewards, KL estimators, GAE, whitening.
# ----------------------------------------------------------------------------------------


def test_kl_estimators():
  rng = np.random.default_rng(4)
  logprobs = -rng.uniform(0.1, 3, size=(2, 5))
  ref_logprobs = -rng.uniform(0.1, 3, size=(2, 5))
  log_r = ref_logprobs - logprobs
  np.testing.assert_allclose(losses.kl_k1(logprobs, ref_logprobs), -log_r, rtol=RTOL)
  np.testing.assert_allclose(
      losses.kl_k3(logprobs, ref_logprobs), (np.exp(log_r) - 1) - log_r, rtol=RTOL, atol=ATOL
  )
  assert np.all(np.asarray(losses.kl_k3(logprobs, ref_logprobs)) >= 0)
  # Both estimate KL(pi || ref): check on an exact two-outcome distribution.
  pi, ref = np.array([0.3, 0.7]), np.array([0.6, 0.4])
  exact = np.sum(pi * np.log(pi / ref))
  for estimator in (losses.kl_k1, losses.kl_k3):
    per_outcome = np.asarray(estimator(np.log(pi), np.log(ref)))
    np.testing.assert_allclose(np.sum(pi * per_outcome), exact, rtol=1e-5)


def test_per_token_rewards():
  rng = np.random.default_rng(5)
  batch, time = 4, 6
  mask, lengths = _prefix_mask(rng, batch, time, min_len=1)
  logprobs = rng.normal(size=(batch, time)).astype(np.float32)
  ref_logprobs = rng.normal(size=(batch, time)).astype(np.float32)
  scores = rng.normal(size=batch).astype(np.float32)
  kl_coef = 0.05
  expected = np.zeros((batch, time))
  for b in range(batch):
    for t in range(lengths[b]):
      expected[b, t] = -kl_coef * (logprobs[b, t] - ref_logprobs[b, t])
    expected[b, lengths[b] - 1] += scores[b]
  got = losses.per_token_rewards(logprobs, ref_logprobs, scores, mask, kl_coef)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def _gae_loop(rewards, values, lengths, gamma, lam):
  advantages = np.zeros_like(rewards, dtype=np.float64)
  for b in range(rewards.shape[0]):
    running = 0.0
    for t in reversed(range(lengths[b])):
      next_value = values[b, t + 1] if t + 1 < lengths[b] else 0.0
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      running = delta + gamma * lam * running
      advantages[b, t] = running
  returns = advantages + values * (np.arange(rewards.shape[1]) < lengths[:, None])
  return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae_matches_loop(gamma, lam):
  rng = np.random.default_rng(6)
  batch, time = 5, 7
  mask, lengths = _prefix_mask(rng, batch, time)
  lengths[0], lengths[1] = time, 0  # full length and empty response
  mask = (np.arange(time)[None, :] < lengths[:, None]).astype(np.float32)
  rewards = rng.normal(size=(batch, time)).astype(np.float32)
  values = rng.normal(size=(batch, time)).astype(np.float32)
  # Garbage past the end must be ignored.
  rewards[mask == 0] = 100.0
  values[mask == 0] = -50.0
  expected_adv, expected_ret = _gae_loop(rewards, values, lengths, gamma, lam)
  advantages, returns = losses.gae(rewards, values, mask, gamma=gamma, lam=lam)
  np.testing.assert_allclose(advantages, expected_adv, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(returns, expected_ret, rtol=RTOL, atol=ATOL)


def _whiten_reference(x, mask, shift_mean, eps=1e-8):
  selected = x[mask > 0].astype(np.float64)
  mean, var = selected.mean(), selected.var()
  out = (x - mean) / np.sqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_single_device(shift_mean):
  rng = np.random.default_rng(7)
  x = rng.normal(3.0, 2.0, size=(4, 6)).astype(np.float32)
  mask, _ = _prefix_mask(rng, 4, 6, min_len=1)
  got = losses.whiten(x, mask, shift_mean=shift_mean)
  np.testing.assert_allclose(got, _whiten_reference(x, mask, shift_mean), rtol=RTOL, atol=ATOL)
  if shift_mean:
    selected = np.asarray(got)[mask > 0]
    np.testing.assert_allclose([selected.mean(), selected.std()], [0.0, 1.0], atol=1e-4)


def test_whiten_across_devices_equals_global_batch():
  num_devices = jax.local_device_count()
  assert num_devices == 4, "conftest forces 4 CPU devices"
  rng = np.random.default_rng(8)
  per_device = [2, 6]
  # Different scales per device, so per-device whitening would differ from global.
  x = (rng.normal(size=[num_devices] + per_device) * np.arange(1, 5)[:, None, None] + 2.0)
  x = x.astype(np.float32)
  lengths = rng.integers(1, per_device[1] + 1, size=(num_devices, per_device[0]))
  mask = (np.arange(per_device[1]) < lengths[..., None]).astype(np.float32)
  whiten_all = parallel.pmap_fn(
      functools.partial(losses.whiten, shift_mean=True, global_sum=parallel.psum))
  got = np.asarray(whiten_all(x, mask)).reshape(-1, per_device[1])
  expected = _whiten_reference(
      x.reshape(-1, per_device[1]), mask.reshape(-1, per_device[1]), shift_mean=True
  )
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
  local_only = np.asarray(losses.whiten(x[1], mask[1]))
  assert not np.allclose(local_only, got.reshape(x.shape)[1], atol=1e-3)


# ----------------------------------------------------------------------------------------
# Policy and value losses.
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_batch():
  rng = np.random.default_rng(9)
  batch, time = 4, 8
  mask, _ = _prefix_mask(rng, batch, time, min_len=1)
  old_logprobs = -rng.uniform(0.1, 3.0, size=(batch, time)).astype(np.float32)
  # Log-ratios spread well past +-0.2 so both branches of the clip are exercised.
  logprobs = (old_logprobs + rng.normal(0.0, 0.3, size=(batch, time))).astype(np.float32)
  logprobs[mask == 0] = 80.0  # garbage on padding would overflow exp() if not masked
  advantages = rng.normal(size=(batch, time)).astype(np.float32)
  old_values = rng.normal(size=(batch, time)).astype(np.float32)
  values = (old_values + rng.normal(0.0, 0.3, size=(batch, time))).astype(np.float32)
  returns = rng.normal(size=(batch, time)).astype(np.float32)
  return dict(mask=mask, old_logprobs=old_logprobs, logprobs=logprobs,
              advantages=advantages, old_values=old_values, values=values, returns=returns)


def test_ppo_policy_loss_matches_loop(ppo_batch):
  b = ppo_batch
  clip_eps = 0.2
  loss_sum = clipped = kl_sum = ratio_sum = count = 0.0
  ratio_max = 0.0
  for i, t in zip(*np.nonzero(b["mask"])):
    log_ratio = float(b["logprobs"][i, t]) - float(b["old_logprobs"][i, t])
    ratio = np.exp(log_ratio)
    adv = float(b["advantages"][i, t])
    unclipped_loss = -adv * ratio
    clipped_loss = -adv * min(max(ratio, 1 - clip_eps), 1 + clip_eps)
    loss_sum += max(unclipped_loss, clipped_loss)
    clipped += clipped_loss > unclipped_loss
    kl_sum += (ratio - 1) - log_ratio
    ratio_sum += ratio
    ratio_max = max(ratio_max, ratio)
    count += 1
  out = losses.ppo_policy_loss(
      b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"], clip_eps
  )
  np.testing.assert_allclose(out.loss.total, loss_sum, rtol=RTOL, atol=ATOL)
  assert 0 < clipped < count  # the fixture exercises both branches
  assert out.clip_fraction.total == clipped and out.clip_fraction.count == count
  np.testing.assert_allclose(out.approx_kl.total, kl_sum, rtol=1e-4, atol=ATOL)
  np.testing.assert_allclose(out.ratio.mean(), ratio_sum / count, rtol=RTOL)
  np.testing.assert_allclose(out.ratio_max, ratio_max, rtol=RTOL)


def test_ppo_policy_loss_ratio_one_and_gradient(ppo_batch):
  b = ppo_batch
  out = losses.ppo_policy_loss(b["old_logprobs"], b["old_logprobs"], b["advantages"], b["mask"])
  assert out.clip_fraction.total == 0 and out.approx_kl.total == 0
  np.testing.assert_allclose(out.ratio.mean(), 1.0)
  # At ratio 1 the gradient of the loss w.r.t. log pi is -A / count on real tokens.
  grad = jax.grad(
      lambda lp: losses.ppo_policy_loss(lp, b["old_logprobs"], b["advantages"], b["mask"])
      .loss.mean()
  )(jnp.asarray(b["old_logprobs"]))
  np.testing.assert_allclose(grad, -b["advantages"] * b["mask"] / b["mask"].sum(), atol=1e-6)


def test_value_loss_matches_loop(ppo_batch):
  b = ppo_batch
  clip_eps = 0.2
  loss_sum = clipped = count = 0.0
  for i, t in zip(*np.nonzero(b["mask"])):
    value, old, ret = (float(b[k][i, t]) for k in ("values", "old_values", "returns"))
    clipped_value = old + min(max(value - old, -clip_eps), clip_eps)
    unclipped_error, clipped_error = (value - ret) ** 2, (clipped_value - ret) ** 2
    loss_sum += 0.5 * max(unclipped_error, clipped_error)
    clipped += clipped_error > unclipped_error
    count += 1
  out = losses.value_loss(b["values"], b["old_values"], b["returns"], b["mask"], clip_eps)
  np.testing.assert_allclose(out.loss.total, loss_sum, rtol=RTOL, atol=ATOL)
  assert 0 < clipped < count
  assert out.clip_fraction.total == clipped and out.clip_fraction.count == count


# ----------------------------------------------------------------------------------------
# KL controllers.
# ----------------------------------------------------------------------------------------


def test_fixed_kl_controller():
  state = losses.KLControllerState.create(0.02)
  update = losses.kl_update_fn("fixed")
  assert float(update(state, jnp.float32(100.0), 512).value) == pytest.approx(0.02)


def test_adaptive_kl_controller():
  state = losses.KLControllerState.create(0.1)
  target, horizon, n_steps = 6.0, 10000, 512
  update = losses.kl_update_fn("adaptive", target=target, horizon=horizon)

  def next_value(current_kl):
    return float(update(state, jnp.float32(current_kl), n_steps).value)

  # Mild error: proportional, unclipped.
  assert next_value(6.6) == pytest.approx(0.1 * (1 + 0.1 * n_steps / horizon), rel=1e-5)
  assert next_value(5.4) == pytest.approx(0.1 * (1 - 0.1 * n_steps / horizon), rel=1e-5)
  # Large error: clipped at +-0.2.
  assert next_value(60.0) == pytest.approx(0.1 * (1 + 0.2 * n_steps / horizon), rel=1e-5)
  assert next_value(0.0) == pytest.approx(0.1 * (1 - 0.2 * n_steps / horizon), rel=1e-5)
  assert next_value(target) == pytest.approx(0.1)
  # The state is a pytree that jit accepts.
  jitted = jax.jit(update, static_argnums=2)(state, jnp.float32(60.0), n_steps)
  assert float(jitted.value) == pytest.approx(next_value(60.0), rel=1e-6)


def test_kl_controller_errors_name_the_problem():
  with pytest.raises(ValueError, match="target"):
    losses.kl_update_fn("adaptive", target=None, horizon=10000)
  with pytest.raises(ValueError, match="'fixed' or 'adaptive'"):
    losses.kl_update_fn("pid")

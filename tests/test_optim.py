"""Optimizer recipes: TF-style Adam, parity with optax.adamw, schedules, accumulation, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf import optim


def _config(**overrides):
  cfg = optim.default_optimizer_config()
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def problem():
  """A tiny least-squares problem: params, a loss, and a few gradient batches."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
  inputs = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  targets = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)

  def loss_fn(p, x, y):
    return jnp.mean(jnp.square(x @ p["w"] + p["b"] - y))

  return params, loss_fn, inputs, targets


def _run(tx, params, grads_seq):
  state = tx.init(params)
  history = []
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history


def _random_grads(params, steps, seed=1, scale=1.0):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32),
                       params) for _ in range(steps)]


def test_tf_style_adam_matches_numpy_tensorflow_update(problem):
  params, _, _, _ = problem
  lr, b1, b2, eps = 1e-2, 0.9, 0.95, 1e-3  # large eps so its placement matters
  grads_seq = _random_grads(params, steps=5, scale=1e-2)
  cfg = _config(name="adam", learning_rate=lr, b1=b1, b2=b2, eps=eps, tf_style_eps=True,
                grad_clip_norm=0.0)
  tx, _ = optim.make_optimizer(cfg)
  history = _run(tx, params, grads_seq)

  # tf.compat.v1.train.AdamOptimizer, written out in float64.
  for name in params:
    value = np.asarray(params[name], np.float64)
    m = np.zeros_like(value)
    v = np.zeros_like(value)
    for t, grads in enumerate(grads_seq, start=1):
      g = np.asarray(grads[name], np.float64)
      lr_t = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      value = value - lr_t * m / (np.sqrt(v) + eps)
      np.testing.assert_allclose(history[t - 1][name], value, rtol=1e-5, atol=1e-6)

  # ...and it really differs from optax's placement of eps.
  optax_history = _run(optax.adam(lr, b1=b1, b2=b2, eps=eps), params, grads_seq)
  assert not np.allclose(history[0]["w"], optax_history[0]["w"], rtol=1e-4, atol=1e-6)


def test_default_recipe_equals_optax_adamw(problem):
  params, _, _, _ = problem
  grads_seq = _random_grads(params, steps=4)
  cfg = _config(name="adamw", learning_rate=3e-3, weight_decay=0.1, decay_matrices_only=False,
                grad_clip_norm=0.0)
  tx, _ = optim.make_optimizer(cfg)
  reference = optax.adamw(3e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
  for ours, theirs in zip(_run(tx, params, grads_seq), _run(reference, params, grads_seq)):
    for name in params:
      np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-7)


def test_weight_decay_skips_vectors_by_default(problem):
  params, _, _, _ = problem
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  tx, _ = optim.make_optimizer(_config(learning_rate=0.1, weight_decay=0.5, grad_clip_norm=0.0))
  (after,) = _run(tx, params, [zero_grads])
  np.testing.assert_allclose(after["w"], params["w"] * (1 - 0.1 * 0.5), rtol=1e-6)
  np.testing.assert_array_equal(after["b"], params["b"])


def test_adam_with_weight_decay_is_an_error():
  with pytest.raises(ValueError, match="weight_decay"):
    optim.make_optimizer(_config(name="adam", weight_decay=0.1))
  with pytest.raises(ValueError, match="`schedule`"):
    optim.make_schedule(_config(schedule="exponential"))


def test_warmup_constant_schedule():
  # InstructGPT PPO: constant LR after a 10-step warm-up from 1/10 of the peak.
  cfg = _config(learning_rate=1e-5, schedule="warmup_constant", warmup_steps=10,
                warmup_init_fraction=0.1)
  schedule = optim.make_schedule(cfg)
  np.testing.assert_allclose(schedule(0), 1e-6, rtol=1e-6)
  np.testing.assert_allclose(schedule(5), 1e-6 + 0.5 * 9e-6, rtol=1e-6)
  for step in (10, 11, 1000):
    np.testing.assert_allclose(schedule(step), 1e-5, rtol=1e-6)


def test_cosine_schedule_decays_to_floor():
  cfg = _config(learning_rate=2e-4, schedule="cosine", warmup_steps=4, final_lr_fraction=0.1)
  schedule = optim.make_schedule(cfg, total_steps=24)
  np.testing.assert_allclose(schedule(0), 0.0, atol=1e-12)  # default warm-up starts at 0
  np.testing.assert_allclose(schedule(4), 2e-4, rtol=1e-6)
  # Half-way through the decay: midway between peak and floor.
  np.testing.assert_allclose(schedule(14), 0.5 * (2e-4 + 2e-5), rtol=1e-5)
  np.testing.assert_allclose(schedule(24), 2e-5, rtol=1e-5)
  np.testing.assert_allclose(schedule(100), 2e-5, rtol=1e-5)
  assert all(schedule(s) > schedule(s + 1) for s in range(4, 24))
  # No warm-up: the peak right away.
  no_warmup = optim.make_schedule(_config(learning_rate=1.0, schedule="cosine"), total_steps=10)
  np.testing.assert_allclose([no_warmup(0), no_warmup(10)], [1.0, 0.1], rtol=1e-6)
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_schedule(cfg)


def test_linear_schedule_decays_to_floor():
  schedule = optim.make_schedule(_config(learning_rate=3e-6, schedule="linear",
                                         final_lr_fraction=0.0), total_steps=8)
  np.testing.assert_allclose([schedule(s) for s in (0, 2, 4, 8, 20)],
                             [3e-6, 2.25e-6, 1.5e-6, 0.0, 0.0], rtol=1e-6, atol=1e-14)
  warm = optim.make_schedule(_config(learning_rate=1.0, schedule="linear", warmup_steps=2,
                                     final_lr_fraction=0.5), total_steps=6)
  np.testing.assert_allclose([warm(s) for s in (0, 1, 2, 4, 6)], [0, 0.5, 1, 0.75, 0.5],
                             rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="the linear schedule needs total_steps"):
    optim.make_schedule(_config(learning_rate=1.0, schedule="linear"))


def test_optimizer_applies_schedule(problem):
  params, _, _, _ = problem
  cfg = _config(name="adam", learning_rate=1.0, schedule="warmup_constant", warmup_steps=2,
                warmup_init_fraction=0.5, grad_clip_norm=0.0)
  tx, schedule = optim.make_optimizer(cfg)
  # Adam's first update is +-lr per coordinate for a constant-sign gradient.
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["b"], -float(schedule(0)) * np.ones(2), rtol=1e-5)
  assert float(schedule(0)) == pytest.approx(0.5)


@pytest.mark.parametrize("tf_style_eps", [False, True])
def test_gradient_accumulation_equals_full_batch_step(problem, tf_style_eps):
  params, loss_fn, inputs, targets = problem
  accum_steps = 4
  base = dict(learning_rate=1e-2, tf_style_eps=tf_style_eps, grad_clip_norm=0.5,
              weight_decay=0.1)
  tx_accum, _ = optim.make_optimizer(_config(grad_accum_steps=accum_steps, **base))
  tx_full, _ = optim.make_optimizer(_config(grad_accum_steps=1, **base))
  grad_fn = jax.grad(loss_fn)

  state = tx_accum.init(params)
  accumulated = params
  micro_inputs = np.split(np.asarray(inputs), accum_steps)
  micro_targets = np.split(np.asarray(targets), accum_steps)
  for step, (x, y) in enumerate(zip(micro_inputs, micro_targets)):
    updates, state = tx_accum.update(grad_fn(accumulated, x, y), state, accumulated)
    accumulated = optax.apply_updates(accumulated, updates)
    if step < accum_steps - 1:  # nothing moves until the last microbatch
      jax.tree.map(np.testing.assert_array_equal, accumulated, params)

  full_updates, _ = tx_full.update(grad_fn(params, inputs, targets), tx_full.init(params), params)
  full = optax.apply_updates(params, full_updates)
  for name in params:
    np.testing.assert_allclose(accumulated[name], full[name], rtol=1e-5, atol=1e-7)


def test_grad_clipping_bounds_global_norm(problem):
  params, _, _, _ = problem
  max_norm = 0.5
  # A large eps makes Adam's first step depend on the gradient scale, so the clip shows.
  cfg = _config(name="adam", learning_rate=1.0, eps=10.0, grad_clip_norm=max_norm)
  tx, _ = optim.make_optimizer(cfg)
  (big,) = _random_grads(params, steps=1, scale=10.0)
  big_norm = float(optax.tree.norm(big))
  assert big_norm > max_norm
  at_bound = jax.tree.map(lambda g: g * max_norm / big_norm, big)

  def first_update(grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates

  # Clipped: exactly what the gradient rescaled to norm max_norm gives.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               first_update(big), first_update(at_bound))
  # A gradient already inside the bound is left alone.
  small = jax.tree.map(lambda g: g * 0.5, at_bound)
  unclipped_tx, _ = optim.make_optimizer(_config(name="adam", learning_rate=1.0, eps=10.0,
                                                 grad_clip_norm=0.0))
  expected, _ = unclipped_tx.update(small, unclipped_tx.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               first_update(small), expected)

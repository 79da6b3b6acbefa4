"""Optimizer recipes: an optax GradientTransformation and its learning-rate schedule.

Every stage (SFT, RM, PPO policy and value) builds its optimizer here from one
ml_collections section (see `default_optimizer_config`), so recipes stay comparable.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxrlhf import config_lib

Schedule = Callable[[jax.Array], jax.Array]

SCHEDULES = ("constant", "warmup_constant", "cosine", "linear")
OPTIMIZERS = ("adam", "adamw")


def default_optimizer_config() -> ml_collections.ConfigDict:
  """The optimizer section of a stage config, with the paper's PPO choices as defaults."""
  cfg = ml_collections.ConfigDict()
  cfg.name = "adamw"  # 'adam' (no weight decay) or 'adamw' (decoupled weight decay).
  cfg.learning_rate = 1e-5  # Peak learning rate.
  cfg.b1 = 0.9  # Adam first-moment decay.
  cfg.b2 = 0.95  # Adam second-moment decay; InstructGPT uses 0.95.
  cfg.eps = 1e-8  # Adam epsilon.
  cfg.tf_style_eps = False  # TensorFlow Adam: eps added to the uncorrected sqrt(v).
  cfg.weight_decay = 0.0  # Decoupled weight decay (adamw only), multiplied by the lr.
  cfg.decay_matrices_only = True  # Skip weight decay on vectors (biases, norm scales).
  cfg.schedule = "constant"  # 'constant', 'warmup_constant', 'cosine' or 'linear'.
  cfg.warmup_steps = 0  # Linear warm-up length, in optimizer updates.
  cfg.warmup_init_fraction = 0.0  # Warm-up starts at this fraction of the peak (PPO: 0.1).
  cfg.final_lr_fraction = 0.1  # Cosine decays to this fraction of the peak (SFT: 0.1).
  # Optimizer updates in the run; the trainer usually passes it to make_optimizer instead.
  cfg.total_steps = ml_collections.config_dict.placeholder(int)
  cfg.grad_clip_norm = 1.0  # Clip the global gradient norm to this; 0 turns clipping off.
  cfg.grad_accum_steps = 1  # Microbatches averaged into one update (optax.MultiSteps).
  return cfg


# ----------------------------------------------------------------------------------------
# TensorFlow-style Adam.
# ----------------------------------------------------------------------------------------


class ScaleByTfAdamState(NamedTuple):
  count: jax.Array  # int32 scalar, updates so far
  mu: optax.Updates
  nu: optax.Updates


def scale_by_tf_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
  """Adam as tf.compat.v1.train.AdamOptimizer computes it.

  TensorFlow folds the bias correction into the step size and adds eps to the
  uncorrected sqrt(v):

    update_t = sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps)

  whereas optax computes m_hat / (sqrt(v_hat) + eps). Early on v_t is small, so eps
  weighs more here: the same eps tames the first updates (lm-human-preferences relies
  on this). Follow it with `optax.scale_by_learning_rate`.
  """

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p, dtype=jnp.float32)
    return ScaleByTfAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(zeros, params),
        nu=jax.tree.map(zeros, params),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g), state.nu, updates)
    count = optax.safe_int32_increment(state.count)
    t = count.astype(jnp.float32)
    step_scale = jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    new_updates = jax.tree.map(
        lambda m, v, g: (step_scale * m / (jnp.sqrt(v) + eps)).astype(g.dtype),
        mu, nu, updates,
    )
    return new_updates, ScaleByTfAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------------
# Recipes.
# ----------------------------------------------------------------------------------------


def _check_choice(cfg: ml_collections.ConfigDict, field: str, choices) -> None:
  if cfg[field] not in choices:
    raise config_lib.ConfigError(
        f"optimizer config field `{field}` is {cfg[field]!r}; expected one of {choices}."
    )


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int | None = None, *,
                  updates_per_warmup_unit: int = 1) -> Schedule:
  """Learning rate as a function of the optimizer update count.

  - constant: `learning_rate` throughout.
  - warmup_constant: linear from `warmup_init_fraction * learning_rate` to the peak over
    `warmup_steps` updates, then constant (InstructGPT PPO: 10 updates from 1/10).
  - cosine: the same warm-up, then cosine decay reaching
    `final_lr_fraction * learning_rate` at `total_steps` and staying there.
  - linear: the same warm-up, then linear decay to the same floor at `total_steps`
    (the TL;DR PPO reproduction anneals its learning rate linearly to 0).

  Args:
    cfg: an optimizer section (see `default_optimizer_config`).
    total_steps: optimizer updates in the run (not microbatches); overrides
      `cfg.total_steps`. The cosine and linear schedules need it.
    updates_per_warmup_unit: updates per unit of `cfg.warmup_iterations`, for a stage
      that states its warm-up in iterations of several updates each (PPO; InstructGPT:
      10 iterations); `warmup_steps` counts updates and is used when that is unset.
  """
  _check_choice(cfg, "schedule", SCHEDULES)
  peak = float(cfg.learning_rate)
  warmup_steps = int(cfg.get("warmup_steps", 0) or 0)
  if cfg.get("warmup_iterations"):
    warmup_steps = int(cfg.warmup_iterations) * int(updates_per_warmup_unit)
  init_lr = peak * float(cfg.get("warmup_init_fraction", 0.0))

  if cfg.schedule == "constant":
    return optax.constant_schedule(peak)

  warmup = optax.linear_schedule(init_lr, peak, max(warmup_steps, 1))
  if cfg.schedule == "warmup_constant":
    after = optax.constant_schedule(peak)
  else:
    total_steps = total_steps if total_steps is not None else cfg.get("total_steps")
    if total_steps is None or total_steps <= warmup_steps:
      raise config_lib.ConfigError(
          f"the {cfg.schedule} schedule needs total_steps (make_optimizer argument or "
          f"config field `total_steps`) larger than `warmup_steps`={warmup_steps}; got "
          f"{total_steps}.")
    if cfg.schedule == "cosine":
      after = optax.cosine_decay_schedule(
          peak, total_steps - warmup_steps, alpha=float(cfg.final_lr_fraction))
    else:
      after = optax.linear_schedule(peak, peak * float(cfg.final_lr_fraction),
                                    total_steps - warmup_steps)
  if warmup_steps == 0:
    return after
  return optax.join_schedules([warmup, after], [warmup_steps])


def _matrices_mask(params: Any) -> Any:
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int | None = None, *,
    updates_per_warmup_unit: int = 1,
) -> tuple[optax.GradientTransformation, Schedule]:
  """Builds (optimizer, schedule) from an optimizer config section.

  The chain is: clip the global gradient norm, Adam (optax's, or TF-style with
  `tf_style_eps`), decoupled weight decay (adamw), scale by -schedule(count). With
  `grad_accum_steps` > 1 it is wrapped in optax.MultiSteps: gradients of that many
  calls are averaged and the chain runs once on the mean, so the clip bounds the norm of
  the averaged gradient and the schedule counts real updates.

  Args:
    cfg: an optimizer section (see `default_optimizer_config`).
    total_steps: optimizer updates in the run; see `make_schedule`.
    updates_per_warmup_unit: see `make_schedule`.

  Returns:
    (gradient transformation, schedule): log `schedule(update_count)` as the lr.
  """
  _check_choice(cfg, "name", OPTIMIZERS)
  schedule = make_schedule(cfg, total_steps, updates_per_warmup_unit=updates_per_warmup_unit)

  chain = []
  if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if cfg.tf_style_eps:
    chain.append(scale_by_tf_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  else:
    chain.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  if cfg.weight_decay:
    if cfg.name != "adamw":
      raise config_lib.ConfigError(
          f"optimizer config: `weight_decay`={cfg.weight_decay} needs `name`='adamw' "
          f"(got {cfg.name!r})."
      )
    mask = _matrices_mask if cfg.get("decay_matrices_only", True) else None
    chain.append(optax.add_decayed_weights(cfg.weight_decay, mask))
  chain.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*chain)

  accum_steps = int(cfg.get("grad_accum_steps", 1) or 1)
  if accum_steps < 1:
    raise config_lib.ConfigError(f"optimizer config field `grad_accum_steps` must be >= 1, got {accum_steps}.")
  if accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum_steps).gradient_transformation()
  return tx, schedule

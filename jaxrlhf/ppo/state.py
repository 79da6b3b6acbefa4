"""PPO's state and static settings: what one iteration carries and what it is told.

`PPOState` holds policy, value, the frozen reference and reward model, the KL controller
and the EMA; `PPOSettings` holds everything static (lengths, coefficients, sampling);
`Rollout` is one iteration's batch of scored episodes. The keys an iteration draws from
are split by purpose here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrlhf import losses
from jaxrlhf import train_lib


# fold_in salts: the iteration's key is split by purpose, so changing how many minibatches
# are shuffled never changes the samples, and evaluation noise is the same every time.
SAMPLE_SALT, SHUFFLE_SALT, EVAL_SALT = 0, 1, 2

# Host metrics that stop the run when non-finite (train_lib.check_finite).
MUST_BE_FINITE = ("policy_loss", "value_loss", "policy_grad_norm", "value_grad_norm",
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
                     seed: int, reward_gain: float = 1.0, reward_bias: float = 0.0,
                     frozen_dtype: Any = None) -> PPOState:
  """A fresh PPO state: policy, reference and EMA from `sft_params`, value from the RM.

  Every copy owns its buffers, so donating the state never frees an array that another
  field still uses. `frozen_dtype` (bfloat16, say) stores the frozen reference and
  reward model in that dtype; they are computed in the model's compute dtype whatever
  they are stored in, and the policy, value, optimizer states and EMA keep theirs.
  """
  copy = lambda tree: jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)
  frozen = copy if frozen_dtype is None else (
      lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x).astype(frozen_dtype), tree))
  return PPOState(
      policy=train_lib.create_train_state(policy_model.apply, copy(sft_params), policy_tx,
                                          seed),
      value=train_lib.create_train_state(value_model.apply, copy(reward_params), value_tx,
                                         seed),
      ref_params=frozen(sft_params),
      reward_params=frozen(reward_params),
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


def base_key(state: PPOState) -> jax.Array:
  return jax.random.wrap_key_data(state.rng)


def iteration_key(state: PPOState, salt: int) -> jax.Array:
  """fold_in(fold_in(base, iteration), salt): the same on every device."""
  return jax.random.fold_in(jax.random.fold_in(base_key(state), state.iteration), salt)

"""Loss functions and estimators for SFT, the reward model and PPO (docs/design.md).

Small pure jnp functions, one per concept. Every masked mean comes back as a `MaskedSum`
(total, count) so that the step functions can `psum` both halves and divide once.
"""

from typing import Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp

from jaxrlhf import config_lib


class MaskedSum(NamedTuple):
  """A masked mean kept as its two halves; a pytree, so `lax.psum` reduces both.

  `total` is the sum of the masked values, `count` the number of values (the sum of
  the mask). Reduce across devices first, then call `mean()`.
  """
  total: jax.Array
  count: jax.Array

  def mean(self) -> jax.Array:
    # An empty mask gives 0, not NaN, so a batch without any valid item logs cleanly.
    return self.total / jnp.maximum(self.count, 1.0)


def masked_sum(values: jax.Array, mask: jax.Array) -> MaskedSum:
  """`MaskedSum` of `values` over the positions where `mask` is 1; shapes must agree."""
  mask = mask.astype(jnp.float32)
  # `where`, not a product, so inf/NaN at masked positions cannot leak into the sum.
  total = jnp.sum(jnp.where(mask > 0, values * mask, 0.0))
  return MaskedSum(total, jnp.sum(mask))


# ----------------------------------------------------------------------------------------
# Token log-probabilities and the LM loss.
# ----------------------------------------------------------------------------------------


def token_logprobs(
    logits: jax.Array, targets: jax.Array, temperature: float = 1.0
) -> jax.Array:
  """log softmax(logits / temperature) read at `targets`.

  Args:
    logits: [..., vocab] (any float dtype; computed in float32).
    targets: [...] int token ids, same leading shape as `logits`.
    temperature: the sampling temperature; the learner must divide by the same value
      the sampler used, or the PPO ratio is not 1 on the first minibatch.

  Returns:
    [...] float32 log-probabilities.
  """
  logits = logits.astype(jnp.float32) / temperature
  target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
  return target_logits[..., 0] - jax.nn.logsumexp(logits, axis=-1)


def chunked_token_logprobs(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array,
                           *, chunk: int, dtype, temperature: float = 1.0,
                           with_entropy: bool = False):
  """`token_logprobs` (and `entropy_from_logits`) of the logits `hidden @ unembedding`,
  made `chunk` positions at a time: the [batch, T, vocab] float32 logits never exist.

  Each chunk's logits are a compute-dtype matmul accumulated in float32, as the model's
  head makes them, and are rematerialised in the backward pass: the activations kept
  are the hidden states, not the logits.

  Args:
    hidden: [batch, T, hidden] final hidden states at the positions that predict `targets`.
    unembedding: [hidden, vocab] output projection.
    targets: [batch, T] token ids.
    chunk: positions per chunk; T is padded up to a multiple of it.
    dtype: the matmul's compute dtype.
    temperature: as in `token_logprobs`.
    with_entropy: also return the entropy per position.

  Returns:
    [batch, T] float32 log-probabilities, and [batch, T] entropies if `with_entropy`.
  """
  batch, time = targets.shape
  n_chunks = -(-time // chunk)
  pad = n_chunks * chunk - time
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  # [n_chunks, batch, chunk, ...]: lax.map runs one chunk at a time.
  hidden = hidden.reshape(batch, n_chunks, chunk, -1).swapaxes(0, 1)
  targets = targets.reshape(batch, n_chunks, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(args):
    h, t = args
    logits = jnp.einsum("bth,hv->btv", h.astype(dtype), unembedding.astype(dtype),
                        preferred_element_type=jnp.float32)
    logprobs = token_logprobs(logits, t, temperature)
    if with_entropy:
      return logprobs, entropy_from_logits(logits, temperature)
    return logprobs

  out = jax.lax.map(one_chunk, (hidden, targets))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, n_chunks * chunk)[:, :time]
  return jax.tree.map(unchunk, out)


def entropy_from_logits(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Entropy of softmax(logits / temperature) per position: [..., vocab] -> [...]."""
  logits = logits.astype(jnp.float32) / temperature
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def lm_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> MaskedSum:
  """Next-token negative log-likelihood summed over target tokens.

  Position t is predicted from the logits at t - 1, so `loss_mask[:, t]` marks
  `input_ids[:, t]` as a target and `loss_mask[:, 0]` is ignored (nothing predicts the
  first token).

  Args:
    logits: [batch, time, vocab] from the model run on `input_ids`.
    input_ids: [batch, time] int tokens.
    loss_mask: [batch, time] 1 on target tokens (the response, EOS included, for SFT;
      every real token but the first for pretraining).

  Returns:
    MaskedSum(total NLL, number of target tokens).
  """
  logprobs = token_logprobs(logits[:, :-1], input_ids[:, 1:])  # [batch, time - 1]
  return masked_sum(-logprobs, loss_mask[:, 1:])


# ----------------------------------------------------------------------------------------
# Reward model: K-way ranking loss.
# ----------------------------------------------------------------------------------------


def _pairwise(scores: jax.Array, pair_mask: jax.Array):
  """Score differences r_i - r_j [batch, K, K] and the float pair mask."""
  scores = scores.astype(jnp.float32)
  return scores[:, :, None] - scores[:, None, :], pair_mask.astype(jnp.float32)


def ranking_loss_per_example(scores: jax.Array, pair_mask: jax.Array):
  """-1/num_pairs * sum over pairs (w preferred to l) of log sigmoid(r_w - r_l).

  All comparisons of one prompt stay one batch element (InstructGPT); with K ranked
  responses and no ties there are C(K, 2) pairs. A plain chosen/rejected pair is K=2.

  Args:
    scores: [batch, K] reward of each response (padding responses: any value).
    pair_mask: [batch, K, K], 1 at [b, i, j] iff response i is strictly preferred to
      response j; ties and padding responses form no pair.

  Returns:
    (loss [batch], has_pairs [batch] float): the loss is 0 where an example has no pair.
  """
  diffs, pair_mask = _pairwise(scores, pair_mask)
  # Zero non-pairs before log_sigmoid too: a NaN score on a padding response would
  # otherwise turn the masked-out gradient into 0 * NaN.
  diffs = jnp.where(pair_mask > 0, diffs, 0.0)
  pair_terms = jnp.where(pair_mask > 0, jax.nn.log_sigmoid(diffs), 0.0)
  num_pairs = jnp.sum(pair_mask, axis=(1, 2))
  loss = -jnp.sum(pair_terms, axis=(1, 2)) / jnp.maximum(num_pairs, 1.0)
  return loss, (num_pairs > 0).astype(jnp.float32)


def ranking_loss(scores: jax.Array, pair_mask: jax.Array) -> MaskedSum:
  """Ranking loss as MaskedSum(sum of per-example losses, number of examples with pairs).

  Each prompt weighs the same whatever its K; examples without any pair are not counted.
  See `ranking_loss_per_example` for the shapes.
  """
  loss, has_pairs = ranking_loss_per_example(scores, pair_mask)
  return MaskedSum(jnp.sum(loss * has_pairs), jnp.sum(has_pairs))


def pairwise_accuracy(scores: jax.Array, pair_mask: jax.Array) -> MaskedSum:
  """MaskedSum(pairs with r_w > r_l, number of pairs); pair-weighted, score ties are wrong."""
  diffs, pair_mask = _pairwise(scores, pair_mask)
  return MaskedSum(jnp.sum((diffs > 0) * pair_mask), jnp.sum(pair_mask))


def score_gap(scores: jax.Array, pair_mask: jax.Array) -> MaskedSum:
  """MaskedSum(sum of r_w - r_l over pairs, number of pairs): the mean margin."""
  diffs, pair_mask = _pairwise(scores, pair_mask)
  return masked_sum(diffs, pair_mask)


# ----------------------------------------------------------------------------------------
# PPO: rewards, KL estimators, advantages.
# ----------------------------------------------------------------------------------------


def kl_k1(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """Per-token k1 = -log r = log pi - log pi_ref, with r = pi_ref / pi.

  Unbiased for KL(pi || pi_ref) on tokens sampled from pi, but can be negative per token.
  """
  return logprobs - ref_logprobs


def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """Per-token k3 = (r - 1) - log r, with r = pi_ref / pi.

  Also unbiased for KL(pi || pi_ref) on tokens sampled from pi; never negative and of
  lower variance than k1 when the two policies are close.
  """
  log_ratio = ref_logprobs - logprobs
  return jnp.expm1(log_ratio) - log_ratio


def last_token_one_hot(mask: jax.Array) -> jax.Array:
  """[batch, time] one-hot of the last position where `mask` is 1 (all 0 if none)."""
  positions = jnp.arange(mask.shape[-1])
  last = jnp.max(jnp.where(mask > 0, positions, -1), axis=-1)  # [batch]
  return (positions == last[..., None]).astype(jnp.float32)


def per_token_rewards(
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    scores: jax.Array,
    response_mask: jax.Array,
    kl_coef: jax.Array | float,
) -> jax.Array:
  """PPO reward per response token: -kl_coef * (log pi - log pi_ref), plus the score last.

  Args:
    logprobs: [batch, time] log pi of the sampled response tokens.
    ref_logprobs: [batch, time] log pi_SFT of the same tokens.
    scores: [batch] reward-model score of each response (penalties already applied).
    response_mask: [batch, time] 1 on real response tokens (up to and including the
      first stop token).
    kl_coef: beta, a scalar (the KL controller's current value).

  Returns:
    [batch, time] float32 rewards, 0 on padding; the score lands on the last real token.
  """
  response_mask = response_mask.astype(jnp.float32)
  kl_penalty = -kl_coef * kl_k1(logprobs, ref_logprobs)
  kl_penalty = jnp.where(response_mask > 0, kl_penalty, 0.0)
  return kl_penalty + scores[:, None].astype(jnp.float32) * last_token_one_hot(response_mask)


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    gamma: float = 1.0,
    lam: float = 0.95,
):
  """Generalised advantage estimation over response tokens, by a backward `lax.scan`.

  The episode ends at the last real token: the value after it bootstraps to 0 and
  positions where `mask` is 0 carry neither reward nor value. `mask` is expected to be
  a prefix of ones (the response), then zeros (padding).

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t = delta_t + gamma * lam * A_{t+1}
    returns_t = A_t + V_t

  Args:
    rewards: [batch, time] per-token rewards (see `per_token_rewards`).
    values: [batch, time] value estimates V_t for the state before token t is emitted.
    mask: [batch, time] 1 on real response tokens.
    gamma: discount (1 in InstructGPT).
    lam: GAE lambda (0.95).

  Returns:
    (advantages [batch, time], returns [batch, time]), float32, both 0 on padding.
  """
  mask = mask.astype(jnp.float32)
  rewards = jnp.where(mask > 0, rewards.astype(jnp.float32), 0.0)
  values = jnp.where(mask > 0, values.astype(jnp.float32), 0.0)
  # Shift left by one: V_{t+1} and "is t+1 real"; past the end both are 0.
  next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))
  next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
  deltas = rewards + gamma * next_values - values

  def backward_step(next_advantage, step_inputs):
    delta, continues = step_inputs  # [batch] each
    advantage = delta + gamma * lam * continues * next_advantage
    return advantage, advantage

  # Scan runs over time, so put time first.
  _, advantages = jax.lax.scan(
      backward_step,
      jnp.zeros(rewards.shape[:1], jnp.float32),
      (deltas.T, next_mask.T),
      reverse=True,
  )
  advantages = advantages.T * mask
  return advantages, (advantages + values) * mask


def whiten(
    values: jax.Array,
    mask: jax.Array,
    shift_mean: bool = True,
    global_sum: Callable[[jax.Array], jax.Array] | None = None,
    eps: float = 1e-8,
) -> jax.Array:
  """Whitens `values` with the mean and variance of its masked entries.

  The variance is the population one (divide by the count), as tf.nn.moments in
  lm-human-preferences. With `global_sum` (inside a pmap: `parallel.psum`), the
  statistics are those of the global batch: sums and counts are added over the devices,
  so the result equals whitening the concatenation of every device's batch.

  Args:
    values: any shape, e.g. advantages [batch, time].
    mask: same shape, 1 on entries that count.
    shift_mean: if False, the mean is added back (only the scale changes), as for
      rewards in lm-human-preferences.
    global_sum: adds a scalar over the devices, or None for this device's batch only.
    eps: added to the variance.

  Returns:
    float32 array of `values`' shape, 0 where `mask` is 0.
  """
  mask = mask.astype(jnp.float32)
  values = jnp.where(mask > 0, values.astype(jnp.float32), 0.0)

  def total(x):
    x = jnp.sum(x)
    return x if global_sum is None else global_sum(x)

  count = jnp.maximum(total(mask), 1.0)
  mean = total(values) / count
  # Two passes (mean first, then squared deviations) for float32 accuracy.
  variance = total(jnp.square(values - mean) * mask) / count
  whitened = (values - mean) * jax.lax.rsqrt(variance + eps)
  if not shift_mean:
    whitened = whitened + mean
  return whitened * mask


# ----------------------------------------------------------------------------------------
# PPO: policy and value losses.
# ----------------------------------------------------------------------------------------


class PolicyLossOutput(NamedTuple):
  """Clipped-surrogate loss and its diagnostics, each a MaskedSum over tokens."""
  loss: MaskedSum
  clip_fraction: MaskedSum  # tokens where the clipped term is the larger loss
  approx_kl: MaskedSum  # k3 estimate of KL(pi_old || pi) per token
  ratio: MaskedSum  # pi / pi_old
  ratio_max: jax.Array  # scalar; reduce with pmax across devices


def ppo_policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float = 0.2,
) -> PolicyLossOutput:
  """PPO clipped surrogate, per token: max(-A r, -A clip(r, 1 - eps, 1 + eps)).

  r = exp(log pi - log pi_old). approx_kl is Schulman's k3, (r - 1) - log r, an
  unbiased, non-negative estimate of KL(pi_old || pi) on tokens sampled from pi_old.

  Args:
    logprobs: [batch, time] log pi_theta of the taken tokens (current parameters).
    old_logprobs: [batch, time] log pi of the same tokens at sampling time.
    advantages: [batch, time] (whitened) advantages; no gradient should flow into them.
    mask: [batch, time] 1 on real response tokens.
    clip_eps: the clip range epsilon.

  Returns:
    PolicyLossOutput; minimise `loss.total / loss.count` after the psum.
  """
  mask = mask.astype(jnp.float32)
  # Zero the log-ratio on padding before exp: garbage there must not overflow.
  log_ratio = jnp.where(mask > 0, logprobs - old_logprobs, 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  return PolicyLossOutput(
      loss=masked_sum(jnp.maximum(unclipped, clipped), mask),
      clip_fraction=masked_sum((clipped > unclipped).astype(jnp.float32), mask),
      approx_kl=masked_sum((ratio - 1.0) - log_ratio, mask),
      ratio=masked_sum(ratio, mask),
      ratio_max=jnp.max(jnp.where(mask > 0, ratio, 0.0)),
  )


class ValueLossOutput(NamedTuple):
  """Clipped value loss and the fraction of tokens where clipping won."""
  loss: MaskedSum
  clip_fraction: MaskedSum


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    clip_eps: float = 0.2,
) -> ValueLossOutput:
  """Clipped value loss per token: 0.5 * max((V - R)^2, (V_clipped - R)^2).

  V_clipped = V_old + clip(V - V_old, -eps, eps) keeps the value head within eps of its
  sampling-time prediction, as in lm-human-preferences (eps in reward units).

  Args:
    values: [batch, time] current value predictions.
    old_values: [batch, time] predictions at sampling time.
    returns: [batch, time] GAE returns (targets).
    mask: [batch, time] 1 on real response tokens.
    clip_eps: the value clip range.

  Returns:
    ValueLossOutput of MaskedSums over tokens.
  """
  values = values.astype(jnp.float32)
  clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  unclipped_error = jnp.square(values - returns)
  clipped_error = jnp.square(clipped_values - returns)
  return ValueLossOutput(
      loss=masked_sum(0.5 * jnp.maximum(unclipped_error, clipped_error), mask),
      clip_fraction=masked_sum((clipped_error > unclipped_error).astype(jnp.float32), mask),
  )


# ----------------------------------------------------------------------------------------
# KL coefficient controllers.
# ----------------------------------------------------------------------------------------


@flax.struct.dataclass
class KLControllerState:
  """The current KL coefficient beta; a pytree, kept in the PPO train state."""
  value: jax.Array

  @classmethod
  def create(cls, init_kl_coef: float) -> "KLControllerState":
    return cls(value=jnp.asarray(init_kl_coef, jnp.float32))


def fixed_kl_update(
    state: KLControllerState, current_kl: jax.Array, n_steps: int
) -> KLControllerState:
  """Fixed controller: beta never changes."""
  del current_kl, n_steps
  return state


def adaptive_kl_update(
    state: KLControllerState,
    current_kl: jax.Array,
    n_steps: int,
    *,
    target: float,
    horizon: float,
) -> KLControllerState:
  """Adaptive controller of Ziegler et al. 2019 (lm-human-preferences).

    error = clip(current_kl / target - 1, -0.2, 0.2)
    beta <- beta * (1 + error * n_steps / horizon)

  Args:
    state: the controller state.
    current_kl: the measured mean KL(pi || pi_ref) per episode (summed over tokens).
    n_steps: episodes (rollouts) since the last update, i.e. the rollout batch size.
    target: the KL to steer towards.
    horizon: episodes over which the error is corrected (10000 in the paper code).
  """
  proportional_error = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
  multiplier = 1.0 + proportional_error * n_steps / horizon
  return state.replace(value=state.value * multiplier)


def kl_update_fn(
    kind: str, target: float | None = None, horizon: float | None = None
) -> Callable[[KLControllerState, jax.Array, int], KLControllerState]:
  """The update function for controller `kind` ('fixed' or 'adaptive').

  Both returned functions have the signature `(state, current_kl, n_steps) -> state`.
  """
  if kind == "fixed":
    return fixed_kl_update
  if kind == "adaptive":
    if target is None or horizon is None or target <= 0 or horizon <= 0:
      raise ValueError(
          "KL controller 'adaptive' needs positive `target` and `horizon` "
          f"(got target={target}, horizon={horizon})."
      )
    return lambda state, current_kl, n_steps: adaptive_kl_update(
        state, current_kl, n_steps, target=target, horizon=horizon
    )
  raise config_lib.ConfigError(f"Unknown KL controller {kind!r}; expected 'fixed' or 'adaptive'.")

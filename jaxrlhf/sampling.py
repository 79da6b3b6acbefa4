"""Jitted autoregressive sampling over the KV cache, for PPO rollouts and evaluation.

`decode_loop` is model-agnostic (a `tokens_to_logits` callback over a cache); `sample`
binds it to a CausalLM. Log-probabilities come from jaxrlhf.losses.token_logprobs, the
function the PPO learner uses, so the first-minibatch probability ratio is exactly 1.
"""

import functools
from typing import Callable

import flax
import jax
import jax.numpy as jnp

from jaxrlhf import config_lib
from jaxrlhf import losses
from jaxrlhf.models import transformer


@flax.struct.dataclass
class SampleOutput:
  sequences: jax.Array      # [batch, prompt_len + max_new_tokens] prompt then response
  response_ids: jax.Array   # [batch, max_new_tokens]; pad_token_id after the stop token
  response_mask: jax.Array  # [batch, max_new_tokens] int32: 1 up to and including the stop
  logprobs: jax.Array       # [batch, max_new_tokens] float32, log softmax(logits / T); 0 masked
  stopped: jax.Array        # [batch] bool: the row emitted stop_token_id


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k, then outside the top-p nucleus, to -inf. [batch, vocab]."""
  if 0 < top_k < logits.shape[-1]:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the tokens ranked above it hold less than top_p: the first always stays.
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample_categorical(rng: jax.Array, logits: jax.Array) -> jax.Array:
  """One token per row of logits [batch, vocab] (-inf = never), by inverse CDF. [batch]

  One uniform per row against the running sum of the probabilities, instead of
  jax.random.categorical's Gumbel noise over the whole vocabulary: on CPU, drawing 50k
  uniforms per row costs several times a decode step's softmax and scan.
  """
  cdf = jnp.cumsum(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
  # In (0, total]: never below a leading zero-probability token, never past the last
  # token with mass even when rounding leaves the total short of 1.
  u = (1.0 - jax.random.uniform(rng, cdf.shape[:-1] + (1,))) * cdf[..., -1:]
  return jnp.sum(cdf < u, axis=-1).astype(jnp.int32)


def response_mask_from_ids(response_ids: jax.Array, stop_token_id: int | None) -> jax.Array:
  """1 up to and including the first stop token of each row, 0 after. [batch, time] int32."""
  if stop_token_id is None:
    return jnp.ones(response_ids.shape, jnp.int32)
  is_stop = (response_ids == stop_token_id).astype(jnp.int32)
  stops_before = jnp.cumsum(is_stop, axis=-1) - is_stop
  return (stops_before == 0).astype(jnp.int32)


def decode_loop(tokens_to_logits: Callable, first_logits: jax.Array, cache, rng: jax.Array,
                *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, stop_token_id: int | None, pad_token_id: int,
                greedy: bool = False):
  """Samples up to max_new_tokens per row; stops early once every row has stopped.

  Args:
    tokens_to_logits: (tokens [batch] int32, cache) -> (logits [batch, vocab], cache).
    first_logits: [batch, vocab] logits for the first new token (from the prefill).
    cache: whatever tokens_to_logits threads through (a pytree of fixed shapes).
    rng: key; step i uses fold_in(rng, i).

  Returns:
    (response_ids [batch, max_new_tokens], logprobs [batch, max_new_tokens], stopped [batch],
    num_steps [] int32: tokens generated before every row stopped, at most max_new_tokens).
  """
  batch = first_logits.shape[0]

  def cond(state):
    step, _, _, _, _, finished = state
    return (step < max_new_tokens) & ~jnp.all(finished)

  def body(state):
    step, cache, logits, response_ids, logprobs, finished = state
    if greedy:
      token = jnp.argmax(logits, axis=-1)
    else:
      scaled = logits.astype(jnp.float32) / temperature
      token = sample_categorical(jax.random.fold_in(rng, step),
                                 filter_logits(scaled, top_k, top_p))
    token = token.astype(jnp.int32)
    logprob = losses.token_logprobs(logits, token, temperature)
    token = jnp.where(finished, pad_token_id, token)
    logprob = jnp.where(finished, 0.0, logprob)
    response_ids = jax.lax.dynamic_update_slice(response_ids, token[:, None], (0, step))
    logprobs = jax.lax.dynamic_update_slice(logprobs, logprob[:, None], (0, step))
    if stop_token_id is not None:
      finished = finished | (token == stop_token_id)
    logits, cache = tokens_to_logits(token, cache)
    return step + 1, cache, logits.astype(jnp.float32), response_ids, logprobs, finished

  state = (
      jnp.zeros((), jnp.int32), cache, first_logits.astype(jnp.float32),
      jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32),
      jnp.zeros((batch, max_new_tokens), jnp.float32),
      jnp.zeros((batch,), bool))
  num_steps, _, _, response_ids, logprobs, finished = jax.lax.while_loop(cond, body, state)
  return response_ids, logprobs, finished, num_steps


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "temperature", "top_k", "top_p", "stop_token_id",
    "pad_token_id", "greedy"))
def sample(model: transformer.CausalLM, params, prompt_ids: jax.Array,
           prompt_mask: jax.Array, rng: jax.Array, *, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           stop_token_id: int | None, pad_token_id: int,
           greedy: bool = False) -> SampleOutput:
  """Samples responses to left-padded prompts [batch, prompt_len] (mask 1 on real tokens).

  temperature scales the logits before top-k/top-p and the returned logprobs alike; greedy
  takes the argmax (logprobs still use temperature). Compiles once per model, shape and
  sampling setting.
  """
  batch, prompt_len = prompt_ids.shape
  if max_new_tokens < 1:
    raise ValueError(f"sample: max_new_tokens must be >= 1, got {max_new_tokens}")
  if not temperature > 0:
    raise ValueError(f"sample: temperature must be > 0 (use greedy=True), got {temperature}")
  if not 0.0 < top_p <= 1.0 or top_k < 0:
    raise ValueError(f"sample: need top_k >= 0 and 0 < top_p <= 1, got {top_k}, {top_p}")
  config = model.config
  max_len = prompt_len + max_new_tokens
  if config.spec.positions == "learned" and max_len > config.max_position_embeddings:
    raise config_lib.ConfigError(
        f"sample: prompt_len {prompt_len} + max_new_tokens {max_new_tokens} exceeds "
        f"max_position_embeddings={config.max_position_embeddings} of this {config.arch} model")

  variables = {"params": params}
  cache = transformer.init_cache(config, batch, max_len)
  logits, cache = model.apply(variables, prompt_ids, cache, prompt_mask, last_only=True,
                              method=transformer.CausalLM.decode)

  def tokens_to_logits(tokens, cache):
    logits, cache = model.apply(variables, tokens[:, None], cache,
                                method=transformer.CausalLM.decode)
    return logits[:, 0], cache

  response_ids, logprobs, stopped, _ = decode_loop(
      tokens_to_logits, logits[:, 0], cache, rng, max_new_tokens=max_new_tokens,
      temperature=temperature, top_k=top_k, top_p=top_p, stop_token_id=stop_token_id,
      pad_token_id=pad_token_id, greedy=greedy)
  response_mask = response_mask_from_ids(response_ids, stop_token_id)
  return SampleOutput(
      sequences=jnp.concatenate([prompt_ids.astype(jnp.int32), response_ids], axis=1),
      response_ids=response_ids,
      response_mask=response_mask,
      logprobs=logprobs * response_mask,
      stopped=stopped)

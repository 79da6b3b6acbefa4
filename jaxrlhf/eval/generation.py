"""Sampling and scoring programs the policy comparison runs, pmapped once per model shape.

Every policy samples with the same `Generation` settings so they are judged on equal
terms; `Programs` compiles each pure function once per model config and `run_batched`
feeds it fixed-size chunks of rows. Used by `jaxrlhf.eval.policy_runs`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import parallel
from jaxrlhf import sampling
from jaxrlhf import scoring
from jaxrlhf import train_lib


@dataclasses.dataclass(frozen=True)
class Generation:
  """How every policy samples; the same for all, so they are judged on equal terms."""
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  greedy: bool
  stop_token_id: int
  pad_token_id: int


def sample_responses(params, prompt_ids, prompt_mask, rng, *, model, generation: Generation):
  """(response_ids, response_mask, stopped), cut after the first stop token."""
  out = parallel.per_device(lambda key, ids, mask: sampling.sample(
      model, params, ids, mask, key,
      max_new_tokens=generation.max_new_tokens, temperature=generation.temperature,
      top_k=generation.top_k, top_p=generation.top_p, greedy=generation.greedy,
      stop_token_id=generation.stop_token_id, pad_token_id=generation.pad_token_id),
      rng, prompt_ids, prompt_mask)
  return scoring.truncate_after_stop(out.response_ids, generation.stop_token_id,
                                     generation.pad_token_id)


def response_logprob(params, prompt_ids, prompt_mask, response_ids, response_mask, *,
                     apply_fn, temperature: float):
  """Sum over response tokens of log pi(token | prefix), at the sampling temperature. [B]"""
  sequences, attention_mask = scoring.join_prompt_response(prompt_ids, prompt_mask,
                                                           response_ids, response_mask)
  logprobs = scoring.response_logprobs(apply_fn, params, sequences, attention_mask,
                                       prompt_ids.shape[1], temperature=temperature)
  return jnp.sum(logprobs * response_mask, axis=-1)


class Programs:
  """Compiled functions, shared by every checkpoint of the same model config."""

  def __init__(self, generation: Generation):
    self.generation = generation
    self._cache: dict = {}

  def _get(self, kind: str, model, build):
    key = (kind, type(model).__name__, model.config)
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  def sample(self, model):
    return self._get("sample", model, lambda: parallel.pmap_fn(
        functools.partial(sample_responses, model=model, generation=self.generation),
        in_axes=(0, 0, 0, None)))

  def logprob(self, model):
    return self._get("logprob", model, lambda: parallel.pmap_fn(functools.partial(
        response_logprob, apply_fn=model.apply, temperature=self.generation.temperature)))

  def score(self, model):
    return self._get("score", model, lambda: parallel.pmap_fn(
        functools.partial(scoring.response_scores, apply_fn=model.apply)))

  def nll(self, model):
    return self._get("nll", model, lambda: parallel.pmap_fn(
        functools.partial(scoring.lm_eval_step, apply_fn=model.apply)))


def run_batched(fn, rparams, arrays: dict[str, np.ndarray], per_device: int,
                *extra) -> Any:
  """Calls pmapped fn(rparams, *arrays.values(), *extra) over fixed-size chunks of rows.

  The last chunk is padded by repeating its last row (one compiled shape); outputs are
  trimmed back and concatenated along the row axis.
  """
  n_dev = jax.local_device_count()
  chunk = n_dev * per_device
  total = len(next(iter(arrays.values())))
  outputs = []
  for start in range(0, total, chunk):
    part = {k: v[start:start + chunk] for k, v in arrays.items()}
    real = len(next(iter(part.values())))
    padded = {k: np.concatenate([v, np.repeat(v[-1:], chunk - real, axis=0)])
              for k, v in part.items()}
    device_args = [train_lib.put_batch(parallel.shard(v)) for v in padded.values()]
    extra_args = [jax.random.fold_in(e, start) if isinstance(e, jax.Array) else e
                  for e in extra]
    out = parallel.unshard(fn(rparams, *device_args, *extra_args))
    outputs.append(jax.tree_util.tree_map(lambda x, real=real: x[:real], out))
  return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outputs)

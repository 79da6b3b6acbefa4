"""Batched log-likelihood of continuations given contexts: the scorer every likelihood
benchmark (TruthfulQA MC, CrowS-Pairs, Winogender, few-shot multiple choice) shares.

One pure function scores a fixed-shape batch; it is pmapped once per model and fed
right-padded batches whose lengths come from a few buckets, so a whole benchmark compiles
a handful of programs. Log-probabilities are `losses.token_logprobs` of the same forward
pass the trainers use.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import config_lib
from jaxrlhf import losses
from jaxrlhf import parallel
from jaxrlhf.data import tokenize as tokenize_lib


@dataclasses.dataclass(frozen=True)
class Request:
  """Score log p(continuation | context). Put the separating space in the continuation
  (" Paris"); trailing spaces of the context are moved there anyway."""
  context: str
  continuation: str


@dataclasses.dataclass
class Loglik:
  """Per-request results, in the order of the requests."""
  logprob: np.ndarray     # [n] float64: sum of the continuation's token log-probs
  num_tokens: np.ndarray  # [n] int: continuation tokens scored
  num_chars: np.ndarray   # [n] int: characters of the continuation (for length norms)
  greedy: np.ndarray      # [n] bool: every continuation token is the argmax
  num_truncated: int = 0  # requests whose context lost tokens on the left to fit max_len


# ---------------------------------------------------------------------------------------
# The pure scoring function.
# ---------------------------------------------------------------------------------------


def continuation_logprobs(apply_fn, params, batch: dict):
  """Sum of target-token log-probs per row, and whether each target token is the argmax.

  batch: input_ids, attention_mask, target_mask, all [batch, time] int32, right-padded;
  target_mask is 1 on continuation tokens (never on position 0).
  Returns (logprob [batch] float32, greedy [batch] bool).
  """
  logits = apply_fn({"params": params}, batch["input_ids"],
                    attention_mask=batch["attention_mask"])  # [batch, time, vocab]
  logits = logits[:, :-1]
  targets = batch["input_ids"][:, 1:]
  is_target = batch["target_mask"][:, 1:] > 0
  token_lp = losses.token_logprobs(logits, targets)  # [batch, time - 1]
  logprob = jnp.sum(jnp.where(is_target, token_lp, 0.0), axis=-1)
  is_argmax = jnp.argmax(logits, axis=-1) == targets
  greedy = jnp.all(is_argmax | ~is_target, axis=-1)
  return logprob, greedy


@functools.lru_cache(maxsize=None)
def _pmapped(model):
  """One pmapped scorer per model (a hashable Flax module), shared by every scorer."""
  return parallel.pmap_fn(functools.partial(continuation_logprobs, model.apply))


# ---------------------------------------------------------------------------------------
# Tokenisation and batching (host side).
# ---------------------------------------------------------------------------------------


def length_buckets(max_len: int, min_bucket: int = 64) -> tuple[int, ...]:
  """Powers of two from min_bucket, capped by (and ending at) max_len."""
  buckets, length = [], min(min_bucket, max_len)
  while length < max_len:
    buckets.append(length)
    length *= 2
  return tuple(buckets) + (max_len,)


class LoglikScorer:
  """Scores `Request`s with a causal LM on every local device.

  Sequences are context tokens (BOS first when the tokenizer adds one) then continuation
  tokens; an empty context becomes BOS, or EOS for tokenizers without one, so the first
  continuation token is still predicted. A sequence longer than max_len loses context
  tokens on the left; a continuation that alone does not fit is an error.
  """

  def __init__(self, model, params, tokenizer, *, max_len: int, per_device_batch: int = 8,
               min_bucket: int = 64, replicated_params=None):
    config = model.config
    if config.spec.positions == "learned" and max_len > config.max_position_embeddings:
      raise config_lib.ConfigError(f"max_len={max_len} exceeds the model's max_position_embeddings="
                       f"{config.max_position_embeddings}; lower the config's max_len.")
    if max_len < 2 or per_device_batch < 1:
      raise ValueError(f"need max_len >= 2 and per_device_batch >= 1, got {max_len}, "
                       f"{per_device_batch}")
    self.model = model
    self.tokenizer = tokenizer
    self.encoder = tokenize_lib.Encoder(tokenizer)
    self.max_len = max_len
    self.per_device_batch = per_device_batch
    self.buckets = length_buckets(max_len, min_bucket)
    self.rparams = (replicated_params if replicated_params is not None
                    else parallel.replicate(params))
    self._score_p = _pmapped(model)

  def encode(self, request: Request) -> tuple[list[int], int, bool]:
    """(token ids, number of continuation tokens at the end, context truncated)."""
    context, continuation = request.context, request.continuation
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    context_ids = self.encoder.encode(stripped) if stripped else []
    context_ids = self.encoder.prefix() + context_ids
    if not context_ids:
      context_ids = [self.encoder.eos_id]
    continuation_ids = self.encoder.encode(continuation)
    if not continuation_ids:
      raise ValueError(f"the continuation {request.continuation!r} has no tokens")
    if len(continuation_ids) >= self.max_len:
      raise ValueError(
          f"a continuation of {len(continuation_ids)} tokens does not fit max_len="
          f"{self.max_len} with any context; raise max_len ({request.continuation[:60]!r}...)")
    ids = context_ids + continuation_ids
    truncated = len(ids) > self.max_len
    return ids[-self.max_len:], len(continuation_ids), truncated

  def score(self, requests: Sequence[Request]) -> Loglik:
    n = len(requests)
    encoded = [self.encode(r) for r in requests]
    logprob = np.zeros((n,), np.float64)
    greedy = np.zeros((n,), bool)
    by_bucket: dict[int, list[int]] = {}
    for index, (ids, _, _) in enumerate(encoded):
      bucket = next(b for b in self.buckets if b >= len(ids))
      by_bucket.setdefault(bucket, []).append(index)

    n_local = jax.local_device_count()
    n_proc, proc = jax.process_count(), jax.process_index()
    local_rows = n_local * self.per_device_batch
    global_rows = n_proc * local_rows
    for bucket in sorted(by_bucket):
      indices = by_bucket[bucket]
      logging.info("loglik: %d requests of length <= %d", len(indices), bucket)
      # Every process builds the same global batches and scores its own rows of each.
      for start in range(0, len(indices), global_rows):
        part = indices[start:start + global_rows]
        rows = part + [part[0]] * (global_rows - len(part))
        mine = rows[proc * local_rows:(proc + 1) * local_rows]
        batch = self.make_batch([encoded[i] for i in mine], bucket)
        lp, gr = parallel.unshard(self._score_p(
            self.rparams, parallel.device_put_sharded(parallel.shard(batch))))
        lp = np.asarray(lp, np.float64).reshape(-1)
        gr = np.asarray(gr).reshape(-1)
        lp, gr = (np.asarray(x).reshape(-1) for x in parallel.process_allgather((lp, gr)))
        logprob[part] = lp[:len(part)]
        greedy[part] = gr[:len(part)]
    return Loglik(
        logprob=logprob,
        num_tokens=np.array([num for _, num, _ in encoded], np.int64).reshape(n),
        num_chars=np.array([len(r.continuation) for r in requests], np.int64).reshape(n),
        greedy=greedy,
        num_truncated=sum(int(t) for _, _, t in encoded))

  def make_batch(self, rows: list[tuple[list[int], int, bool]], length: int) -> dict:
    """Right-padded host arrays [len(rows), length] from `encode` outputs."""
    ids = np.full((len(rows), length), self.encoder.pad_id, np.int32)
    attention = np.zeros((len(rows), length), np.int32)
    target = np.zeros((len(rows), length), np.int32)
    for row, (tokens, num_continuation, _) in enumerate(rows):
      ids[row, :len(tokens)] = tokens
      attention[row, :len(tokens)] = 1
      target[row, len(tokens) - num_continuation:len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": attention, "target_mask": target}


# ---------------------------------------------------------------------------------------
# Helpers the benchmarks share.
# ---------------------------------------------------------------------------------------


def log_normalize(logprobs: np.ndarray) -> np.ndarray:
  """log softmax over the last axis, in float64."""
  logprobs = np.asarray(logprobs, np.float64)
  top = np.max(logprobs, axis=-1, keepdims=True)
  return logprobs - top - np.log(np.sum(np.exp(logprobs - top), axis=-1, keepdims=True))


def entropy_bits(logprobs: np.ndarray) -> np.ndarray:
  """Entropy (bits) of the distribution obtained by normalising logprobs over the last axis."""
  logp = log_normalize(logprobs)
  return -np.sum(np.exp(logp) * logp, axis=-1) / np.log(2.0)

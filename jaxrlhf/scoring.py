"""Forward passes and scores every stage and evaluator shares, and nothing else.

The policy side: a sampled response cut after its stop token, joined to its prompt, and
the logits (or values) that predict each response token. The reward side: one way to
read a scalar-head model, at each sequence's last real token, for rankings, PPO's
rollouts, the evaluation and the scoring entry point alike. The text side: the NLL of
the tokens a batch marks. Stage modules (`sft`, `reward_model`, `ppo`) and `eval/` import
these; this module imports no stage.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import data as data_pkg
from jaxrlhf import data_lib
from jaxrlhf import losses
from jaxrlhf import parallel
from jaxrlhf import sampling
from jaxrlhf import train_lib


def truncate_after_stop(response_ids: jax.Array, stop_token_id: int, pad_token_id: int):
  """Cuts each response after its first stop token; the rest becomes padding.

  Returns (response_ids [batch, N] with pad after the stop, response_mask [batch, N] int32,
  1 up to and including the stop, stopped [batch] bool).
  """
  response_mask = sampling.response_mask_from_ids(response_ids, stop_token_id)
  stopped = jnp.any(response_ids == stop_token_id, axis=-1)
  return jnp.where(response_mask > 0, response_ids, pad_token_id), response_mask, stopped


def join_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask):
  """(sequences, attention_mask) [batch, P + N]; positions follow the mask in the model."""
  sequences = jnp.concatenate([prompt_ids, response_ids], axis=1).astype(jnp.int32)
  attention_mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
  return sequences, attention_mask


def response_logprobs(apply_fn, params, sequences, attention_mask, prompt_len: int, *,
                      temperature: float, with_entropy: bool = False):
  """The policy's log-probabilities of its response tokens sequences[:, prompt_len:],
  [batch, N] float32 (and the entropy at each, with `with_entropy`).

  The logits at position t predict token t + 1, so response token i is read at
  prompt_len - 1 + i. This one function serves the rollout and the learner alike, which
  is what makes the first minibatch's probability ratio exactly 1. The model's
  `logits_chunk` decides whether the full [batch, T, vocab] logits are made.
  """
  return apply_fn({"params": params}, sequences, attention_mask, start=prompt_len,
                  temperature=temperature, with_entropy=with_entropy,
                  method="token_logprobs")


def lm_nll(apply_fn, params, batch: dict, **kwargs) -> losses.MaskedSum:
  """Next-token NLL of the tokens batch["loss_mask"] marks (losses.lm_nll), through the
  model's `token_logprobs`; `kwargs` go to it (deterministic, rngs)."""
  logprobs = apply_fn({"params": params}, batch["input_ids"], batch["attention_mask"],
                      start=1, method="token_logprobs", **kwargs)
  return losses.masked_sum(-logprobs, batch["loss_mask"][:, 1:])


def response_values(apply_fn, params, sequences, attention_mask, prompt_len: int):
  """V before each response token, read where the next token is predicted: [batch, N]."""
  values = apply_fn({"params": params}, sequences, attention_mask=attention_mask)
  return values[:, prompt_len - 1:-1]


def sequence_scores(apply_fn, params, input_ids, attention_mask, end_index, **kwargs):
  """The scalar at each sequence's last real token. input_ids [..., T] -> [...]."""
  lead = input_ids.shape[:-1]
  t = input_ids.shape[-1]
  per_token = apply_fn({"params": params}, input_ids.reshape(-1, t),
                       attention_mask=attention_mask.reshape(-1, t), **kwargs)  # [N, T]
  idx = end_index.reshape(-1, 1).astype(jnp.int32)
  return jnp.take_along_axis(per_token, idx, axis=1)[:, 0].reshape(lead)


def ranking_scores(apply_fn, params, batch: dict, **kwargs):
  """A packed ranking batch's scores (data/buckets.py) in the loss's layout [prompts, K].

  Every real response is forwarded once from its row (input_ids [rows, T]); `slot`
  [prompts, K] names each response's row on its device (-1: no response, score 0).
  In mesh mode the step sees every device's rows one after another, so a device's
  slots are offset by the rows of the devices before it.
  """
  flat = sequence_scores(apply_fn, params, batch["input_ids"], batch["attention_mask"],
                         batch["end_index"], **kwargs)  # [rows]
  slot = batch["slot"]
  blocks = parallel.shard_count()
  offset = (jnp.arange(slot.shape[0]) // (slot.shape[0] // blocks)) * (flat.shape[0] // blocks)
  index = jnp.where(slot >= 0, slot + offset[:, None], 0)
  return jnp.where(slot >= 0, flat[index], 0.0)


def score_step(params, batch: dict, *, apply_fn):
  """Scores of single sequences: batch input_ids [B, T], attention_mask, end_index [B]."""
  return sequence_scores(apply_fn, params, batch["input_ids"], batch["attention_mask"],
                         batch["end_index"])


def score_batches(score_step_p, rparams, batches) -> np.ndarray:
  """Scores for every real row of host batches [devices, per_device, ...] with 'valid'."""
  out = []
  for batch in batches:
    valid = np.asarray(batch["valid"]).reshape(-1) > 0
    device_batch = {k: v for k, v in batch.items() if k != "valid"}
    scores = parallel.unshard(score_step_p(rparams, train_lib.put_batch(device_batch)))
    out.append(scores.reshape(-1)[valid])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def score_pairs(model, params, tokenizer, pairs: list[tuple[str, str]], *,
                max_prompt_len: int = 32, max_response_len: int = 16,
                per_device_batch_size: int = 16) -> np.ndarray:
  """Scores of (prompt, response) strings under a reward model (host params), [len(pairs)].

  Each response is scored as the reward model was trained: prompt, response, stop token.
  """
  lengths = data_pkg.Lengths(prompt=max_prompt_len, response=max_response_len)
  score_step_p = parallel.pmap_fn(functools.partial(score_step, apply_fn=model.apply))
  batches = data_lib.score_batches(tokenizer, pairs, lengths, per_device_batch_size)
  return score_batches(score_step_p, parallel.replicate(params), batches)


def lm_eval_step(params, batch: dict, *, apply_fn):
  """NLL of the tokens `loss_mask` marks, summed over every device: a `MaskedSum`."""
  return parallel.psum(lm_nll(apply_fn, params, batch))


def evaluate_nll(eval_step_p, rparams, eval_batches) -> dict:
  """Token-weighted NLL (and perplexity) of host batches under pmapped `lm_eval_step`."""
  total, count = 0.0, 0.0
  for batch in eval_batches:
    out = parallel.fetch(eval_step_p(rparams, train_lib.put_batch(batch)))
    total += float(out.total)
    count += float(out.count)
  loss = total / max(count, 1.0)
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
          "eval_tokens": count}


def response_end_index(prompt_len: int, response_mask):
  """Index in the joined sequence of each response's last real token (its stop token). [B]"""
  length = jnp.maximum(jnp.sum(response_mask, axis=-1), 1).astype(jnp.int32)
  return prompt_len + length - 1


def response_scores(params, prompt_ids, prompt_mask, response_ids, response_mask, *,
                    apply_fn):
  """A scalar-head model read at the last real response token (the stop token). [B]"""
  sequences, attention_mask = join_prompt_response(prompt_ids, prompt_mask,
                                                   response_ids, response_mask)
  return sequence_scores(apply_fn, params, sequences, attention_mask,
                         response_end_index(prompt_ids.shape[1], response_mask))
